"""engine/data_parallel.py: replicas (processes, each tensor parallel over 2 ranks here: 2 x 2 processes on the
CPU) behind one server, least-loaded routing, summed and per-replica metrics; the HTTP server over them answering
all three API shapes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from gptoss.engine import LLM, EngineArgs, SamplingParams
from gptoss.engine.data_parallel import DataParallelEngine, replica_args, sum_snapshots
from gptoss.engine.metrics import MetricsSnapshot
from prometheus_client.parser import text_string_to_metric_families
from server_helpers import assert_every_api_answers, serve

ENGINE_ARGS = {"num_blocks": 64, "block_size": 8, "max_num_seqs": 4, "max_num_batched_tokens": 128}


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint: Path) -> DataParallelEngine:
    args = EngineArgs(model=str(tiny_checkpoint), data_parallel_size=2, tensor_parallel_size=2, **ENGINE_ARGS)
    engine = DataParallelEngine(args)
    yield engine
    engine.shutdown()


def test_requests_spread_over_replicas_and_match_one_engine(replicas: DataParallelEngine, tiny_checkpoint) -> None:
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    params = SamplingParams(max_tokens=5, temperature=0)

    async def run() -> tuple[list[list[int]], list[int]]:
        streams = [replicas.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
        loads = [replica.num_in_flight for replica in replicas.replicas]  # before any finishes
        outputs = []
        for stream in streams:
            async for out in stream:
                last = out
            outputs.append(last.token_ids)
        return outputs, loads

    outputs, loads = asyncio.run(run())
    assert loads == [2, 2], "the least-loaded replica takes each new request"
    expected = LLM(tiny_checkpoint, **ENGINE_ARGS).generate(prompts, params)
    assert outputs == [out.token_ids for out in expected]
    per_replica = replicas.replica_metrics()
    assert [m.generation_tokens_total for m in per_replica] == [10, 10]
    assert replicas.metrics().generation_tokens_total == 20 and replicas.is_alive()


def test_sum_snapshots_adds_counters_and_keeps_the_fullest_kv_usage() -> None:
    a = MetricsSnapshot(
        num_running=1, kv_blocks_used={"full": 3}, kv_cache_usage=0.5, requests_finished_total={"stop": 2}
    )
    b = MetricsSnapshot(
        num_running=2, kv_blocks_used={"full": 1}, kv_cache_usage=0.25, requests_finished_total={"x": 1}
    )
    total = sum_snapshots([a, b])
    assert total.num_running == 3 and total.kv_blocks_used == {"full": 4} and total.kv_cache_usage == 0.5
    assert total.requests_finished_total == {"stop": 2, "x": 1}


def test_replica_devices_and_refused_use(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="DataParallelEngine"):
        LLM(tiny_checkpoint, data_parallel_size=2)
    assert [a.device for a in replica_args(EngineArgs(model="m", data_parallel_size=3, device="cpu"))] == ["cpu"] * 3
    # Replica r on the r-th block of tensor_parallel_size GPUs, from the device given.
    tp = EngineArgs(model="m", data_parallel_size=2, tensor_parallel_size=2, device="cuda:2")
    assert [(a.device, a.data_parallel_size) for a in replica_args(tp)] == [("cuda:2", 1), ("cuda:4", 1)]


def test_server_over_two_replicas_answers_every_api(replicas: DataParallelEngine, tiny_checkpoint: Path) -> None:
    from gptoss.engine.tokenizer import load_tokenizer
    from gptoss.server.app import create_app

    tokenizer = load_tokenizer(tiny_checkpoint)
    server = serve(create_app(replicas, tokenizer), replicas, tokenizer)
    base = server.base_url
    try:
        assert_every_api_answers(base, max_tokens=3)
        assert httpx.get(f"{base}/health").status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)}
        per_replica = {
            s.labels["replica"]: s.value for s in families["gptoss_engine_replica_generation_tokens"].samples
        }
        (total,) = families["gptoss_engine_generation_tokens"].samples
        assert set(per_replica) == {"0", "1"} and sum(per_replica.values()) == total.value > 0
        vllm = {s.labels["engine"]: s.value for s in families["vllm:generation_tokens"].samples}
        assert vllm == per_replica
        kv = families["gptoss_engine_replica_kv_blocks_total"].samples
        assert {(s.labels["replica"], s.labels["group"]) for s in kv} >= {("1", "full_attention")}
    finally:
        server.server.should_exit = True
        server.thread.join(10)


def test_a_dead_replica_fails_its_streams_and_the_health(tiny_checkpoint: Path) -> None:
    """A replica process killed mid-request: its stream ends with an error (no hang), the engine reports
    not alive (/health 503), the listeners hear why, and the other replica still answers meanwhile."""
    from gptoss.engine.errors import EngineDeadError, RequestFailedError

    engine = DataParallelEngine(EngineArgs(model=str(tiny_checkpoint), data_parallel_size=2, **ENGINE_ARGS))
    reasons: list[str] = []
    engine.engines[1].add_fatal_listener(reasons.append)
    try:

        async def run() -> None:
            params = SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0)
            first = engine.add_request("a", [1, 2, 3], params)  # replica 0
            doomed = engine.add_request("b", [4, 5, 6], params)  # replica 1
            await doomed.__anext__()
            engine.clients[1].process.kill()

            async def drain() -> None:
                async for _ in doomed:
                    pass

            with pytest.raises((EngineDeadError, RequestFailedError)):
                await asyncio.wait_for(drain(), timeout=20)
            assert not engine.is_alive()
            assert (await first.__anext__()).request_id == "a"  # replica 0 is unaffected
            await first.aclose()

        asyncio.run(run())
        deadline = time.monotonic() + 5  # the listeners run on the thread that noticed first
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reasons and "replica 1 exited" in reasons[0]
    finally:
        engine.shutdown()
