"""The one adapter between the engine and the API modules: token ids in, API-neutral events out.

    events = generate_harmony(state, prompt_token_ids, params, prefill_token_ids=..., stop=...)
    async for event in events:   # ReasoningDelta | ContentDelta | ToolCallStarted | ToolCallArgumentsDelta
        ...                      # | ToolCallDone | Finished (always last, with usage and finish reason)

`HarmonyEventStream` is the pure part (no engine): fed completion token ids one at a time, it drives the
harmony streaming parser and says what each token added: analysis-channel text is reasoning; final-channel
text (and commentary preambles) is content; a message addressed to `functions.NAME` is a tool call whose
content streams as argument deltas. It also counts reasoning tokens and applies stop strings to the content
only (so a stop string cannot match inside a channel name or the reasoning).

`submit` calls `engine.add_request` right away (so overload or a too-long prompt is an HTTP status, not an
error inside a started stream) and `engine_outputs` times the outputs for the metrics and aborts the request
on every early exit (client gone, stop string, error), which frees its KV blocks. `Admission` counts
requests in flight and answers 429 past `max_queue`.

`Collected` folds an event stream into a whole result (non-streaming answers); `merge_streams` interleaves
the streams of `n` choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gptoss.engine.harmony.parser import tool_name
from gptoss.engine.harmony.render import HarmonyEncoding
from gptoss.engine.outputs import TokenLogprob
from gptoss.engine.sampling_params import SamplingParams
from gptoss.server.errors import APIError, overloaded
from gptoss.server.state import ServerState

# ---------------------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def openai(self) -> dict[str, Any]:
        """Chat Completions / legacy Completions usage object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    def responses(self) -> dict[str, Any]:
        """Responses API usage object."""
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ContentDelta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ToolCallStarted:
    index: int
    call_id: str
    name: str


@dataclass
class ToolCallArgumentsDelta:
    index: int
    delta: str


@dataclass
class ToolCallDone:
    index: int
    call_id: str
    name: str
    arguments: str


@dataclass
class Finished:
    """Last event. `finish_reason`: "stop", "length", "tool_calls" (or "abort")."""

    finish_reason: str
    usage: Usage


Event = ReasoningDelta | ContentDelta | ToolCallStarted | ToolCallArgumentsDelta | ToolCallDone | Finished


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# ---------------------------------------------------------------------------------------------------------
# Token ids -> events (pure)
# ---------------------------------------------------------------------------------------------------------


