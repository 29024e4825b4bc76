"""The engine as the server sees it: a typed `EngineClient` protocol, and submitting requests to it.

`EngineClient` is what the app depends on (`engine.async_engine.AsyncEngine` is one; tests use a scripted one).
`submit` calls `add_request` right away, so overload or a too-long prompt is an HTTP status rather than an
error inside a started stream, and returns a `Submitted` stream whose outputs are timed for the metrics; every
early exit (client gone, stop string, error, a stream never started) aborts the request, which frees its KV
blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from gptoss.engine.outputs import RequestOutput
from gptoss.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from gptoss.server.state import ServerState

T = TypeVar("T")


class EngineClient(Protocol):
    """What the server uses of `engine.async_engine.AsyncEngine`."""

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; raises at once (an `engine.errors.EngineError`) when it cannot be queued, e.g. for
        an invalid `sampling_params.structured_output` schema."""
        ...

    def abort(self, request_id: str) -> None: ...

    def is_alive(self) -> bool: ...

    def metrics(self) -> Any:
        """A metrics snapshot: a dict, or an object with `to_dict()`."""
        ...


class Submitted(Generic[T]):
    """The async iterator of a request already queued in the engine.

    `aclose()` aborts the request even when iteration never began (closing a never-started async generator
    does not run its `finally`, so the abort has to be sent here).
    """

    def __init__(self, state: ServerState, request_id: str, inner: AsyncIterator[T]) -> None:
        self.state = state
        self.request_id = request_id
        self._inner = inner
        self._started = False

    def __aiter__(self) -> Submitted[T]:
        return self

    async def __anext__(self) -> T:
        self._started = True
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        if not self._started:
            self._started = True
            self.state.metrics.aborted.inc()
            with contextlib.suppress(Exception):
                self.state.engine.abort(self.request_id)
        await self._inner.aclose()  # type: ignore[attr-defined]


def submit(
    state: ServerState,
    request_id: str,
    prompt_token_ids: list[int],
    params: SamplingParams,
) -> Submitted[RequestOutput]:
    """Queue a request in the engine now (its errors, e.g. overload or a prompt too long, raise here, before
    any response is started) and return its outputs, timed for the metrics."""
    stream = state.engine.add_request(request_id, prompt_token_ids, params)
    return Submitted(state, request_id, _timed_outputs(state, request_id, stream, len(prompt_token_ids)))


async def _timed_outputs(
    state: ServerState, request_id: str, stream: AsyncIterator[RequestOutput], num_prompt_tokens: int
) -> AsyncIterator[RequestOutput]:
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
                    metrics.prompt_tokens.inc(num_prompt_tokens)
                yield output
                if finished:
                    return
    finally:
        if not finished:
            metrics.aborted.inc()
            with contextlib.suppress(Exception):
                state.engine.abort(request_id)


def start_all(starters: list[Callable[[], Any]]) -> list[Any]:
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


_closing: set[asyncio.Future[Any]] = set()


def close_soon(stream: Any) -> None:
    """Close a `Submitted` stream from synchronous code (aborting its request if unfinished)."""
    future = asyncio.ensure_future(stream.aclose())
    _closing.add(future)  # keep a reference until done (the loop holds only weak ones)
    future.add_done_callback(_closing.discard)


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
