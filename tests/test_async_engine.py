"""Async engine: streamed deltas, aborts (explicit, early exit, cancellation), overload, errors, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
from gptoss.engine.async_engine import AsyncEngine, RequestFailedError
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, PromptTooLongError
from gptoss.engine.llm_engine import LLMEngine
from gptoss.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm_engine(tiny_checkpoint) -> LLMEngine:
    return LLMEngine(EngineArgs(model=str(tiny_checkpoint), num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64))


@pytest.fixture
def engine(llm_engine):
    engine = AsyncEngine.from_llm_engine(llm_engine)
    yield engine
    engine.shutdown()


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def pool_full(engine: AsyncEngine) -> bool:
    m = engine.metrics()
    return m.num_running == 0 and m.num_waiting == 0 and all(v == 0 for v in m.kv_blocks_used.values())


async def collect(engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams) -> list:
    return [out async for out in engine.add_request(request_id, prompt, params)]


def test_streams_deltas_that_add_up(engine):
    params = SamplingParams(max_tokens=7, temperature=0.0, logprobs=1)
    prompts = {f"r{i}": [5 + i, 17, 29, 31 + i, 44] for i in range(4)}

    async def main():
        return await asyncio.gather(*(collect(engine, rid, p, params) for rid, p in prompts.items()))

    results = asyncio.run(main())
    for outs in results:
        final = outs[-1]
        assert final.finished and final.finish_reason == "length" and all(not o.finished for o in outs[:-1])
        assert [t for o in outs for t in o.new_token_ids] == final.token_ids
        assert "".join(o.text_delta for o in outs) == final.text
        assert [lp.token_id for o in outs for lp in o.new_logprobs] == final.token_ids
        assert [o.num_output_tokens for o in outs] == list(range(1, 8))
        assert final.num_prompt_tokens == 5
    # the same greedy tokens as one request alone
    alone = asyncio.run(collect(engine, "alone", prompts["r2"], params))
    assert alone[-1].token_ids == results[2][-1].token_ids
    m = engine.metrics()
    assert m.generation_tokens_total >= 35 and m.prompt_tokens_total >= 25
    assert pool_full(engine)


def test_abort_early_exit_and_cancel_free_blocks(engine):
    params = SamplingParams(max_tokens=10_000, ignore_eos=True)

    async def main():
        # explicit abort: the stream ends with an "abort" output
        stream = engine.add_request("explicit", list(range(40)), params)
        seen = []
        async for out in stream:
            seen.append(out)
            if len(seen) == 2:
                engine.abort("explicit")
        assert seen[-1].finish_reason == "abort"

        # leaving the loop early (aclosing) aborts
        async with contextlib.aclosing(engine.add_request("early", list(range(40)), params)) as stream:
            async for _ in stream:
                break
        await wait_until(lambda: pool_full(engine))

        # cancelling the consuming task aborts
        async def consume():
            async for _ in engine.add_request("cancelled", list(range(40)), params):
                pass

        task = asyncio.create_task(consume())
        await wait_until(lambda: engine.metrics().num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: pool_full(engine))
        assert engine.metrics().requests_finished_total.get("abort", 0) >= 3

    asyncio.run(main())
    assert engine.is_alive()


def test_refusals_are_raised_at_once(engine, llm_engine, monkeypatch):
    gate = threading.Event()  # holds the loop inside step() so that nothing leaves the waiting state
    real_step = llm_engine.step

    def gated_step():
        gate.wait()
        return real_step()

    monkeypatch.setattr(llm_engine, "step", gated_step)

    async def main():
        with pytest.raises(PromptTooLongError):
            engine.add_request("long", [1] * 5000, SamplingParams())
        with pytest.raises(InvalidRequestError):
            engine.add_request("bad", [1, 2], "greedy")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError):
            engine.add_request("oov", [10**6], SamplingParams())
        engine.max_num_waiting = 2
        try:
            streams = [engine.add_request(f"w{i}", [1, 2, 3], SamplingParams(max_tokens=2)) for i in range(2)]
            with pytest.raises(EngineOverloadedError):
                engine.add_request("w2", [1, 2, 3], SamplingParams(max_tokens=2))
        finally:
            engine.max_num_waiting = llm_engine.args.max_num_waiting
            gate.set()
        for stream in streams:
            assert [o async for o in stream][-1].finished

    asyncio.run(main())


def test_failed_step_fails_requests_and_loop_survives(engine, llm_engine, monkeypatch):
    real_execute = llm_engine.runner.execute
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device fell over")
        return real_execute(plan)

    monkeypatch.setattr(llm_engine.runner, "execute", flaky)

    async def main():
        with pytest.raises(RequestFailedError, match="device fell over"):
            await collect(engine, "doomed", [1, 2, 3], SamplingParams(max_tokens=3))
        outs = await collect(engine, "fine", [1, 2, 3], SamplingParams(max_tokens=3))
        assert outs[-1].finish_reason == "length"

    asyncio.run(main())
    assert engine.is_alive() and engine.metrics().step_errors_total == 1


def test_shutdown_fails_pending_streams(llm_engine):
    engine = AsyncEngine.from_llm_engine(llm_engine)

    async def main():
        stream = engine.add_request("pending", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True))
        await stream.__anext__()
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            engine.add_request("late", [1], SamplingParams())

    asyncio.run(main())
    assert not engine.is_alive()
    assert not llm_engine.has_unfinished_requests()  # the loop aborted what was left


def test_closing_a_stream_never_iterated_aborts(engine, llm_engine):
    """A consumer that goes away before its first output (e.g. the client disconnected) must still abort."""
    params = SamplingParams(max_tokens=10_000, ignore_eos=True)

    async def main():
        stream = engine.add_request("unread", list(range(40)), params)
        await wait_until(lambda: "unread" in llm_engine.requests)
        seq = llm_engine.requests["unread"]
        await stream.aclose()
        await wait_until(lambda: seq.is_finished, timeout=5.0)
        assert seq.finish_reason == "abort" and seq.num_output_tokens < 10_000
        await wait_until(lambda: pool_full(engine))
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()

    asyncio.run(main())


def test_add_request_racing_the_loop_exit_is_not_left_hanging(llm_engine, monkeypatch):
    """`add_request` can pass its liveness check just before the loop exits: the stream must still end."""
    engine = AsyncEngine.from_llm_engine(llm_engine)
    engine.shutdown()
    monkeypatch.setattr(engine, "is_alive", lambda: True)  # the check ran before the loop stopped

    async def main():
        with pytest.raises(EngineDeadError):
            stream = engine.add_request("late", [1, 2, 3], SamplingParams(max_tokens=2))
            await asyncio.wait_for(stream.__anext__(), timeout=2.0)

    asyncio.run(main())
