"""Tensor + expert parallelism on CPU with gloo: ranks are real processes (spawned), the collectives real.

- world size 2 on the tiny preset (6 q heads, 2 KV heads, 6 experts: all split), vocabulary 729 padded;
- world size 4 on a variant with 8 q heads, 2 KV heads (each replicated on 2 ranks) and 8 experts;
- logits equal world size 1 within fp32 rounding (and transformers at world size 4);
- batch invariance at world size 4: with every op made row-wise (so that CPU BLAS blocking is out of the
  picture) a prompt's logits are bit-identical alone and in a batch, i.e. the fixed-order reductions, the
  vocabulary gather and the sharded embedding add no dependence on the batch. Four ranks, because with two
  any summation order gives the same bits (a + b == b + a);
- both fixed-order reductions (all-gather, and all-to-all + all-gather) give the rank-order sum exactly, and
  step plans (any size) reach every rank whole;
- the engine: `LLM(..., tensor_parallel_size=2)` (rank 0 here, rank 1 a spawned worker executing the
  broadcast step plans) generates what world size 1 generates, with the same logprobs and prompt logprobs.
Spawning a process costs seconds on a small machine (torch import), so the checks share few launches.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from gptoss.engine.distributed.parallel_state import destroy_parallel, init_parallel
from gptoss.engine.model.config import ModelConfig, preset
from gptoss.engine.model.gpt_oss import GptOssModel
from gptoss.engine.model.loader import load_weights
from test_model import PagedRunner, random_prompt, rel_err

FP32_TOL = 1e-5  # the same fp32 math, summed in another order
SPAWN_TIMEOUT_S = 120.0
PROMPT_LENGTHS = (5, 23, 14)  # 23 > the 12-token window: sliding layers matter


def logits_alone_and_batched(model: GptOssModel) -> dict[str, dict[int, torch.Tensor]]:
    """Each prompt's logits run alone and in one batch with the others, then a mixed decode/prefill step."""
    vocab = model.config.vocab_size
    prompts = {seq: random_prompt(vocab, n, seed=10 + seq) for seq, n in enumerate(PROMPT_LENGTHS)}
    alone = {seq: PagedRunner(model, seed=seq).step({seq: p})[seq] for seq, p in prompts.items()}
    runner = PagedRunner(model, seed=7)
    batched = runner.step(prompts)
    mixed = runner.step({0: [3], 1: random_prompt(vocab, 4, seed=1), 2: [8]})
    return {"alone": alone, "batched": batched, "mixed": mixed}


