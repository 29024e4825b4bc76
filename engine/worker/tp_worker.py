"""The ranks of a tensor-parallel engine other than rank 0, and how they are started.

Rank 0 (the process that schedules, samples and serves) broadcasts one `StepPlan` per step over the CPU group;
every other rank runs it on its share of the model (`ModelRunner.run_step`) and waits for the next. A `None`
plan ends the loop.

Starting them:
- one node: `TensorParallelWorkers(args, config)` in the rank-0 process spawns ranks 1..N-1 (torch
  multiprocessing, spawn start method; rendezvous on a free localhost port), one GPU each (`cuda:RANK`);
- several nodes: `torchrun` starts every rank; rank 0 runs the server as usual (`LLMEngine` joins the group
  from the environment), the others run `run_worker_from_env` (what `gptoss serve` does on ranks > 0).

Faults (spawned workers): a monitor thread in rank 0 waits on the workers' process sentinels (a death is seen
at once) and on their heartbeats (a thread in each worker stamps shared memory every `HEARTBEAT_S`; a process
that stops stamping for `HUNG_AFTER_S`, e.g. stopped or stuck holding the GIL, counts as hung) and calls
`on_failure(reason)` once. A worker whose peer dies fails its collective and exits non-zero. Under torchrun
there are no child processes to watch: a dead rank surfaces as a failed collective (gloo at once; NCCL at its
timeout) and torchrun's own supervision restarts the job.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import multiprocessing.process
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp
from gptoss.engine.distributed.parallel_state import (
    ParallelContext,
    broadcast_object,
    destroy_parallel,
    free_tcp_port,
    init_parallel,
    torchrun_env,
)
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.model.config import ModelConfig
from gptoss.engine.worker.model_runner import ModelRunner, StepPlan

logger = logging.getLogger(__name__)

# How long a clean shutdown waits for the workers before terminating them.
SHUTDOWN_TIMEOUT_S = 10.0
HEARTBEAT_S = 0.5  # a worker stamps its heartbeat this often
HUNG_AFTER_S = 10.0  # a worker silent for this long is reported hung (a long GIL-holding call must not count)


def serve_steps(runner: ModelRunner) -> None:
    """Run rank 0's step plans until it sends None (or a peer dies: the broadcast then raises)."""
    while True:
        wire = broadcast_object(None, runner.parallel)
        if wire is None:
            return
        runner.run_step(StepPlan.from_wire(wire))  # type: ignore[arg-type]


def _stamp_heartbeat(heartbeats: Any, rank: int) -> None:
    while True:
        heartbeats[rank] = time.time()
        time.sleep(HEARTBEAT_S)


def run_worker(
    rank: int, world_size: int, local_rank: int, args: EngineArgs, init_method: str, heartbeats: Any = None
) -> None:
    """One rank > 0: join the groups, load its share of the model and KV cache, execute plans until told to stop.

    `heartbeats`: a shared array of `world_size` doubles where this rank stamps the time (spawned workers)."""
    if heartbeats is not None:
        threading.Thread(target=_stamp_heartbeat, args=(heartbeats, rank), daemon=True, name="heartbeat").start()
    parallel = init_parallel(rank, world_size, local_rank, args.resolve_device(), init_method)
    try:
        runner = ModelRunner(args, ModelConfig.from_json(args.model), parallel)
        serve_steps(runner)
    finally:
        destroy_parallel(parallel)