class HarmonyEventStream:
    """Completion tokens -> events, one token at a time (see the module docstring).

    `prefill_token_ids` are completion tokens the server put at the end of the prompt (e.g. a forced tool-call
    header `<|channel|>commentary to=functions.f <|constrain|>json<|message|>`): the parser sees them first,
    they count as neither output nor usage.
    """

    def __init__(
        self, encoding: HarmonyEncoding, prefill_token_ids: Sequence[int] = (), stop: Sequence[str] = ()
    ) -> None:
        self.parser = encoding.stream_parser("assistant")
        self.stop_strings = [s for s in stop if s]
        self.num_tokens = 0
        self.reasoning_tokens = 0
        self.stopped = False  # a stop string matched: the caller ends the request
        self.content = ""  # content emitted so far
        self._held = ""  # content held back: it may be the start of a stop string
        self._held_logprobs: list[TokenLogprob] = []
        self.tool_calls: list[ToolCallDone] = []
        self._open_call: ToolCallStarted | None = None
        # The prefill is a header: it can only open a tool call, whose start is emitted with the first events.
        self._prefilling = True
        for token_id in prefill_token_ids:
            self.feed(token_id)
        self._prefilling = False
        self._prefill_events: list[Event] = [self._open_call] if self._open_call is not None else []

    def take_prefill_events(self) -> list[Event]:
        """Events the prefill produced (a forced tool call's `ToolCallStarted`), once."""
        events, self._prefill_events = self._prefill_events, []
        return events

    def feed(self, token_id: int, logprob: TokenLogprob | None = None) -> list[Event]:
        """One completion token -> what it added (possibly nothing)."""
        if self.stopped:
            return []
        if not self._prefilling:
            self.num_tokens += 1
        event = self.parser.process(token_id)
        kind = event.kind
        if not self._prefilling and kind == "reasoning" and (event.text or not event.message_done):
            self.reasoning_tokens += 1
        events: list[Event] = []
        if event.message_started and kind == "tool_call":
            self._open_call = ToolCallStarted(len(self.tool_calls), new_call_id(), tool_name(event.recipient or ""))
            if not self._prefilling:
                events.append(self._open_call)
        if event.text:
            if kind == "tool_call" and self._open_call is not None:
                events.append(ToolCallArgumentsDelta(self._open_call.index, event.text))
            elif kind == "reasoning":
                events.append(ReasoningDelta(event.text))
            else:
                events += self._content(event.text, logprob)
        elif (
            logprob is not None
            and kind in ("final", "commentary")
            and not event.message_started
            and event.message_done is None
        ):
            self._held_logprobs.append(logprob)  # a partial UTF-8 character: its logprob rides on the next text
        if event.message_done is not None and kind == "tool_call" and self._open_call is not None:
            call = self._open_call
            done = ToolCallDone(call.index, call.call_id, call.name, event.message_done.text)
            self.tool_calls.append(done)
            events.append(done)
            self._open_call = None
        return events

    def _content(self, text: str, logprob: TokenLogprob | None) -> list[Event]:
        if logprob is not None:
            self._held_logprobs.append(logprob)
        if not self.stop_strings:
            self.content += text
            logprobs, self._held_logprobs = self._held_logprobs, []
            return [ContentDelta(text, logprobs)]
        pending = self._held + text
        hits = [(pending.find(s), s) for s in self.stop_strings if s in pending]
        if hits:
            cut = min(i for i, _ in hits)
            self.stopped = True
            self._held = ""
            return self._emit(pending[:cut])
        # Hold back the longest tail of `pending` that could still grow into a stop string.
        keep = 0
        for s in self.stop_strings:
            for length in range(min(len(s) - 1, len(pending)), 0, -1):
                if pending.endswith(s[:length]):
                    keep = max(keep, length)
                    break
        self._held = pending[len(pending) - keep :] if keep else ""
        return self._emit(pending[: len(pending) - keep])

    def _emit(self, text: str) -> list[Event]:
        if not text:
            return []
        self.content += text
        logprobs, self._held_logprobs = self._held_logprobs, []
        return [ContentDelta(text, logprobs)]

    def finish(self, engine_finish_reason: str | None, usage: Usage) -> list[Event]:
        """The completion is over: flush held content, close an open tool call, then `Finished`."""
        events: list[Event] = []
        if not self.stopped:
            event = self.parser.finish()
            if event.message_done is not None and self._open_call is not None:
                call = self._open_call
                done = ToolCallDone(call.index, call.call_id, call.name, event.message_done.text)
                self.tool_calls.append(done)
                events.append(done)
                self._open_call = None
            if self._held:
                events += self._emit(self._held)
                self._held = ""
        usage.reasoning_tokens = self.reasoning_tokens
        usage.completion_tokens = self.num_tokens
        if engine_finish_reason == "length" and not self.stopped:
            reason = "length"
        elif self.tool_calls and not self.stopped:
            reason = "tool_calls"
        elif engine_finish_reason == "abort":
            reason = "abort"
        else:
            reason = "stop"
        events.append(Finished(reason, usage))
        return events


# ---------------------------------------------------------------------------------------------------------
# Engine calls
# ---------------------------------------------------------------------------------------------------------


class EngineRequestError(RuntimeError):
    """The engine failed a request mid-way (finish_reason "error")."""


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_prompt_length(state: ServerState, prompt_len: int, max_tokens: int, param: str) -> int:
    """Raise a 400 when the prompt leaves no room to generate; return max_tokens clamped to the context."""
    if prompt_len >= state.max_model_len:
        raise APIError(
            400,
            f"The prompt is {prompt_len} tokens long; this model's context is {state.max_model_len} tokens",
            param=param,
            code="context_length_exceeded",
            wai_code=3006,
            wai_status=413,
        )
    return max(0, min(max_tokens, state.max_model_len - prompt_len))