def use_rowwise_ops() -> None:
    """Make the linear and MoE ops run one row at a time, so each row's bits are its own whatever the batch."""
    from gptoss.engine.model import ops

    linear, moe = ops.linear, ops.moe

    def rowwise_linear(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.cat([linear(x[i : i + 1], *args, **kwargs) for i in range(x.shape[0])])

    def rowwise_moe(x: torch.Tensor, router_logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.cat([moe(x[i : i + 1], router_logits[i : i + 1], *args, **kwargs) for i in range(x.shape[0])])

    ops.linear, ops.moe = rowwise_linear, rowwise_moe


def check_reductions(rank: int, world_size: int, group) -> None:
    """Both fixed-order methods give exactly the left-to-right sum in rank order (the two-phase one on a size
    that needs padding), so picking one by message size never changes a token's bits."""
    from gptoss.engine.distributed.collectives import reduce_sum

    partials = [torch.randn(37, 95, generator=torch.Generator().manual_seed(r)) for r in range(world_size)]
    expected = partials[0] + partials[1]
    for r in range(2, world_size):
        expected += partials[r]
    for two_phase in (False, True):
        total = reduce_sum(partials[rank].clone(), world_size, group, two_phase=two_phase)
        assert torch.equal(total, expected), f"two_phase={two_phase}"


def check_object_broadcast(parallel) -> None:
    """Rank 0's objects arrive whole, in one fixed-size broadcast or, when larger, in a second one."""
    from gptoss.engine.distributed.parallel_state import OBJECT_BUFFER_BYTES, broadcast_object

    for size in (10, OBJECT_BUFFER_BYTES - 100, 3 * OBJECT_BUFFER_BYTES):
        sent = {"size": size, "data": bytes(range(256)) * (size // 256)} if parallel.is_driver else None
        got = broadcast_object(sent, parallel)
        assert got["size"] == size and got["data"] == bytes(range(256)) * (size // 256)


def rank_main(rank: int, world_size: int, checkpoint: Path, init_file: Path, out: Path, rowwise: bool) -> None:
    """One rank: its share of the model, the same steps as every other rank; rank 0 saves the logits."""
    torch.set_num_threads(1)
    if rowwise:
        use_rowwise_ops()
    parallel = init_parallel(rank, world_size, rank, torch.device("cpu"), f"file://{init_file}")
    try:
        config = ModelConfig.from_json(checkpoint)
        model = GptOssModel.create(config, torch.float32, "cpu", rank, world_size, parallel.device_group)
        load_weights(model, checkpoint, progress=False)
        results = logits_alone_and_batched(model)
        check_reductions(rank, world_size, parallel.device_group)
        check_object_broadcast(parallel)
        if rank == 0:
            torch.save(results, out)
    finally:
        destroy_parallel(parallel)


def run_ranks(world_size: int, checkpoint: Path, tmp_path: Path, rowwise: bool = False) -> dict:
    """Spawn `world_size` ranks of `rank_main`; fail (not hang) if they do not finish in time."""
    out = tmp_path / f"logits-{world_size}.pt"
    context = mp.start_processes(
        rank_main,
        args=(world_size, checkpoint, tmp_path / f"store-{world_size}", out, rowwise),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=0.2):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} ranks did not finish in {SPAWN_TIMEOUT_S} s")
    return torch.load(out)


def world_size_1(checkpoint: Path) -> dict[str, dict[int, torch.Tensor]]:
    model = GptOssModel.create(ModelConfig.from_json(checkpoint), torch.float32, "cpu")
    load_weights(model, checkpoint, progress=False)
    return logits_alone_and_batched(model)


def assert_close_to(reference: dict, results: dict, tol: float) -> None:
    for kind, by_seq in reference.items():
        for seq, expected in by_seq.items():
            assert results[kind][seq].shape == expected.shape
            assert rel_err(results[kind][seq], expected) < tol, (kind, seq)


@pytest.fixture(scope="module")
def replicated_kv_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 q heads over 2 KV heads and 8 experts: at 4 ranks, 2 q heads, 1 replicated KV head, 2 experts each."""
    from gptoss.engine.model.random_checkpoint import make_random_checkpoint

    out = tmp_path_factory.mktemp("tp4-checkpoint")
    make_random_checkpoint(out, preset("tiny").replace(num_attention_heads=8, num_local_experts=8), seed=77)
    return out


def test_tp2_logits_equal_world_size_1(tiny_checkpoint: Path, tmp_path: Path) -> None:
    results = run_ranks(2, tiny_checkpoint, tmp_path)
    assert_close_to(world_size_1(tiny_checkpoint), results, FP32_TOL)


@pytest.mark.slow
def test_tp4_replicated_kv_heads_match_and_are_batch_invariant(replicated_kv_checkpoint: Path, tmp_path: Path) -> None:
    results = run_ranks(4, replicated_kv_checkpoint, tmp_path, rowwise=True)
    for seq, alone in results["alone"].items():
        assert torch.equal(results["batched"][seq], alone), f"prompt {seq}: bits depend on the batch"
    assert_close_to(world_size_1(replicated_kv_checkpoint), results, FP32_TOL)

    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        str(replicated_kv_checkpoint),
        quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32,
    ).eval()
    vocab = ModelConfig.from_json(replicated_kv_checkpoint).vocab_size
    for seq, n in enumerate(PROMPT_LENGTHS):
        with torch.no_grad():
            expected = hf(torch.tensor([random_prompt(vocab, n, seed=10 + seq)])).logits[0]
        assert rel_err(results["alone"][seq], expected) < 1e-4


def test_llm_tp2_generates_what_world_size_1_generates(tiny_checkpoint: Path, monkeypatch) -> None:
    """Then a worker that stops (SIGSTOP: no heartbeat) is reported hung and the engine refuses to step."""
    from gptoss.engine import LLM, SamplingParams
    from gptoss.engine.errors import EngineDeadError
    from gptoss.engine.worker import tp_worker

    params = SamplingParams(max_tokens=6, temperature=0, logprobs=2, prompt_logprobs=1)
    prompts = [[1, 2, 3, 4, 5], list(range(7, 27)), [3, 9]]
    engine_args = {"num_blocks": 64, "block_size": 8}
    expected = LLM(tiny_checkpoint, **engine_args).generate(prompts, params)
    llm = LLM(tiny_checkpoint, tensor_parallel_size=2, **engine_args)
    try:
        outputs = llm.generate(prompts, params)
        for out, ref in zip(outputs, expected, strict=True):
            assert out.token_ids == ref.token_ids
            pairs = zip(out.logprobs + out.prompt_logprobs[1:], ref.logprobs + ref.prompt_logprobs[1:], strict=True)
            for got, want in pairs:
                assert got.token_id == want.token_id and abs(got.logprob - want.logprob) < 1e-4
        assert llm.engine.runner.parallel.world_size == 2
        workers = llm.engine.workers.processes
    finally:
        llm.engine.shutdown()
    assert all(p.exitcode == 0 for p in workers), "workers must stop cleanly when told to"

    monkeypatch.setattr(tp_worker, "HUNG_AFTER_S", 1.0)
    llm = LLM(tiny_checkpoint, tensor_parallel_size=2, **engine_args)
    reasons: list[str] = []
    llm.engine.add_fatal_listener(reasons.append)
    [worker] = llm.engine.workers.processes
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reasons and "hung" in reasons[0] and llm.engine.fatal_error == reasons[0]
        with pytest.raises(EngineDeadError, match="hung"):
            llm.engine.step()
    finally:
        llm.engine.workers.kill()
        llm.engine.shutdown()
