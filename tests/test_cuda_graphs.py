"""Decode steps through DecodeGraphRunner's padded static buffers against plain eager steps.

On CPU the runner replays eagerly (same buffers, same padding), so the padding logic is checked everywhere:
the real rows' logits equal an unpadded step's and padding rows write nothing into the KV cache. With CUDA,
real graph replays are compared with eager decoding.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import pytest
import torch
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.llm import LLM
from gptoss.engine.model.config import FULL, SLIDING, ModelConfig
from gptoss.engine.model.forward_batch import ForwardBatch
from gptoss.engine.model.gpt_oss import GptOssModel
from gptoss.engine.model.loader import load_weights
from gptoss.engine.sampling_params import SamplingParams
from gptoss.engine.worker.cuda_graphs import DecodeGraphRunner, capture_sizes
from gptoss.engine.worker.kv_cache import allocate_kv_caches

BLOCK_SIZE = 16
NUM_BLOCKS = {FULL: 48, SLIDING: 40}
MAX_MODEL_LEN = 64
SIZES = [1, 2, 4, 8, 16]
# Context lengths (the new token included) around block boundaries (16, 32, 48) and the 12-token window.
SEQ_LENS = [1, 12, 13, 16, 17, 25, 28, 29, 32, 33, 44, 45, 48, 49, 60]

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def load_model(checkpoint: Path, dtype: torch.dtype, device: str) -> GptOssModel:
    model = GptOssModel.create(ModelConfig.from_json(checkpoint), dtype, device)
    load_weights(model, checkpoint, progress=False)
    return model


@pytest.fixture(scope="module")
def cpu_model(tiny_checkpoint: Path) -> GptOssModel:
    return load_model(tiny_checkpoint, torch.float32, "cpu")


def random_caches(model: GptOssModel, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KV caches of both pools filled with random values (as if many earlier steps had written them)."""
    caches = allocate_kv_caches(model.config, NUM_BLOCKS, BLOCK_SIZE, model.dtype, model.device)
    generator = torch.Generator().manual_seed(seed)
    for k, v in caches:
        k.copy_(torch.randn(k.shape, generator=generator))
        v.copy_(torch.randn(v.shape, generator=generator))
    return caches


def clone_caches(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k.clone(), v.clone()) for k, v in caches]


