"""Data parallel: `--data-parallel-size M` independent replicas of the engine behind one server.

Each replica is a process of its own: its rank 0, and with `--tensor-parallel-size N` the parent of its N-1
tensor-parallel workers, on GPUs `cuda:r*N .. cuda:r*N+N-1` (or the CPU). In the server process a
`ReplicaClient` stands in for the replica's `LLMEngine`: it forwards the calls `AsyncEngine` makes (add, step,
abort, validate) over pipes, so each replica gets an ordinary `AsyncEngine` (its own loop thread, streams,
aborts) and the server code is the same as with one engine. Each step's outputs come back pickled with the
replica's metrics; scheduling, sampling and the grammars run in the replica, in parallel with the others.

`DataParallelEngine` offers the server the `AsyncEngine` interface over the M replicas: a request goes to the
replica with the fewest requests in flight (ties to the lower index) and stays there (its KV cache, its grammar
state); aborts go to every replica (unknown ids are no-ops); `metrics()` sums the replicas' snapshots and
`replica_metrics()` gives each one's, for per-replica labels. `/health` is 200 while every replica runs.

Pipes per replica: `control` (one call at a time from the replica's loop thread: add, step, abort, ...),
`validation` (the synchronous checks `add_request` makes from the server's event loop, served by a thread of
the replica: `LLMEngine.validate_request` only reads immutable state) and `events` (the replica reports a fatal
error, e.g. one of its tensor-parallel workers died).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing.connection
import threading
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as SequenceABC
from typing import Any

import torch.multiprocessing as mp
from gptoss.engine.async_engine import AsyncEngine
from gptoss.engine.distributed.parallel_state import ParallelContext
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.errors import EngineDeadError, InvalidRequestError
from gptoss.engine.metrics import MetricsSnapshot
from gptoss.engine.outputs import RequestOutput
from gptoss.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STARTUP_POLL_S = 1.0
# A replica whose pipes closed is exiting; a killed process with a large heap can take seconds to be reaped on a
# loaded machine, and until then its exit code is unknown.
GONE_JOIN_S = 5.0


def replica_args(args: EngineArgs) -> list[EngineArgs]:
    """The EngineArgs of each replica: replica r on the r-th block of `tensor_parallel_size` GPUs."""
    device = args.resolve_device()
    replicas = []
    for r in range(args.data_parallel_size):
        if device.type == "cuda":
            replica_device = f"cuda:{(device.index or 0) + r * args.tensor_parallel_size}"
        else:
            replica_device = str(device)
        replicas.append(dataclasses.replace(args, data_parallel_size=1, device=replica_device))
    return replicas


def sum_snapshots(snapshots: list[MetricsSnapshot]) -> MetricsSnapshot:
    """One snapshot for all replicas: counters and gauges added (per block group), KV usage the highest."""
    total: dict[str, Any] = {}
    for field in dataclasses.fields(MetricsSnapshot):
        values = [getattr(s, field.name) for s in snapshots]
        if field.name == "kv_cache_usage":
            total[field.name] = max(values)
        elif field.name == "uptime_s":
            total[field.name] = min(values)
        elif isinstance(values[0], dict):
            merged: dict[str, Any] = {}
            for value in values:
                for key, count in value.items():
                    merged[key] = merged.get(key, 0) + count
            total[field.name] = merged
        else:
            total[field.name] = sum(values)
    return MetricsSnapshot(**total)


# ---- the replica process ------------------------------------------------------------------------------


def _state(engine: Any) -> tuple[bool, int, MetricsSnapshot, str | None]:
    """What the client caches after every call: unfinished requests?, running count, metrics, unhealthy reason."""
    running = len(engine.scheduler.running)
    return engine.has_unfinished_requests(), running, engine.metrics_snapshot(), engine.unhealthy_reason()


def _serve_validation(engine: Any, conn: multiprocessing.connection.Connection) -> None:
    while True:
        try:
            prompt_token_ids, sampling_params = conn.recv()
        except EOFError:
            return
        try:
            engine.validate_request(prompt_token_ids, sampling_params)
            conn.send(None)
        except Exception as exc:
            conn.send(exc)


def replica_main(
    args: EngineArgs,
    control: multiprocessing.connection.Connection,
    validation: multiprocessing.connection.Connection,
    events: multiprocessing.connection.Connection,
) -> None:
    """A replica: its LLMEngine (and tensor-parallel workers), serving the client's calls until told to stop
    or until the server goes away (the pipe closes)."""
    from gptoss.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(args)
    except Exception as exc:
        control.send(("error", exc))
        return
    engine.add_fatal_listener(events.send)
    runner = engine.runner
    summary = RunnerSummary(
        runner.device,
        runner.dtype,
        runner.weight_bytes,
        runner.kv_cache_bytes,
        runner.kv_caches,
        ParallelContext(world_size=runner.parallel.world_size),
    )
    info = {"max_model_len": engine.max_model_len, "vocab_size": engine.vocab_size, "config": engine.config}
    control.send(("ok", (info | {"runner": summary}, _state(engine))))
    threading.Thread(target=_serve_validation, args=(engine, validation), daemon=True, name="validation").start()

    def add_request(*call_args: Any) -> None:
        engine.add_request(*call_args)  # the Sequence stays here

    calls: dict[str, Callable[..., Any]] = {
        "add_request": add_request,
        "step": engine.step,
        "abort_request": engine.abort_request,
        "requests": lambda: list(engine.requests),
        "warm_up_grammar_compiler": engine.warm_up_grammar_compiler,
    }
    try:
        while True:
            try:
                method, call_args = control.recv()
            except EOFError:  # the server is gone
                return
            if method == "stop":
                return
            try:
                result = calls[method](*call_args)
                control.send(("ok", (result, _state(engine))))
            except Exception as exc:
                control.send(("error", exc))
    finally:
        engine.shutdown()


# ---- the server side ----------------------------------------------------------------------------------


@dataclasses.dataclass
class RunnerSummary:
    """What the server's banner reads of a replica's model runner (its rank 0). `kv_caches`: one empty
    (k, v) pair of the cache's dtype (the tensors stay in the replica)."""

    device: Any
    dtype: Any
    weight_bytes: int
    kv_cache_bytes: int
    kv_caches: list
    parallel: ParallelContext

    def __post_init__(self) -> None:
        self.kv_caches = [(k.new_empty(0, device="cpu"), v.new_empty(0, device="cpu")) for k, v in self.kv_caches[:1]]


