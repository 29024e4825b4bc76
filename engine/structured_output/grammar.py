"""Grammars compiled by llguidance: the compiler (with its cache), per-request matchers and batched bitmasks.

See the package docstring for the grammar and for how the engine uses these.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch
from gptoss.engine.structured_output.spec import (
    CALL_TOKEN,
    EOS_TOKEN,
    RETURN_TOKEN,
    StructuredOutputError,
    StructuredOutputSpec,
    harmony_grammar,
    json_with_options,
)
from gptoss.engine.tokenizer import special_token_id
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Per-request matcher
# --------------------------------------------------------------------------------------------------------


class StructuredOutputState:
    """One request's grammar matcher: feed it every generated token; it says which tokens may come next.

    Not thread-safe: the engine calls `accept_token` only after the step's bitmask future has completed.
    Preemption by recompute needs nothing here (the generated tokens and so the state stay the same); `rollback`
    is for speculative decoding, `reset` + `accept_tokens` rebuilds a state from scratch.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._stop_token_ids = stop_token_ids
        self.num_accepted_tokens = 0

    def accept_token(self, token_id: int) -> bool:
        """Advance by one generated token. False (and no state change) when the grammar does not allow it."""
        if self._matcher.try_consume_tokens([token_id]) != 1:
            return False
        self.num_accepted_tokens += 1
        return True

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance by several tokens (replay); stops at the first disallowed one and returns False."""
        return all(self.accept_token(t) for t in token_ids)

    def sync(self, output_token_ids: Sequence[int]) -> bool:
        """Accept the request's output tokens this state has not seen yet; False if one is refused (the state
        then stays before it). The sequence's tokens are the truth, so the state keeps in step across
        preemption-recompute without engine hooks. Tokens after the reply's end are ignored."""
        for token_id in output_token_ids[self.num_accepted_tokens :]:
            if self.is_terminated():
                return True
            if not self.accept_token(token_id):
                return False
        return True

    def __call__(self, output_token_ids: Sequence[int]) -> torch.Tensor:
        """`sync`, then the bool `[V]` mask of the next token (one request at a time; usable as a `logits_mask_fn`).

        A refused token is not an error here (the caller sampled it without this mask); the mask stays the one
        before it. The model runner's batched path (`fill_token_bitmasks`) is the fast way to the same masks.
        """
        if not self.sync(output_token_ids):
            logger.warning("structured output: output token refused by the grammar; mask left before it")
        return self.allowed_token_mask()

    def is_terminated(self) -> bool:
        """True once the reply is complete (`<|return|>` or `<|call|>` accepted): no more tokens are needed."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """The matcher's error, if it is in an error state (it never leaves it); None otherwise."""
        return self._matcher.get_error() if self._matcher.is_error() else None

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        if not 0 <= num_tokens <= self.num_accepted_tokens:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted_tokens} accepted tokens")
        if num_tokens and not self._matcher.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback failed: {self._matcher.get_error()}")
        self.num_accepted_tokens -= num_tokens

    def reset(self) -> None:
        """Back to the start of the reply."""
        self._matcher.reset()
        self.num_accepted_tokens = 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 `[R, ceil(V/32)]`, CPU, contiguous)."""
        _check_bitmask(bitmask, self.vocab_size)
        if not (0 <= row < bitmask.shape[0]):
            raise IndexError(f"row {row} outside a bitmask of {bitmask.shape[0]} rows")
        if self._needs_fallback():
            self._fill_fallback(bitmask[row])
            return
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def allowed_token_mask(self, vocab_size: int | None = None) -> torch.Tensor:
        """The allowed next tokens as a bool `[vocab_size]` tensor (default: the model's vocabulary size)."""
        bitmask = allocate_token_bitmask(1, self.vocab_size)
        self.fill_bitmask(bitmask)
        return unpack_token_bitmask(bitmask, vocab_size or self.vocab_size)[0]

    def _needs_fallback(self) -> bool:
        return self._matcher.is_error() or self._matcher.is_stopped()

    def _fill_fallback(self, words: torch.Tensor) -> None:
        """A finished or broken matcher allows only the stop tokens: the sampler always has a token to pick and
        the engine ends the request (its stop-token check) instead of generating unconstrained text."""
        if self._matcher.is_error():
            logger.warning("structured output matcher in error state: %s", self._matcher.get_error())
        words.zero_()
        for token_id in self._stop_token_ids:
            words[token_id // 32] |= _bit(token_id % 32)


def _bit(index: int) -> int:
    """Bit `index` of an int32 word as a Python int in int32 range (bit 31 is the sign bit)."""
    return -(1 << 31) if index == 31 else 1 << index


# --------------------------------------------------------------------------------------------------------
# Compiler with a bounded cache
# --------------------------------------------------------------------------------------------------------


@dataclass
class _CompiledGrammar:
    grammar: str
    matcher: llguidance.LLMatcher  # pristine; each request gets a deep copy


# Compile-time bounds, so that one request's schema cannot hold a CPU and gigabytes: llguidance's own limits
# (below its defaults of 500k grammar symbols and 250k lexer states, about 1-2 kB each), and a cap on the
# minimum counts a schema may demand (a reply cannot hold 10^9 items anyway; such bounds only cost).
PARSER_LIMITS = llguidance.LLParserLimits(max_grammar_size=200_000, max_lexer_states=50_000)
MAX_SCHEMA_MINIMUM = 10_000
_MINIMUM_KEYWORDS = ("minItems", "minLength", "minProperties", "minContains")


def excessive_minimum(schema: Any) -> str | None:
    """A message for the first `minItems` / `minLength` / ... above `MAX_SCHEMA_MINIMUM` anywhere in `schema`."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for keyword in _MINIMUM_KEYWORDS:
                value = node.get(keyword)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_SCHEMA_MINIMUM:
                    return f"{keyword} {value} is more than this server allows ({MAX_SCHEMA_MINIMUM})"
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


class StructuredOutputCompiler:
    """Compiles specs into matchers for one tokenizer; compiled grammars are kept in a bounded LRU cache.

    `vocab_size` is the model's (logits') vocabulary size, at least the tokenizer's: ids beyond the tokenizer
    (padding rows of the embedding) are never allowed. Thread-safe (the server may compile while the engine
    runs); compilation releases the GIL.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256) -> None:
        tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_size < tokenizer_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_size}")
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.stop_token_ids = (special_token_id(tokenizer, RETURN_TOKEN), special_token_id(tokenizer, CALL_TOKEN))
        # llguidance's EOS must not be a token our grammars use: it treats EOS specially (allowed in any
        # accepting state, refused by try_consume_tokens); the harmony stop tokens are ordinary terminals here.
        self.ll_tokenizer = llguidance.LLTokenizer(
            tokenizer.to_str(), n_vocab=vocab_size, eos_token=special_token_id(tokenizer, EOS_TOKEN)
        )
        self._cache: OrderedDict[StructuredOutputSpec, _CompiledGrammar] = OrderedDict()
        self._schema_errors: dict[tuple[str, bool], str | None] = {}
        self._lock = threading.Lock()
        self.num_compiled = 0  # cache misses, for tests and metrics

    def new_state(self, spec: StructuredOutputSpec) -> StructuredOutputState:
        """A fresh matcher for one request. Raises `StructuredOutputError` for an invalid/unsupported schema."""
        compiled = self.compile(spec)
        return StructuredOutputState(compiled.matcher.deep_copy(), self.vocab_size, self.stop_token_ids)

    def compile(self, spec: StructuredOutputSpec) -> _CompiledGrammar:
        """The compiled grammar of `spec` (cached by the spec's content)."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        # Check each schema on its own first, so that an error names the field it came from.
        if spec.final_schema is not None and spec.allow_final:
            self._check_schema(spec.final_schema, spec.strict, spec.final_param)
        for tool in spec.tools:
            if tool.schema is not None:
                self._check_schema(tool.schema, True, tool.param)
        grammar = harmony_grammar(spec)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=PARSER_LIMITS)
        if matcher.is_error():
            raise StructuredOutputError(spec.final_param, f"cannot compile the grammar: {matcher.get_error()}")
        compiled = _CompiledGrammar(grammar, matcher)
        with self._lock:
            self.num_compiled += 1
            self._cache[spec] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _check_schema(self, schema_json: str, strict: bool, param: str) -> None:
        key = (schema_json, strict)
        with self._lock:
            known = key in self._schema_errors
            error = self._schema_errors.get(key)
        if not known:
            error = self._schema_error(schema_json, strict)
            with self._lock:
                if len(self._schema_errors) >= 4 * self.cache_size:
                    self._schema_errors.clear()
                self._schema_errors[key] = error
        if error is not None:
            raise StructuredOutputError(param, error)

    def _schema_error(self, schema_json: str, strict: bool) -> str | None:
        """None if llguidance accepts the schema, else a message naming what is wrong or unsupported."""
        too_large = excessive_minimum(json.loads(schema_json))
        if too_large is not None:
            return too_large
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json_with_options(schema_json, strict))
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.ll_tokenizer, limits=PARSER_LIMITS
        )
        if is_error:
            detail = messages[0].split("\n")[0] if messages else "unknown error"
            detail = detail.removeprefix("failed to compile JSON schema: ")
            return f"unsupported or invalid JSON Schema: {detail}"
        if messages:
            logger.info("JSON Schema compiled leniently: %s", "; ".join(messages))
        return None


# --------------------------------------------------------------------------------------------------------
# Batched bitmasks: fill on the host (in parallel, off the main thread), apply on the device
# --------------------------------------------------------------------------------------------------------


def bitmask_width(vocab_size: int) -> int:
    """Words per bitmask row: ceil(V / 32)."""
    return (vocab_size + 31) // 32


def allocate_token_bitmask(num_rows: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """An all-allowed host bitmask, int32 `[num_rows, ceil(V/32)]` (pinned for async copies to a GPU)."""
    return torch.full((num_rows, bitmask_width(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory)


def _check_bitmask(bitmask: torch.Tensor, vocab_size: int) -> None:
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.device.type != "cpu":
        raise ValueError(f"bitmask must be a CPU int32 [rows, words] tensor, got {bitmask.dtype} {bitmask.shape}")
    if bitmask.shape[1] != bitmask_width(vocab_size) or not bitmask.is_contiguous():
        raise ValueError(f"bitmask must be contiguous with {bitmask_width(vocab_size)} words per row")


def fill_token_bitmasks(
    states: Sequence[StructuredOutputState], bitmask: torch.Tensor, executor: llguidance.LLExecutor | None = None
) -> None:
    """Row i of `bitmask` (CPU int32 `[>= len(states), W]`) <- the allowed next tokens of `states[i]`.

    With an executor, the rows are computed in parallel by llguidance's thread pool, without the GIL.
    """
    if not states:
        return
    _check_bitmask(bitmask, states[0].vocab_size)
    if bitmask.shape[0] < len(states):
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(states)} states")
    if executor is None or len(states) == 1:
        for row, state in enumerate(states):
            state.fill_bitmask(bitmask, row)
        return
    live = [(state._matcher, row) for row, state in enumerate(states) if not state._needs_fallback()]
    if live:
        executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
    for row, state in enumerate(states):
        if state._needs_fallback():
            state._fill_fallback(bitmask[row])


class BitmaskWorker:
    """Computes a step's bitmasks on a worker thread, so that it overlaps the forward pass.

    Per step: accept last step's tokens into the states, `future = worker.submit(states)`, launch the forward,
    then `bitmask = future.result()` before sampling. The result is a view of one of two pinned host buffers
    (used alternately), valid until the next-but-one `submit`; copy it to the device with `non_blocking=True`.
    """

    def __init__(self, vocab_size: int, max_rows: int = 256, num_threads: int | None = None) -> None:
        """`num_threads`: llguidance's pool for the rows (default: half the CPUs, at most 16); 1 fills the rows
        one after the other on the worker thread (on a 2-core host the pool only adds dispatch latency)."""
        self.vocab_size = vocab_size
        pin = torch.cuda.is_available()
        self._buffers = [allocate_token_bitmask(max_rows, vocab_size, pin_memory=pin) for _ in range(2)]
        self._next_buffer = 0
        if num_threads is None:
            num_threads = min(16, (os.cpu_count() or 1) // 2)
        self._executor = llguidance.LLExecutor(num_threads) if num_threads > 1 else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-bitmask")

    def submit(self, states: Sequence[StructuredOutputState]) -> Future[torch.Tensor]:
        """Start filling the bitmasks of `states` (row i for states[i]); the future gives int32 `[len(states), W]`."""
        num_rows = len(states)
        if num_rows > self._buffers[0].shape[0]:  # grow both buffers (rare: more structured rows than planned)
            pin = self._buffers[0].is_pinned()
            self._buffers = [allocate_token_bitmask(num_rows, self.vocab_size, pin_memory=pin) for _ in range(2)]
        buffer = self._buffers[self._next_buffer][:num_rows]
        self._next_buffer ^= 1
        states = list(states)

        def fill() -> torch.Tensor:
            fill_token_bitmasks(states, buffer, self._executor)
            return buffer

        return self._thread.submit(fill)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 `[R, ceil(V/32)]` bitmask (any device) -> bool `[R, vocab_size]` allowed-token mask.

    Works on the bytes of the little-endian words (1-byte temporaries, not 4): byte j of a row holds tokens
    8j .. 8j + 7, lowest bit first. On the CPU numpy's `unpackbits` does it (about 15x faster than torch ops).
    """
    if sys.byteorder != "little":  # pragma: no cover - every supported host and GPU is little-endian
        raise RuntimeError("unpack_token_bitmask assumes little-endian int32 words")
    width = bitmask.shape[1]
    if vocab_size > 32 * width:
        raise ValueError(f"a bitmask of {width} words covers {32 * width} tokens, not {vocab_size}")
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [R, 4W]
    if bitmask.device.type == "cpu":
        bits = np.unpackbits(as_bytes.numpy(), axis=-1, count=vocab_size, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    return _unpack_bytes_torch(as_bytes, vocab_size)


def _unpack_bytes_torch(as_bytes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """uint8 `[R, 4W]` -> bool `[R, vocab_size]` with tensor ops (the GPU path)."""
    shifts = _BIT_SHIFTS.get(as_bytes.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[as_bytes.device] = torch.arange(8, dtype=torch.uint8, device=as_bytes.device)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1  # [R, 4W, 8] uint8
    return bits.view(as_bytes.shape[0], -1)[:, :vocab_size].bool()


def allowed_token_mask_for_batch(
    bitmask: torch.Tensor, rows: torch.Tensor, num_rows: int, vocab_size: int
) -> torch.Tensor:
    """The sampler's bool `[num_rows, V]` mask: all True, except the constrained `rows` [R] from `bitmask` [R, W]."""
    mask = torch.ones(num_rows, vocab_size, dtype=torch.bool, device=bitmask.device)
    mask[rows] = unpack_token_bitmask(bitmask, vocab_size)
    return mask