def decode_step(
    seq_lens: list[int], window: int, vocab_size: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
    """input_ids, positions `[N]` and the ForwardBatch of one decode step, each sequence with its own
    shuffled blocks in both pools; sliding entries wholly before the window are -1 (freed), as the engine
    leaves them."""
    rng = random.Random(seed)
    free = {g: rng.sample(range(n), n) for g, n in NUM_BLOCKS.items()}
    width = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    tables = {g: torch.zeros(len(seq_lens), width, dtype=torch.int32) for g in NUM_BLOCKS}
    slots: dict[str, list[int]] = {g: [] for g in NUM_BLOCKS}
    for s, seq_len in enumerate(seq_lens):
        position = seq_len - 1
        for g in NUM_BLOCKS:
            for b in range(-(-seq_len // BLOCK_SIZE)):
                wholly_before_window = g == SLIDING and (b + 1) * BLOCK_SIZE <= position - window + 1
                tables[g][s, b] = -1 if wholly_before_window else free[g].pop()
            slots[g].append(int(tables[g][s, position // BLOCK_SIZE]) * BLOCK_SIZE + position % BLOCK_SIZE)
    batch = ForwardBatch(
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables={g: t.to(device) for g, t in tables.items()},
        slot_mapping={g: torch.tensor(v, dtype=torch.int64, device=device) for g, v in slots.items()},
        max_query_len=1,
        max_seq_len=max(seq_lens),
    )
    input_ids = torch.tensor([rng.randrange(vocab_size) for _ in seq_lens], dtype=torch.int64, device=device)
    positions = torch.tensor([n - 1 for n in seq_lens], dtype=torch.int64, device=device)
    return input_ids, positions, batch


def eager_step(model, caches, input_ids, positions, batch) -> torch.Tensor:
    return model.compute_logits(model.forward(input_ids, positions, batch, caches))


def written_mask(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`[num_blocks, block_size]` bool: the slots this step writes."""
    mask = torch.zeros(cache.shape[0] * cache.shape[2], dtype=torch.bool)
    mask[slots[slots >= 0].cpu()] = True
    return mask.view(cache.shape[0], cache.shape[2])


def assert_padding_rows(runner: DecodeGraphRunner, num_seqs: int) -> None:
    """Rows num_seqs..bucket-1 read key 0 of block 0 and write nothing; query_start_loc is one row each."""
    size = runner.bucket(num_seqs)
    assert torch.equal(runner.query_start_loc[: size + 1].cpu(), torch.arange(size + 1, dtype=torch.int32))
    assert (runner.seq_lens[num_seqs:size] == 1).all()
    for g in runner.groups:
        assert (runner.slot_mapping[g][num_seqs:size] == -1).all()
        assert (runner.block_tables[g][num_seqs:size, 0] == 0).all()


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]


def test_padded_decode_matches_unpadded_and_writes_only_real_slots(cpu_model):
    model = cpu_model
    config = model.config
    base = random_caches(model, seed=0)
    graph_caches = clone_caches(base)
    runner = DecodeGraphRunner(model, graph_caches, [FULL, SLIDING], SIZES, MAX_MODEL_LEN, BLOCK_SIZE, use_graphs=False)
    # Largest first, so later, smaller batches run on rows that earlier real rows left stale (freed -1 ids);
    # then random sizes exercise the bookkeeping of which rows still need re-padding.
    rng = random.Random(100)
    order = [15, 9, 3, 6, 5, 1, 2] + [rng.randrange(1, 17) for _ in range(9)]
    for step, num_seqs in enumerate(order):
        seq_lens = random.Random(step).sample(SEQ_LENS, num_seqs)
        input_ids, positions, batch = decode_step(seq_lens, config.sliding_window, config.vocab_size, "cpu", step)
        eager_caches = clone_caches(graph_caches)
        before = clone_caches(graph_caches)
        expected = eager_step(model, eager_caches, input_ids, positions, batch)
        assert runner.fits(batch)
        hidden = runner.run(input_ids, positions, batch)
        assert hidden.shape == (num_seqs, config.hidden_size)
        torch.testing.assert_close(model.compute_logits(hidden), expected, rtol=0, atol=1e-5)
        assert_padding_rows(runner, num_seqs)
        for layer, ((k, v), (k0, v0), (ke, ve)) in enumerate(zip(graph_caches, before, eager_caches, strict=True)):
            written = written_mask(k, batch.slot_mapping[config.layer_types[layer]])
            assert written.sum() == num_seqs
            for new, old, eager in ((k, k0, ke), (v, v0, ve)):
                # [num_blocks, Hkv, block_size, D] -> per slot
                unchanged = ~written[:, None, :, None].expand_as(new)
                assert torch.equal(new[unchanged], old[unchanged]), f"layer {layer}: padding wrote the cache"
                torch.testing.assert_close(new, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("batch_invariant", [True, False])
def test_attention_decode_with_a_larger_max_seq_len_hint_is_unchanged(monkeypatch, window, batch_invariant):
    """Captured graphs pass the model's context as the attention's max_seq_len hint: a bigger split grid whose extra
    programs must exit, each sequence still splitting by its own length (so results are bit-identical)."""
    from gptoss.kernels import attention
    from gptoss.kernels.reference import paged_attention_reference

    monkeypatch.setattr(attention, "DECODE_MIN_SPLIT_KEYS", 64)  # several splits at test lengths
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(0)
    seq_lens = [1, 12, 13, 65, 130, 200]
    num_kv_heads, group, head_dim, block_size = 2, 3, 16, 16
    tables = torch.arange(len(seq_lens) * 13, dtype=torch.int32).view(len(seq_lens), 13)
    k_cache = torch.randn(tables.numel(), num_kv_heads, block_size, head_dim, generator=generator)
    v_cache = torch.randn(k_cache.shape, generator=generator)
    query = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=generator)
    sinks = torch.randn(num_kv_heads * group, generator=generator)
    args = [t.to(device) for t in (query, k_cache, v_cache, tables)]
    args += [torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=device)]
    args += [torch.tensor(seq_lens, dtype=torch.int32, device=device), sinks.to(device), head_dim**-0.5, window]
    outs = [
        attention.paged_attention(*args, batch_invariant, max_query_len=1, max_seq_len=hint)
        for hint in (max(seq_lens), 4096)
    ]
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1], paged_attention_reference(*args), rtol=1e-4, atol=1e-4)


def test_fits_only_decode_batches_up_to_the_largest_bucket(cpu_model):
    runner = DecodeGraphRunner(
        cpu_model, random_caches(cpu_model, 1), [FULL, SLIDING], [1, 2, 4], MAX_MODEL_LEN, BLOCK_SIZE, False
    )
    window, vocab = cpu_model.config.sliding_window, cpu_model.config.vocab_size
    assert runner.bucket(3) == 4 and runner.bucket(5) is None
    assert runner.fits(decode_step([5, 20, 33], window, vocab, "cpu", 0)[2])
    assert not runner.fits(decode_step([5, 20, 33, 2, 7], window, vocab, "cpu", 0)[2])
    prefill = decode_step([5, 20], window, vocab, "cpu", 0)[2]
    prefill.max_query_len = 2
    assert not runner.fits(prefill)
    too_long = decode_step([5, 20], window, vocab, "cpu", 0)[2]
    too_long.max_seq_len = MAX_MODEL_LEN + 1
    assert not runner.fits(too_long)
    with pytest.raises(ValueError):
        DecodeGraphRunner(cpu_model, [], [FULL], [1], MAX_MODEL_LEN, BLOCK_SIZE, use_graphs=True)


def test_engine_args_and_flag(tiny_checkpoint):
    from gptoss.scripts.engine_flags import add_engine_arguments, engine_args_from_cli

    assert EngineArgs(model="x").use_cuda_graphs(torch.device("cuda"))
    assert not EngineArgs(model="x", enforce_eager=True).use_cuda_graphs(torch.device("cuda"))
    assert not EngineArgs(model="x", kernel_backend="torch").use_cuda_graphs(torch.device("cuda"))
    assert not EngineArgs(model="x").use_cuda_graphs(torch.device("cpu"))
    assert EngineArgs(model="x", max_num_seqs=48, max_cuda_graph_batch_size=32).cuda_graph_max_batch == 32
    with pytest.raises(ValueError):
        EngineArgs(model="x", max_cuda_graph_batch_size=0)
    parser = add_engine_arguments(argparse.ArgumentParser())
    model = str(tiny_checkpoint)
    assert engine_args_from_cli(parser.parse_args(["--model", model, "--enforce-eager"])).enforce_eager
    assert not engine_args_from_cli(parser.parse_args(["--model", model])).enforce_eager


def generate_tokens(llm: LLM, prompts: list[list[int]]) -> list:
    """Greedy, with staggered lengths: the running batch shrinks one sequence at a time."""
    params = [
        SamplingParams(max_tokens=2 + 2 * i, temperature=0.0, logprobs=2, ignore_eos=True) for i in range(len(prompts))
    ]
    return llm.generate(prompts, params)


def test_engine_decode_steps_through_the_graph_runner(tiny_checkpoint, caplog):
    """The model runner sends pure-decode steps that fit a bucket to the graph runner (here replaying
    eagerly on CPU) and the rest to the eager path; greedy outputs and logprobs match a plain eager engine."""
    kwargs = {"num_blocks": 64, "max_num_seqs": 6, "max_num_batched_tokens": 48, "max_cuda_graph_batch_size": 4}
    with caplog.at_level(logging.INFO, logger="gptoss.engine.worker.model_runner"):
        eager = LLM(tiny_checkpoint, **kwargs)
    text = caplog.text
    assert "weights: " in text and "KV cache: " in text
    assert f"max tokens in cache: {64 * 16}" in text and "full_attention 64" in text
    assert eager.engine.runner.graph_runner is None  # never CUDA graphs on CPU
    padded = LLM(tiny_checkpoint, **kwargs)
    runner = padded.engine.runner
    runner.graph_runner = runner.make_graph_runner(use_graphs=False)
    assert runner.graph_runner.sizes == [1, 2, 4]
    real_run = runner.graph_runner.run
    batch_sizes: list[int] = []

    def counting_run(input_ids, positions, batch):
        batch_sizes.append(batch.num_seqs)
        return real_run(input_ids, positions, batch)

    runner.graph_runner.run = counting_run
    rng = random.Random(0)
    prompts = [[rng.randrange(700) for _ in range(n)] for n in (3, 11, 12, 17, 30, 5)]
    expected = generate_tokens(eager, prompts)
    got = generate_tokens(padded, prompts)
    assert set(batch_sizes) == {1, 2, 3, 4}  # 5 and 6 running: too big, eager
    for a, b in zip(expected, got, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-5
    for pool in padded.engine.block_manager.pools.values():
        assert pool.num_free_blocks == pool.num_blocks


# ---- CUDA ----------------------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_matches_eager_on_cuda(tiny_checkpoint, dtype):
    model = load_model(tiny_checkpoint, dtype, "cuda")
    config = model.config
    graph_caches = random_caches(model, seed=0)
    runner = DecodeGraphRunner(model, graph_caches, [FULL, SLIDING], SIZES, MAX_MODEL_LEN, BLOCK_SIZE, True)
    runner.capture()
    assert sorted(runner.graphs) == SIZES
    for step, num_seqs in enumerate([15, 9, 3, 6, 5, 1, 2, 16]):
        seq_lens = random.Random(step).sample([*SEQ_LENS, 61], num_seqs)
        input_ids, positions, batch = decode_step(seq_lens, config.sliding_window, config.vocab_size, "cuda", step)
        eager_caches = clone_caches(graph_caches)
        before = clone_caches(graph_caches)
        expected = eager_step(model, eager_caches, input_ids, positions, batch)
        torch.cuda.set_sync_debug_mode("error")  # the replay path must never wait for the device
        try:
            hidden = runner.run(input_ids, positions, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        logits = model.compute_logits(hidden)
        if dtype == torch.float32:
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
        else:  # bf16: different GEMM shapes round differently
            assert (logits - expected).abs().max() <= 0.02 * expected.abs().max()
        assert_padding_rows(runner, num_seqs)
        for layer, ((k, v), (k0, v0)) in enumerate(zip(graph_caches, before, strict=True)):
            written = written_mask(k, batch.slot_mapping[config.layer_types[layer]]).cuda()
            for new, old in ((k, k0), (v, v0)):
                unchanged = ~written[:, None, :, None].expand_as(new)
                assert torch.equal(new[unchanged], old[unchanged]), f"layer {layer}: padding wrote the cache"


@cuda_only
def test_eager_decode_forward_does_not_sync_on_cuda(tiny_checkpoint):
    """With the host hints set, an eager decode step launches everything without waiting for the device."""
    model = load_model(tiny_checkpoint, torch.bfloat16, "cuda")
    caches = random_caches(model, seed=0)
    input_ids, positions, batch = decode_step(SEQ_LENS, model.config.sliding_window, model.config.vocab_size,
                                              "cuda", 0)  # fmt: skip
    eager_step(model, caches, input_ids, positions, batch)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager_step(model, caches, input_ids, positions, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda_only
def test_engine_with_graphs_matches_enforce_eager_on_cuda(tiny_checkpoint):
    kwargs = {"num_blocks": 64, "max_num_seqs": 6, "max_num_batched_tokens": 48, "dtype": "float32"}
    eager = LLM(tiny_checkpoint, enforce_eager=True, **kwargs)
    graphs = LLM(tiny_checkpoint, **kwargs)
    assert eager.engine.runner.graph_runner is None
    assert graphs.engine.runner.graph_runner is not None and graphs.engine.runner.graph_runner.graphs
    rng = random.Random(0)
    prompts = [[rng.randrange(700) for _ in range(n)] for n in (3, 11, 12, 17, 30, 5)]
    for a, b in zip(generate_tokens(eager, prompts), generate_tokens(graphs, prompts), strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-3