def run_worker_from_env(args: EngineArgs) -> None:
    """A rank > 0 started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    env = torchrun_env()
    if env is None:
        raise RuntimeError("not started by torchrun: RANK and WORLD_SIZE are not set")
    rank, world_size, local_rank = env
    check_world_size(args, world_size)
    run_worker(rank, world_size, local_rank, args, "env://")


def is_torchrun_worker() -> bool:
    """True in a process that torchrun started as a rank other than 0."""
    env = torchrun_env()
    return env is not None and env[0] != 0


def check_world_size(args: EngineArgs, world_size: int) -> None:
    if world_size != args.tensor_parallel_size:
        raise ValueError(
            f"the launcher started {world_size} processes but --tensor-parallel-size is {args.tensor_parallel_size}"
        )


class TensorParallelWorkers:
    """Ranks 1..N-1 of this engine, and this process's `ParallelContext` (rank 0).

    Spawned here unless the process was started by torchrun (then the other ranks already run on their nodes).
    """

    def __init__(self, args: EngineArgs, on_failure: Callable[[str], None] | None = None) -> None:
        world_size = args.tensor_parallel_size
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.failure: str | None = None
        self._on_failure = on_failure
        self._stopping = threading.Event()
        self._failure_lock = threading.Lock()
        self.heartbeats: Any = []
        env = torchrun_env()
        if env is not None:
            rank, launched, local_rank = env
            check_world_size(args, launched)
            if rank != 0:
                raise RuntimeError(f"rank {rank} must run the worker loop (run_worker_from_env), not the engine")
            self.parallel = init_parallel(0, world_size, local_rank, args.resolve_device(), "env://")
            return
        init_method = f"tcp://127.0.0.1:{free_tcp_port()}"
        context = mp.get_context("spawn")
        # 0 until a worker's first stamp: starting up (importing torch, loading) is not hanging.
        self.heartbeats = context.Array("d", [0.0] * world_size, lock=False)
        for rank in range(1, world_size):
            process = context.Process(
                target=run_worker,
                args=(rank, world_size, rank, args, init_method, self.heartbeats),
                name=f"gptoss-tp-rank{rank}",
                daemon=True,  # never outlive the server, whatever way it exits
            )
            process.start()
            self.processes.append(process)
        logger.info("tensor parallel: rank 0 in pid %d, ranks 1..%d spawned", os.getpid(), world_size - 1)
        threading.Thread(target=self._monitor, daemon=True, name="tp-monitor").start()
        self.parallel: ParallelContext = init_parallel(0, world_size, 0, args.resolve_device(), init_method)

    def dead_ranks(self) -> list[int]:
        """Ranks whose process has exited (spawned workers only)."""
        return [rank for rank, p in enumerate(self.processes, start=1) if not p.is_alive()]

    def hung_ranks(self) -> list[int]:
        """Ranks whose heartbeat is older than `HUNG_AFTER_S` (once they have started stamping)."""
        now = time.time()
        beats = [(rank, self.heartbeats[rank]) for rank in range(1, len(self.processes) + 1)]
        return [rank for rank, beat in beats if beat > 0 and now - beat > HUNG_AFTER_S]

    def _monitor(self) -> None:
        """Report the first dead or hung worker through `on_failure` (see the module docstring)."""
        sentinels = [p.sentinel for p in self.processes]
        while not self._stopping.is_set():
            multiprocessing.connection.wait(sentinels, timeout=HEARTBEAT_S)
            if self._stopping.is_set():
                return
            if self.detect_failure() is not None:
                return

    def detect_failure(self) -> str | None:
        """Check the workers now; on the first dead or hung one, record why and report it (once)."""
        if self.failure is not None:
            return self.failure
        dead, hung = self.dead_ranks(), self.hung_ranks()
        if not dead and not hung:
            return None
        with self._failure_lock:
            if self.failure is None:
                codes = {rank: self.processes[rank - 1].exitcode for rank in dead}
                self.failure = (
                    f"tensor-parallel worker died (rank: exit code {codes})"
                    if dead
                    else f"tensor-parallel worker hung (ranks {hung}: no heartbeat for {HUNG_AFTER_S:.0f} s)"
                )
                logger.error("%s; the engine cannot run steps any more", self.failure)
                if self._on_failure is not None:
                    self._on_failure(self.failure)
        return self.failure

    def kill(self) -> None:
        """Kill the spawned workers at once (the process is about to exit after a fatal error)."""
        self._stopping.set()
        for process in self.processes:
            if process.is_alive():
                process.kill()
        for process in self.processes:
            process.join(SHUTDOWN_TIMEOUT_S)

    def shutdown(self) -> None:
        """Tell the workers to stop (if all are alive), wait for them, then leave the process group."""
        self._stopping.set()
        if not self.dead_ranks() and self.failure is None:
            try:
                broadcast_object(None, self.parallel)
            except Exception:  # a peer died meanwhile: terminate below
                logger.exception("could not tell the tensor-parallel workers to stop")
        for process in self.processes:
            process.join(SHUTDOWN_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(SHUTDOWN_TIMEOUT_S)
        destroy_parallel(self.parallel)
        self.processes = []
