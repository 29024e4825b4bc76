"""The async engine: one background thread owns the model and runs the step loop; asyncio code streams.

Public API (for the server):

    engine = AsyncEngine(EngineArgs(model=path, ...))    # loads the model, starts the loop thread
    # or AsyncEngine.from_llm_engine(llm_engine) to wrap one already built

    stream = engine.add_request(request_id, prompt_token_ids, sampling_params)   # call inside the event loop
    async with contextlib.aclosing(stream):                # guarantees the abort if the consumer stops early
        async for out in stream:                          # one RequestOutput per step with new tokens
            out.new_token_ids, out.text_delta, out.new_logprobs        # this step's delta
            out.token_ids, out.text, out.num_output_tokens              # cumulative
            out.num_prompt_tokens, out.num_cached_tokens               # prompt size, prefix-cache hits
            out.finished, out.finish_reason, out.stop_reason            # last output: finished is True
    engine.abort(request_id)        # finishes it ("abort") and frees its KV blocks on the loop's next turn
    engine.is_alive()               # False once shut down or if the loop thread died
    engine.metrics()                # MetricsSnapshot (engine/metrics.py): running/waiting, KV blocks, totals, tokens/s
    engine.shutdown()               # stop the loop; pending streams raise EngineDeadError

`add_request` itself is synchronous and raises at once, before anything is queued:
  - `PromptTooLongError` (ValueError): longer than the context or the whole KV cache -> HTTP 400.
  - `InvalidRequestError` / `SamplingParamsError` (ValueError): bad token ids, bad parameters, id in use -> 400.
  - `EngineOverloadedError`: more than `max_num_waiting` requests wait already -> 429 / 503.
  - `EngineDeadError`: the engine is not running -> 503.
While streaming, the iterator raises `RequestFailedError` if the request failed inside the engine (e.g. the
model step raised: the requests of that step fail, the loop goes on) and `EngineDeadError` if the engine
stopped. An aborted request ends with an output whose finish_reason is "abort". Leaving the `async for`
early, or cancelling the task that iterates, aborts the request (with `aclosing`, at once, even before the
first output; otherwise when the stream is garbage-collected).

Threading: the loop thread is the only one touching the scheduler, block manager and model. Requests and
aborts reach it through a thread-safe queue; outputs come back with `loop.call_soon_threadsafe` into one
asyncio.Queue per request. The loop blocks on its queue when there is nothing to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any

import torch
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, RequestFailedError
from gptoss.engine.llm_engine import LLMEngine
from gptoss.engine.metrics import MetricsSnapshot
from gptoss.engine.outputs import RequestOutput
from gptoss.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class _OutputStream:
    """The outputs of one request, as an async iterator. Closing it (`aclose`, or garbage collection) or
    cancelling the task waiting on it aborts the request unless it has finished, even before its first output
    (an async generator's `finally` would not run then)."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self._engine = engine
        self._request_id = request_id
        self._stream = stream
        self._finished = False

    def __aiter__(self) -> _OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        try:
            item = await self._stream.queue.get()
        except BaseException:  # cancelled: nobody will read this request's outputs
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._finished = item.finished
        return item

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            self._engine.abort(self._request_id)

    def __del__(self) -> None:
        if not getattr(self, "_finished", True):
            self._engine.abort(self._request_id)


class AsyncEngine:
    """See the module docstring."""

    def __init__(self, args: EngineArgs | None = None, *, engine: LLMEngine | None = None) -> None:
        if (args is None) == (engine is None):
            raise ValueError("give exactly one of args or engine")
        self.engine = engine if engine is not None else LLMEngine(args)  # type: ignore[arg-type]
        self.max_num_waiting = self.engine.args.max_num_waiting
        self.engine.warm_up_grammar_compiler()  # the server's first constrained request should not wait for it
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._metrics = self.engine.metrics_snapshot()
        self._num_running = 0
        self._stopped = threading.Event()
        self._dead_reason: str | None = None
        self._owns_engine = engine is None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()
        add_fatal_listener = getattr(self.engine, "add_fatal_listener", None)
        if add_fatal_listener is not None:
            add_fatal_listener(self._on_fatal)

    @classmethod
    def from_llm_engine(cls, engine: LLMEngine) -> AsyncEngine:
        return cls(engine=engine)

    # ---- public API (event-loop side) -------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: SequenceABC[int],
        sampling_params: SamplingParams | None = None,
        logits_mask_fn: Callable[[list[int]], Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; returns the async iterator of its outputs. Raises at once (see module docstring).

        Structured output is `sampling_params.structured_output` (an invalid schema raises here). `logits_mask_fn`
        (optional, a further constraint): called on the engine thread before each sampled token with the
        output token ids so far; returns a bool tensor [vocab] of allowed tokens, or None.
        """
        if not self.is_alive():
            raise EngineDeadError(self._dead_reason or "the engine is shut down")
        if sampling_params is None:
            sampling_params = SamplingParams()
        prompt_token_ids = list(prompt_token_ids)
        self.engine.validate_request(prompt_token_ids, sampling_params)
        loop = asyncio.get_running_loop()
        with self._streams_lock:
            # Checked under the lock: the loop's exit sets `_stopped` before it fails the streams it holds.
            if self._stopped.is_set():
                raise EngineDeadError(self._dead_reason or "the engine is shut down")
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            num_waiting = len(self._streams) - self._num_running
            if num_waiting >= self.max_num_waiting:
                raise EngineOverloadedError(f"{num_waiting} requests are already waiting; retry later")
            stream = _Stream(loop, asyncio.Queue())
            self._streams[request_id] = stream
        self._inbox.put(("add", (request_id, prompt_token_ids, sampling_params, logits_mask_fn)))
        return _OutputStream(self, request_id, stream)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or done). Its blocks are freed on the loop's next turn."""
        if self.is_alive():
            self._inbox.put(("abort", request_id))

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    @property
    def num_in_flight(self) -> int:
        """Requests added and not yet finished (running or waiting): the load a router balances."""
        return len(self._streams)

    def compile_grammar(self, spec: Any) -> None:
        """Compile a structured-output spec into the engine's grammar cache now, from any thread (the server's
        preparation pool), so that `add_request` on the event loop finds it compiled. Raises
        `StructuredOutputError` for a bad schema."""
        self.engine.grammar_compiler.compile(spec)

    def unhealthy_reason(self) -> str | None:
        """None while the engine serves; else why not: its loop stopped, or its recent steps all failed."""
        if not self.is_alive():
            return self._dead_reason or "the engine is shut down"
        return self.engine.unhealthy_reason()

    def metrics(self) -> MetricsSnapshot:
        """The snapshot taken after the latest step (cheap; no locking)."""
        return self._metrics

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop thread; unfinished streams raise EngineDeadError. An engine built here is shut down too
        (its tensor-parallel workers stop) once the loop has exited."""
        self._stopped.set()
        self._inbox.put(("stop", None))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._owns_engine and not self._thread.is_alive():
                self.engine.shutdown()

    def _on_fatal(self, reason: str) -> None:
        """The engine cannot step any more (a worker died or hung): fail every stream now, even if the loop
        thread is stuck in a collective, and refuse new requests (`is_alive` turns False: /health 503)."""
        self._dead_reason = reason
        with self._streams_lock:
            self._stopped.set()
            streams = list(self._streams)
        for request_id in streams:
            self._deliver(request_id, EngineDeadError(reason), final=True)
        self._inbox.put(("stop", None))

    # ---- the loop (engine thread) -----------------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, final: bool) -> None:
        with self._streams_lock:
            stream = self._streams.get(request_id)
            if stream is not None and final:
                del self._streams[request_id]
        if stream is None:
            return
        # RuntimeError: the consumer's event loop is closed, nobody is listening.
        with contextlib.suppress(RuntimeError):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _publish_metrics(self) -> None:
        self._num_running = len(self.engine.scheduler.running)
        self._metrics = self.engine.metrics_snapshot()

    def _handle_inbox_item(self, kind: str, payload: Any) -> None:
        if kind == "add":
            request_id, prompt_token_ids, sampling_params, logits_mask_fn = payload
            with self._streams_lock:
                alive = request_id in self._streams
            if not alive:  # aborted before it reached the loop
                return
            try:
                self.engine.add_request(request_id, prompt_token_ids, sampling_params, logits_mask_fn=logits_mask_fn)
            except Exception as exc:  # a bad request must not kill the loop
                self._deliver(request_id, exc, final=True)
        elif kind == "abort":
            out = self.engine.abort_request(payload)
            self._publish_metrics()
            if out is not None:
                self._deliver(payload, out, final=True)
            else:
                with self._streams_lock:
                    self._streams.pop(payload, None)

    def _run(self) -> None:
        device = getattr(getattr(self.engine, "runner", None), "device", None)
        if device is not None and device.type == "cuda":
            # CUDA's current device is per thread: this one's must be the model's (cuda:1 for a replica there),
            # or kernels would launch on cuda:0.
            torch.cuda.set_device(device)
        try:
            while not self._stopped.is_set():
                block = not self.engine.has_unfinished_requests()
                try:
                    kind, payload = self._inbox.get(block=block, timeout=0.5 if block else None)
                    if kind == "stop":
                        break
                    self._handle_inbox_item(kind, payload)
                    while True:  # drain whatever else arrived
                        kind, payload = self._inbox.get_nowait()
                        if kind == "stop":
                            return
                        self._handle_inbox_item(kind, payload)
                except queue.Empty:
                    pass
                if not self.engine.has_unfinished_requests():
                    continue
                outputs = self.engine.step()
                # Publish first: a consumer that sees its request finish also sees its blocks freed.
                self._publish_metrics()
                for out in outputs:
                    if out.finish_reason == "error":
                        self._deliver(out.request_id, RequestFailedError(out.error or "request failed"), final=True)
                    else:
                        self._deliver(out.request_id, out, final=out.finished)
        except BaseException as exc:  # a bug in the engine itself: report it to everyone waiting
            logger.exception("engine loop crashed")
            self._dead_reason = f"engine loop crashed: {type(exc).__name__}: {exc}"
        finally:
            self._stopped.set()
            reason = self._dead_reason or "the engine was shut down"
            try:  # free every block, so a wrapped LLMEngine can be reused
                for request_id in list(self.engine.requests):
                    self.engine.abort_request(request_id)
            except Exception:
                logger.exception("could not abort the remaining requests")
            with self._streams_lock:
                streams = list(self._streams)
            for request_id in streams:
                self._deliver(request_id, EngineDeadError(reason), final=True)
