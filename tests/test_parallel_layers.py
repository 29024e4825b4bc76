"""engine/model/parallel_layers.py: which heads, experts and vocabulary rows each rank holds, and that every
rank's loaded parameters are exactly its slices of the checkpoint (no process group needed to load)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gptoss.engine.model.config import ModelConfig, preset
from gptoss.engine.model.gpt_oss import GptOssModel
from gptoss.engine.model.loader import load_weights, randomize_weights
from gptoss.engine.model.parallel_layers import attention_heads, kv_heads_per_rank, vocab_shard
from gptoss.engine.worker.kv_cache import allocate_kv_caches, kv_bytes_per_block


@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 16])
def test_every_query_head_sits_with_the_kv_head_it_reads(world_size: int) -> None:
    config = preset("gpt-oss-120b")  # 64 q heads, 8 KV heads: split up to 8 ranks, replicated beyond
    group = config.num_attention_heads // config.num_key_value_heads
    seen_q = []
    for rank in range(world_size):
        q_start, q_heads, kv_start, kv_heads = attention_heads(config, rank, world_size)
        assert kv_heads == kv_heads_per_rank(config, world_size) == max(1, 8 // world_size)
        local_kv = range(kv_start, kv_start + kv_heads)
        for j in range(q_heads):
            global_q = q_start + j
            # The attention kernel maps local q head j to local KV head j // (q_heads / kv_heads).
            assert global_q // group == kv_start + j // (q_heads // kv_heads)
            assert global_q // group in local_kv
        seen_q.extend(range(q_start, q_start + q_heads))
    assert seen_q == list(range(config.num_attention_heads))


def test_splits_that_do_not_fit_are_refused() -> None:
    config = preset("tiny")  # 6 q heads, 2 KV heads, 6 experts
    with pytest.raises(ValueError, match="attention heads do not split over 4"):
        attention_heads(config, 0, 4)
    with pytest.raises(ValueError, match="KV heads neither split"):
        kv_heads_per_rank(config.replace(num_attention_heads=12, num_key_value_heads=4), 6)
    with pytest.raises(ValueError, match="experts do not split over 4"):
        GptOssModel.create(config.replace(num_attention_heads=8), torch.float32, "meta", rank=0, world_size=4)


def test_vocab_shards_cover_the_vocabulary_with_padding() -> None:
    starts = [vocab_shard(729, rank, 4) for rank in range(4)]
    assert starts == [(0, 183), (183, 183), (366, 183), (549, 183)]  # 732 rows: the last 3 are padding


def _slices(config: ModelConfig, rank: int, world_size: int) -> dict[str, tuple[int, slice]]:
    """Parameter name suffix -> (dim, slice of the full tensor) that rank must hold."""
    q_start, q_heads, kv_start, kv_heads = attention_heads(config, rank, world_size)
    d = config.head_dim
    q = slice(q_start * d, (q_start + q_heads) * d)
    kv = slice(kv_start * d, (kv_start + kv_heads) * d)
    shards = {"q_proj.weight": (0, q), "q_proj.bias": (0, q), "o_proj.weight": (1, q)}
    shards |= {f"{p}_proj.{w}": (0, kv) for p in "kv" for w in ("weight", "bias")}
    shards["sinks"] = (0, slice(q_start, q_start + q_heads))
    return shards


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_loads_exactly_its_slices(tmp_path: Path, world_size: int) -> None:
    from gptoss.engine.model.random_checkpoint import make_random_checkpoint

    # 8 q heads, 2 KV heads (replicated at 4 ranks), 8 experts; vocab 729 pads at 2 and 4 ranks.
    config = preset("tiny").replace(num_attention_heads=8, num_local_experts=8, num_hidden_layers=2)
    make_random_checkpoint(tmp_path, config, seed=3, max_shard_bytes=100_000)
    config = ModelConfig.from_json(tmp_path)
    whole = GptOssModel.create(config, torch.float32, "cpu")
    load_weights(whole, tmp_path, progress=False)
    full = dict(whole.named_parameters())
    vocab = config.vocab_size
    for rank in range(world_size):
        part = GptOssModel.create(config, torch.float32, "cpu", rank=rank, world_size=world_size)
        load_weights(part, tmp_path, progress=False)
        shards = _slices(config, rank, world_size)
        for name, param in part.named_parameters():
            expected = full[name]
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                start, rows = vocab_shard(vocab, rank, world_size)
                real = max(0, min(rows, vocab - start))
                assert torch.equal(param[:real], expected[start : start + real]), name
                assert not param[real:].any(), f"{name}: padding rows must be zero"
                continue
            if ".experts." in name:  # every expert tensor is [E, ...]: whole experts per rank
                experts = config.num_local_experts // world_size
                assert torch.equal(param, expected[rank * experts : (rank + 1) * experts]), name
                continue
            suffix = next((s for s in shards if name.endswith(s)), None)
            if suffix is None:  # replicated: norms, router, o_proj bias
                assert torch.equal(param, expected), name
                continue
            dim, cut = shards[suffix]
            assert torch.equal(param, expected[cut] if dim == 0 else expected[:, cut]), name
        # --random-weights: every rank draws the same full tensors and keeps its share.
        drawn_whole = GptOssModel.create(config, torch.float32, "cpu")
        randomize_weights(drawn_whole, seed=5)
        drawn_part = GptOssModel.create(config, torch.float32, "cpu", rank=rank, world_size=world_size)
        randomize_weights(drawn_part, seed=5)
        q_proj = "model.layers.1.self_attn.q_proj.weight"
        _, q_cut = shards["q_proj.weight"]
        assert torch.equal(
            dict(drawn_part.named_parameters())[q_proj], dict(drawn_whole.named_parameters())[q_proj][q_cut]
        )


def test_kv_cache_holds_a_ranks_kv_heads() -> None:
    config = preset("tiny").replace(num_attention_heads=8)  # 2 KV heads
    caches = allocate_kv_caches(config, 3, 4, torch.float32, "cpu", world_size=4)
    assert caches[0][0].shape == (3, 1, 4, config.head_dim)  # one replicated KV head per rank
    assert kv_bytes_per_block(config, 4, torch.float32, world_size=2) * 2 == kv_bytes_per_block(
        config, 4, torch.float32
    )


def test_step_plan_wire_format_round_trips() -> None:
    """What rank 0 broadcasts each step: numpy arrays on the wire, the same tensors (and sharing) after."""
    import pickle

    from gptoss.engine.model.forward_batch import ForwardBatch
    from gptoss.engine.worker.model_runner import StepInputs, StepPlan

    table = torch.tensor([[3, 4], [7, 0]], dtype=torch.int32)
    batch = ForwardBatch.shared_pool(
        torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([9, 17], dtype=torch.int32), table, torch.arange(3)
    )
    step = StepPlan(StepInputs(torch.tensor([5, 6, 7]), torch.tensor([7, 8, 16]), batch), [(0, 2), [1, 2]])
    back = StepPlan.from_wire(pickle.loads(pickle.dumps(step.to_wire())))
    assert torch.equal(back.inputs.input_ids, step.inputs.input_ids) and back.logits_rows == [(0, 2), [1, 2]]
    for group in batch.block_tables:
        assert torch.equal(back.inputs.batch.block_tables[group], table)
    assert back.inputs.batch.block_tables["full_attention"] is back.inputs.batch.block_tables["sliding_attention"]
    assert (back.inputs.batch.max_query_len, back.inputs.batch.max_seq_len) == (2, 17)