class _SchedulerView:
    """The one scheduler attribute AsyncEngine reads (`len(scheduler.running)`), from the latest state."""

    def __init__(self) -> None:
        self.running: range = range(0)


class ReplicaClient:
    """An `LLMEngine` as `AsyncEngine` uses it, served by a replica process (see the module docstring)."""

    def __init__(self, args: EngineArgs, index: int) -> None:
        self.args = args
        self.index = index
        context = mp.get_context("spawn")
        self._control, control = context.Pipe()
        self._validation, validation = context.Pipe()
        events_in, events = context.Pipe(duplex=False)
        # Not a daemon: it may start tensor-parallel workers of its own. It exits when its pipes close.
        self.process = context.Process(
            target=replica_main, args=(args, control, validation, events), name=f"gptoss-dp-replica{index}"
        )
        self.process.start()
        for conn in (control, validation, events):
            conn.close()
        self._events = events_in
        self._control_lock = threading.Lock()
        self._validation_lock = threading.Lock()
        self.scheduler = _SchedulerView()
        self.fatal_error: str | None = None
        self._fatal_listeners: list[Callable[[str], None]] = []
        self._has_unfinished = False
        self._unhealthy: str | None = None
        self._metrics = MetricsSnapshot()
        self._info: dict[str, Any] | None = None
        self._stopping = False

    def wait_ready(self) -> None:
        """Block until the replica has loaded (or raise what stopped it)."""
        while not self._control.poll(STARTUP_POLL_S):
            if not self.process.is_alive():
                raise RuntimeError(
                    f"data-parallel replica {self.index} exited while loading (code {self.process.exitcode})"
                )
        kind, value = self._control.recv()
        if kind == "error":
            raise value
        self._info, state = value
        self._apply_state(state)
        self.max_model_len = self._info["max_model_len"]
        self.vocab_size = self._info["vocab_size"]
        self.config = self._info["config"]
        self.runner = self._info["runner"]
        threading.Thread(target=self._watch, daemon=True, name=f"dp-replica{self.index}-events").start()

    def _watch(self) -> None:
        """Report the replica's fatal errors, or its death, to the listeners (once)."""
        try:
            reason = self._events.recv()
        except EOFError:
            if self._stopping:  # shut down on purpose
                return
            reason = self._gone_reason()
        self._fail(str(reason))

    def _gone_reason(self) -> str:
        """Why the replica's pipes closed: its exit code when it has exited (it has, or soon will)."""
        self.process.join(GONE_JOIN_S)
        if self.process.exitcode is None:
            return f"data-parallel replica {self.index} stopped answering"
        return f"data-parallel replica {self.index} exited (code {self.process.exitcode})"

    def _fail(self, reason: str) -> None:
        if self.fatal_error is not None:
            return
        self.fatal_error = reason
        for listener in list(self._fatal_listeners):
            try:
                listener(reason)
            except Exception:
                logger.exception("fatal-error listener failed")

    def add_fatal_listener(self, listener: Callable[[str], None]) -> None:
        self._fatal_listeners.append(listener)
        if self.fatal_error is not None:
            listener(self.fatal_error)

    def _apply_state(self, state: tuple[bool, int, MetricsSnapshot, str | None]) -> None:
        self._has_unfinished, num_running, self._metrics, self._unhealthy = state
        self.scheduler.running = range(num_running)

    def _call(self, method: str, *args: Any) -> Any:
        with self._control_lock:
            try:
                self._control.send((method, args))
                kind, value = self._control.recv()
            except (EOFError, OSError) as exc:
                self._fail(self._gone_reason())
                raise EngineDeadError(self.fatal_error or "replica gone") from exc
        if kind == "error":
            raise value
        result, state = value
        self._apply_state(state)
        return result

    # The LLMEngine methods AsyncEngine calls.

    def validate_request(self, prompt_token_ids: SequenceABC[int], sampling_params: Any) -> None:
        with self._validation_lock:
            try:
                self._validation.send((list(prompt_token_ids), sampling_params))
                error = self._validation.recv()
            except (EOFError, OSError) as exc:
                self._fail(self._gone_reason())
                raise EngineDeadError(self.fatal_error or "replica gone") from exc
        if error is not None:
            raise error

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: SequenceABC[int],
        sampling_params: SamplingParams | None = None,
        logits_mask_fn: Callable[[list[int]], Any] | None = None,
    ) -> None:
        if logits_mask_fn is not None:
            raise InvalidRequestError("logits_mask_fn cannot reach a data-parallel replica (another process)")
        self._call("add_request", request_id, list(prompt_token_ids), sampling_params)

    def step(self) -> list[RequestOutput]:
        return self._call("step")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        return self._call("abort_request", request_id)

    def has_unfinished_requests(self) -> bool:
        return self._has_unfinished

    def metrics_snapshot(self) -> MetricsSnapshot:
        return self._metrics

    def unhealthy_reason(self) -> str | None:
        """The replica engine's own (its recent steps all failed), as of its latest answer."""
        return self._unhealthy

    @property
    def requests(self) -> list[str]:
        return self._call("requests") if self.process.is_alive() else []

    def warm_up_grammar_compiler(self) -> None:
        self._call("warm_up_grammar_compiler")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the replica (it shuts its workers down) and wait for it."""
        self._stopping = True
        if self.process.is_alive():
            try:
                with self._control_lock:
                    self._control.send(("stop", ()))
            except (OSError, ValueError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)


class DataParallelEngine:
    """See the module docstring."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.clients = [ReplicaClient(replica, r) for r, replica in enumerate(replica_args(args))]
        self.replicas: list[AsyncEngine] = []
        try:
            for client in self.clients:  # they load in parallel; wait for each in turn
                client.wait_ready()
            self.replicas = [AsyncEngine(engine=client) for client in self.clients]  # type: ignore[arg-type]
        except BaseException:
            self.shutdown()
            raise
        # What the server reads from an engine: limits and vocabulary are the same in every replica.
        self.max_model_len = self.clients[0].max_model_len
        self.vocab_size = self.clients[0].vocab_size

    @property
    def engines(self) -> list[ReplicaClient]:
        """The replicas' engines (as the server process sees them)."""
        return self.clients

    def pick_replica(self) -> int:
        """The live replica with the fewest requests in flight (lowest index on ties)."""
        live = [r for r, replica in enumerate(self.replicas) if replica.is_alive()]
        if not live:
            raise EngineDeadError("no engine replica is running")
        return min(live, key=lambda r: (self.replicas[r].num_in_flight, r))

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: SequenceABC[int],
        sampling_params: SamplingParams | None = None,
        logits_mask_fn: Callable[[list[int]], Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """`AsyncEngine.add_request` on the least-loaded replica (raises as it does)."""
        replica = self.replicas[self.pick_replica()]
        return replica.add_request(request_id, prompt_token_ids, sampling_params, logits_mask_fn=logits_mask_fn)

    def abort(self, request_id: str) -> None:
        for replica in self.replicas:
            replica.abort(request_id)

    def is_alive(self) -> bool:
        """All replicas run (one down: /health 503, so that the deployment restarts the whole server)."""
        return bool(self.replicas) and all(replica.is_alive() for replica in self.replicas)

    def unhealthy_reason(self) -> str | None:
        """None while every replica serves; else the first replica's reason (the server's /health 503)."""
        for r, replica in enumerate(self.replicas):
            reason = replica.unhealthy_reason()
            if reason is not None:
                return f"replica {r}: {reason}"
        return None if self.replicas else "no engine replica is running"

    def replica_metrics(self) -> list[MetricsSnapshot]:
        return [replica.metrics() for replica in self.replicas]

    def metrics(self) -> MetricsSnapshot:
        return sum_snapshots(self.replica_metrics())

    def shutdown(self, timeout: float | None = 10.0) -> None:
        for replica in self.replicas:
            replica.shutdown(timeout)
        for client in self.clients:
            client.shutdown()
