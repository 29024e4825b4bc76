"""One request's state inside the engine.

`Sequence` is the scheduler's and block manager's unit: its token ids (prompt then output), how many of them
already have KV in the cache (`num_computed_tokens`), and one block table per KV block group
("full_attention", "sliding_attention"). What the engine hands back is in `engine/outputs.py`.
"""

from __future__ import annotations

import enum
import functools
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from gptoss.engine.outputs import TokenLogprob

if TYPE_CHECKING:
    from gptoss.engine.structured_output.grammar import StructuredOutputState

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request being served.

    `token_ids` is the prompt followed by the output so far. Its first `num_computed_tokens` tokens have
    their KV in the cache; after a preemption that count drops to zero and the whole of `token_ids` is
    recomputed as a prompt (prefix hits included).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: Any,
        *,
        want_prompt_logprobs: bool = False,
        arrival_time: float = 0.0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # The prompt never changes: one copy, shared by every reader (they must not modify it).
        self._prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.want_prompt_logprobs = want_prompt_logprobs
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        # Prompt tokens whose KV came from the prefix cache at first admission (reported to clients).
        self.num_cached_tokens = 0
        # Block ids per group; -1 marks a sliding-window block that was freed (never read by the kernels).
        self.block_tables: dict[str, list[int]] = {}
        # Per group, how many leading block-table entries are -1 (outside every future window).
        self.num_window_freed: dict[str, int] = {}
        # Hash chain of the full blocks of `token_ids` (shared by all groups): entry i keys tokens 0..(i+1)*bs.
        self.block_hashes: list[bytes] = []
        self.num_preemptions = 0
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        # Per output token, when logprobs are asked for.
        self.output_logprobs: list[TokenLogprob] = []
        # Per prompt token (the first has none), when prompt logprobs are asked for.
        self.prompt_logprobs: list[TokenLogprob | None] = []
        # Output tokens already reported to the consumer (for streaming deltas).
        self.num_reported_tokens = 0
        # Structured output: the grammar state of `sampling_params.structured_output` (set by the engine); the
        # model runner computes its masks batched, off the main thread.
        self.grammar: StructuredOutputState | None = None
        # A further constraint: output token ids so far -> bool mask [vocab] of allowed next tokens (or None: no
        # constraint this step). Called once per sampled token, on the engine thread.
        self.logits_mask_fn: Callable[[list[int]], Any] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt (a shared list, not a copy: copying a long prompt per step per request adds up)."""
        return self._prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @functools.cached_property
    def prompt_token_array(self) -> np.ndarray:
        """The prompt as an int64 array `[num_prompt_tokens]`, made once (the sampler's repetition penalty reads
        it every step; converting the list each time costs ~20 us per 1k tokens)."""
        return np.asarray(self._prompt_token_ids, dtype=np.int64)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """True while more than one token lacks KV (a prompt, or a recompute after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
