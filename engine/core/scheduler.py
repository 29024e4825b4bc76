"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Plain Python: `schedule()` returns a `SchedulerOutput` (a plan for one step) and never touches tensors.

Policy, per step, within `max_num_batched_tokens` tokens and `max_num_seqs` running sequences:
  1. Running sequences that decode (one token each), oldest first.
  2. Running sequences still in prefill (a long prompt, or a recompute after preemption), in chunks.
  3. Waiting sequences, first come first served, in chunks, after prefix-cache hits; admission stops at the
     first one that does not fit, so a long prompt is not overtaken forever.
Decodes go first so a long prompt, computed a chunk per step, never stalls running streams.
When a running sequence needs a block and none is free, the newest running sequence is preempted: its
blocks are freed and it goes back to the front of the waiting queue to be recomputed later (its full blocks
usually come back as prefix hits). Nothing fails for lack of blocks.

A prompt longer than the model's context (`context_len`) or than the whole KV cache is refused at
`add()` with `PromptTooLongError`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gptoss.engine.core.block_manager import BlockManager
from gptoss.engine.core.sequence import Sequence, SequenceStatus
from gptoss.engine.errors import EngineOverloadedError, PromptTooLongError


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: positions `start .. start + num_new_tokens - 1` are computed."""

    seq: Sequence
    start: int
    num_new_tokens: int
    # Whether this step yields the sequence's next token (its chunk reaches its last known token); fixed
    # when planned, since the token it samples is appended afterwards.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.end == self.seq.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Holds the waiting queue and the running set; decides each step's batch and owns its blocks' lifetime."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        context_len: int,
        max_num_waiting: int | None = None,
    ) -> None:
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0 or context_len <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and context_len must be positive")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # `context_len`: the model's context (EngineArgs.max_model_len, at most max_position_embeddings).
        # `max_model_len`: the longest sequence served, the context or less if the whole KV cache holds less.
        self.context_len = context_len
        self.max_model_len = min(context_len, block_manager.max_tokens_per_sequence())
        self.max_num_waiting = max_num_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- requests in and out --------------------------------------------------------------------

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """Raise `PromptTooLongError` if a prompt of this length can never be served."""
        if num_prompt_tokens > self.context_len:
            raise PromptTooLongError(
                f"prompt has {num_prompt_tokens} tokens, more than the model's context of {self.context_len} tokens"
            )
        if num_prompt_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {num_prompt_tokens} tokens, more than the whole KV cache holds "
                f"({self.max_model_len} tokens)"
            )

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises `PromptTooLongError` or `EngineOverloadedError` (nothing queued)."""
        self.check_prompt(seq.num_tokens)
        if self.max_num_waiting is not None and len(self.waiting) >= self.max_num_waiting:
            raise EngineOverloadedError(f"{len(self.waiting)} requests are already waiting; retry later")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stop, length, abort, error) and free its blocks at once."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the plan for one step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        scheduled: dict[int, ScheduledSequence] = {}
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # Decodes first, then running prefills; oldest first within each.
        for seq in sorted(self.running, key=lambda s: (s.is_prefill, s.seq_id)):
            if budget <= 0:
                break
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            want = min(seq.num_tokens - seq.num_computed_tokens, budget)
            start = seq.num_computed_tokens
            # The common case first: everything fits (`allocate` is all or nothing); asking
            # `max_allocatable_tokens` first would do the same bookkeeping twice per sequence and step.
            if want > 0 and bm.allocate(seq, want):
                scheduled[seq.seq_id] = ScheduledSequence(seq, start, want)
                budget -= want
                continue
            while True:
                num_new = bm.max_allocatable_tokens(seq, want)
                if num_new > 0:
                    start = seq.num_computed_tokens
                    bm.allocate(seq, num_new)
                    scheduled[seq.seq_id] = ScheduledSequence(seq, start, num_new)
                    budget -= num_new
                    break
                victim = max(self.running, key=lambda s: s.seq_id)
                undone = scheduled.pop(victim.seq_id, None)
                if undone is not None:
                    budget += undone.num_new_tokens
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break

        # Admit waiting sequences while there is room; none after a preemption (the cache is tight).
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit_tokens = bm.find_prefix_hit(seq) * bm.block_size if seq.num_computed_tokens == 0 else 0
            want = min(seq.num_tokens - max(seq.num_computed_tokens, hit_tokens), budget)
            num_new = bm.max_allocatable_tokens(seq, want)
            if num_new <= 0:
                break
            if not bm.allocate(seq, num_new):
                raise AssertionError("block manager refused an allocation it reported as possible")
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq.seq_id] = ScheduledSequence(seq, seq.num_computed_tokens, num_new)
            budget -= num_new

        out.scheduled = list(scheduled.values())
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def mark_computed(self, out: SchedulerOutput) -> None:
        """After the step ran: the scheduled positions now have KV (full blocks enter the prefix cache)."""
        for item in out.scheduled:
            if item.seq.status == SequenceStatus.RUNNING and item.seq.num_computed_tokens == item.start:
                self.block_manager.mark_computed(item.seq, item.num_new_tokens)
