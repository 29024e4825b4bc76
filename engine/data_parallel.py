"""Data parallel: `--data-parallel-size M` independent replicas of the engine behind one server.

`DataParallelEngine` offers the server the `AsyncEngine` interface (add_request, abort, is_alive, metrics,
shutdown) over M `AsyncEngine`s, replica r on its own device (`cuda:r` after the first device given; the CPU
when there is no GPU). Each request goes to the replica with the fewest requests in flight (ties to the lower
index), so a burst spreads evenly and a replica slowed by long prompts gets fewer new ones; the request then
stays there (its KV cache, its structured-output state). Aborts go to every replica (unknown ids are no-ops).
`metrics()` sums the replicas' counters (gauges: sums, KV usage: the fullest replica); `replica_metrics()`
gives each replica's own snapshot for per-replica labels.

The replicas share this process: their loop threads step concurrently (the GPU work runs outside the GIL, the
scheduling and sampling in Python take turns), and their state (response store, queued batches) is the one
server's. A replica split over several GPUs (`--tensor-parallel-size` > 1) needs its rank 0 in a process of its
own (one torch.distributed world per process), which is not built yet: that combination is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as SequenceABC
from contextlib import nullcontext
from typing import Any

import torch
from gptoss.engine.async_engine import AsyncEngine
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.errors import EngineDeadError
from gptoss.engine.metrics import MetricsSnapshot
from gptoss.engine.outputs import RequestOutput
from gptoss.engine.sampling_params import SamplingParams


def replica_device(args: EngineArgs, replica: int) -> str:
    """Replica r's device: the r-th GPU from the one given (`cuda` = `cuda:0`), or the CPU."""
    device = args.resolve_device()
    if device.type != "cuda":
        return str(device)
    index = (device.index or 0) + replica
    if index >= torch.cuda.device_count():
        raise ValueError(f"replica {replica} needs cuda:{index}, but {torch.cuda.device_count()} GPUs are visible")
    return f"cuda:{index}"


def replica_args(args: EngineArgs) -> list[EngineArgs]:
    """The EngineArgs of each replica (validated: data parallel over single-GPU replicas only, for now)."""
    if args.tensor_parallel_size > 1:
        raise ValueError(
            "--data-parallel-size with --tensor-parallel-size > 1 is not supported yet: each replica's rank 0 "
            "would need its own process"
        )
    return [
        dataclasses.replace(args, data_parallel_size=1, device=replica_device(args, r))
        for r in range(args.data_parallel_size)
    ]


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


class DataParallelEngine:
    """See the module docstring."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.replicas: list[AsyncEngine] = []
        try:
            for replica in replica_args(args):
                # Built with its GPU current, so that the CUDA graphs are captured on it.
                on_device = torch.cuda.device(replica.device) if replica.device.startswith("cuda") else nullcontext()
                with on_device:
                    self.replicas.append(AsyncEngine(replica))
        except BaseException:
            self.shutdown()
            raise
        first = self.replicas[0].engine
        # What the server reads from an engine: limits and vocabulary are the same in every replica.
        self.max_model_len = first.max_model_len
        self.vocab_size = first.vocab_size

    @property
    def engines(self) -> list[Any]:
        """The replicas' `LLMEngine`s."""
        return [replica.engine for replica in self.replicas]

    def add_fatal_listener(self, listener: Callable[[str], None]) -> None:
        for r, engine in enumerate(self.engines):
            engine.add_fatal_listener(lambda reason, r=r: listener(f"replica {r}: {reason}"))

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

    def replica_metrics(self) -> list[MetricsSnapshot]:
        return [replica.metrics() for replica in self.replicas]

    def metrics(self) -> MetricsSnapshot:
        return sum_snapshots(self.replica_metrics())

    def shutdown(self, timeout: float | None = 10.0) -> None:
        for replica in self.replicas:
            replica.shutdown(timeout)
