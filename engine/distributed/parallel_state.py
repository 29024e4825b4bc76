"""Process groups of one tensor-parallel engine, passed explicitly (`ParallelContext`), never held in globals.

Two groups per engine, as vLLM has them:
- the device group (NCCL on CUDA, gloo on CPU): the model's collectives on activations;
- the CPU group (gloo, TCP): rank 0 broadcasts each step's plan (host tensors, pickled) to the other ranks,
  without a device round trip, and the ranks agree on host values (the KV block count).

Processes come from `gptoss serve --tensor-parallel-size N` itself (rank 0 is the server, it spawns ranks
1..N-1, see engine/worker/tp_worker.py) or from `torchrun`, whose environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) `torchrun_env` reads; every node then runs the same command.
"""

from __future__ import annotations

import os
import pickle
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Ranks other than 0 wait in a broadcast for the next step plan, for as long as the server has no request.
# gloo's default timeout (30 min) would kill an idle server; a dead peer still fails the wait at once
# (its TCP connection closes), which is how faults are noticed.
IDLE_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in its tensor-parallel engine. `device_group` None with world_size 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and runs the grammar; the others execute its plans."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device of this rank: `cuda:I` (`cuda` is `cuda:0`), the replica's first GPU, becomes
        `cuda:I+LOCAL_RANK`."""
        if requested.type == "cuda":
            return torch.device("cuda", (requested.index or 0) + self.local_rank)
        return requested


SINGLE = ParallelContext()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def free_tcp_port() -> int:
    """A port free on this host now (for the single-node rendezvous of spawned workers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun (or any launcher setting its variables)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world_size, int(os.environ.get("LOCAL_RANK", rank))


def init_parallel(
    rank: int, world_size: int, local_rank: int, device: torch.device, init_method: str = "env://"
) -> ParallelContext:
    """Join the engine's process groups (every rank calls this with the same `init_method`)."""
    if world_size == 1:
        return SINGLE
    if device.type == "cuda":
        # NCCL binds the communicator to the current device; set it before the first collective.
        torch.cuda.set_device(ParallelContext(local_rank=local_rank).device(device))
    backend = backend_for(device)
    # The step-plan wait happens on a gloo group: only that one needs the idle timeout (NCCL keeps its own).
    timeout = IDLE_TIMEOUT if backend == "gloo" else None
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    device_group = dist.group.WORLD
    cpu_group = device_group if backend == "gloo" else dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    context = ParallelContext(rank, world_size, local_rank, device_group, cpu_group)
    if backend == "nccl":
        # NCCL builds its communicator at the first collective, which must not be inside a CUDA graph capture
        # (the decode graphs hold the model's collectives): make it now.
        warmup = torch.zeros(1, device=context.device(device))
        dist.all_reduce(warmup, group=device_group)
        torch.cuda.synchronize(warmup.device)
    return context


def destroy_parallel(ctx: ParallelContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# A step plan fits this buffer unless the batch is large: then one more broadcast carries it whole.
OBJECT_BUFFER_BYTES = 1 << 16
_LENGTH_BYTES = 8


def broadcast_object(obj: object, ctx: ParallelContext) -> object:
    """Rank 0's `obj` on every rank, pickled over the CPU group: one broadcast of a fixed-size buffer (length,
    then the pickle) when it fits, which is every decode step's plan; torch's `broadcast_object_list` would
    always take two (size, then payload)."""
    buffer = torch.empty(OBJECT_BUFFER_BYTES, dtype=torch.uint8)
    payload = b""
    if ctx.is_driver:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        buffer[:_LENGTH_BYTES] = torch.frombuffer(
            bytearray(len(payload).to_bytes(_LENGTH_BYTES, "little")), dtype=torch.uint8
        )
        if _LENGTH_BYTES + len(payload) <= OBJECT_BUFFER_BYTES:
            buffer[_LENGTH_BYTES : _LENGTH_BYTES + len(payload)] = torch.frombuffer(
                bytearray(payload), dtype=torch.uint8
            )
    dist.broadcast(buffer, src=0, group=ctx.cpu_group)
    length = int.from_bytes(buffer[:_LENGTH_BYTES].numpy().tobytes(), "little")
    if _LENGTH_BYTES + length <= OBJECT_BUFFER_BYTES:
        data = buffer[_LENGTH_BYTES : _LENGTH_BYTES + length]
    else:
        data = (
            torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            if ctx.is_driver
            else torch.empty(length, dtype=torch.uint8)
        )
        dist.broadcast(data, src=0, group=ctx.cpu_group)
    return obj if ctx.is_driver else pickle.loads(data.numpy().tobytes())


def min_over_ranks(values: dict[str, int], ctx: ParallelContext) -> dict[str, int]:
    """Each value's minimum over the ranks (e.g. KV blocks: every rank must hold as many as rank 0 hands out)."""
    if ctx.world_size == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.cpu_group)
    return dict(zip(keys, (int(v) for v in t.tolist()), strict=True))