class Admission:
    """One generation request counted in flight; `admit` refuses past `max_queue` (429 + Retry-After).

    Streaming routes admit before answering (so a full server is a 429, not an error inside a 200 stream) and
    release when the stream ends; `release` is idempotent so it can run from both the stream's `finally` and
    the response's background task (which also covers a stream that never started).
    """

    def __init__(self, state: ServerState) -> None:
        if state.metrics.in_flight >= state.max_queue:
            raise overloaded(f"Too many requests in flight ({state.metrics.in_flight}); retry later")
        self._state = state
        self._held = True
        self._kept = False
        state.metrics.in_flight += 1

    def keep(self) -> None:
        """Leave the `with` block without releasing: a stream now owns this admission."""
        self._kept = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._state.metrics.in_flight -= 1

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._kept or exc_type is not None:
            self.release()


class Submitted:
    """The async iterator of a request already queued in the engine.

    `aclose()` aborts the request even when iteration never began (closing a never-started async generator
    does not run its `finally`, so the abort has to be sent here).
    """

    def __init__(self, state: ServerState, request_id: str, inner: AsyncIterator[Any]) -> None:
        self.state = state
        self.request_id = request_id
        self._inner = inner
        self._started = False

    def __aiter__(self) -> Submitted:
        return self

    async def __anext__(self) -> Any:
        self._started = True
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        if not self._started:
            self._started = True
            self.state.metrics.aborted_total += 1
            with contextlib.suppress(Exception):
                self.state.engine.abort(self.request_id)
        await self._inner.aclose()  # type: ignore[attr-defined]


def submit(
    state: ServerState, request_id: str, prompt_token_ids: list[int], params: SamplingParams, logits_mask_fn: Any = None
) -> AsyncIterator[Any]:
    """Queue a request in the engine now (its errors, e.g. overload or a prompt too long, raise here, before
    any response is started) and return its outputs wrapped by `engine_outputs`."""
    if logits_mask_fn is not None:
        stream = state.engine.add_request(request_id, prompt_token_ids, params, logits_mask_fn=logits_mask_fn)
    else:
        stream = state.engine.add_request(request_id, prompt_token_ids, params)
    return Submitted(state, request_id, engine_outputs(state, request_id, stream, len(prompt_token_ids)))


async def engine_outputs(
    state: ServerState, request_id: str, stream: AsyncIterator[Any], num_prompt_tokens: int
) -> AsyncIterator[Any]:
    """The engine's per-step outputs, timed for the metrics; aborts the request if the consumer leaves early
    (or never starts: the abort is also sent from `finally`, which runs when this generator is closed)."""
    metrics = state.metrics
    start = time.monotonic()
    last: float | None = None
    finished = False
    try:
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            async for output in stream:
                count = len(output.new_token_ids)
                if count:
                    now = time.monotonic()
                    if last is None:
                        metrics.ttft.observe(now - start)
                    else:
                        metrics.itl.observe((now - last) / count)
                    last = now
                    metrics.observe_tokens(count, now)
                if output.finished:
                    finished = True
                    metrics.e2e.observe(time.monotonic() - start)
                    metrics.prompt_tokens_total += num_prompt_tokens
                yield output
                if finished:
                    return
    finally:
        if not finished:
            metrics.aborted_total += 1
            with contextlib.suppress(Exception):
                state.engine.abort(request_id)


def generate_harmony(
    state: ServerState,
    prompt_token_ids: list[int],
    params: SamplingParams,
    *,
    prefill_token_ids: Sequence[int] = (),
    stop: Sequence[str] = (),
    request_id: str | None = None,
    logits_mask_fn: Any = None,
) -> AsyncIterator[Event]:
    """Submit a harmony completion now; return the async iterator of its events (the last is `Finished`).

    `prompt_token_ids` already end with `prefill_token_ids` (if any). `params.stop_token_ids` should hold
    `<|return|>` and `<|call|>` (see `harmony_sampling_params`). `logits_mask_fn` (structured outputs, see
    server/structured.py) is a callable per request (n choices need one each). Engine errors raise here.
    """
    request_id = request_id or new_request_id("gen")
    outputs = submit(state, request_id, prompt_token_ids, params, logits_mask_fn)
    return Submitted(state, request_id, _harmony_events(state, outputs, len(prompt_token_ids), prefill_token_ids, stop))


async def _harmony_events(
    state: ServerState,
    outputs: AsyncIterator[Any],
    num_prompt_tokens: int,
    prefill_token_ids: Sequence[int],
    stop: Sequence[str],
) -> AsyncIterator[Event]:
    events = HarmonyEventStream(state.encoding, prefill_token_ids, stop)
    usage = Usage(prompt_tokens=num_prompt_tokens)
    finish_reason: str | None = None
    async with contextlib.aclosing(outputs):  # type: ignore[type-var]
        for event in events.take_prefill_events():
            yield event
        async for output in outputs:
            usage.cached_tokens = output.num_cached_tokens
            new_logprobs = output.new_logprobs or []
            for i, token_id in enumerate(output.new_token_ids):
                for event in events.feed(token_id, new_logprobs[i] if i < len(new_logprobs) else None):
                    yield event
                if events.stopped:
                    break
            if events.stopped:
                break  # leaving the `async with` aborts the request in the engine
            if output.finished:
                finish_reason = output.finish_reason
    for event in events.finish(finish_reason, usage):
        yield event


def start_all(starters: list[Any]) -> list[Any]:
    """Call each zero-argument `starter` (each submits a request); if one raises, abort those started."""
    started: list[Any] = []
    try:
        for starter in starters:
            started.append(starter())
    except BaseException:
        for stream in started:
            close_soon(stream)
        raise
    return started


async def release_all(admission: Admission, streams: list[Any]) -> None:
    """Cleanup after a streamed response: free the admission, abort whatever is still running."""
    admission.release()
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.aclose()


_closing: set[asyncio.Future[Any]] = set()


def close_soon(stream: Any) -> None:
    """Close a `Submitted` stream from synchronous code (aborting its request if unfinished)."""
    future = asyncio.ensure_future(stream.aclose())
    _closing.add(future)  # keep a reference until done (the loop holds only weak ones)
    future.add_done_callback(_closing.discard)


def harmony_sampling_params(state: ServerState, **kwargs: Any) -> SamplingParams:
    """SamplingParams for a harmony completion: stops at `<|return|>` / `<|call|>`, keeps special tokens."""
    stop_ids = list(state.encoding.stop_token_ids)
    return SamplingParams(stop_token_ids=stop_ids, skip_special_tokens=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Folding and merging
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Collected:
    """A whole generation: what non-streaming answers are built from."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDone] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)

    def add(self, event: Event) -> None:
        if isinstance(event, ReasoningDelta):
            self.reasoning += event.text
        elif isinstance(event, ContentDelta):
            self.content += event.text
            self.logprobs += event.logprobs
        elif isinstance(event, ToolCallDone):
            self.tool_calls.append(event)
        elif isinstance(event, Finished):
            self.finish_reason = event.finish_reason
            self.usage = event.usage


async def collect(events: AsyncIterator[Event]) -> Collected:
    result = Collected()
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            result.add(event)
    return result


async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (index, item), in arrival order; closes them all on exit."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):  # type: ignore[type-var]
            async for item in streams[0]:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    await queue.put((index, item, None, False))
            await queue.put((index, None, None, True))
        except Exception as exc:
            await queue.put((index, None, exc, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_until_disconnect(request: Any, coro: Any, poll_s: float = 0.25) -> Any:
    """Await `coro`, cancelling it (which aborts its engine requests) if the HTTP client goes away."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise APIError(499, "client disconnected", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()
