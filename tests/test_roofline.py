"""engine/model/roofline.py: the bytes of one decode step against the hand count for gpt-oss-120b."""

from __future__ import annotations

import pytest
from gptoss.engine.model.config import preset
from gptoss.engine.model.roofline import (
    decode_ceiling,
    decode_step_bytes,
    expected_active_experts,
    expected_max_experts_per_rank,
    expert_bytes,
    format_breakdown,
    kv_bytes_per_seq,
    main,
    splits_over,
    tensor_parallel_estimate,
)


def test_120b_batch1_matches_hand_count() -> None:
    step = decode_step_bytes(preset("gpt-oss-120b"))
    # Hand count: 4 experts x 36 layers x (8.29 MB + 4.15 MB nibbles + 0.78 MB scales) = 1.90 GB;
    # 36 x (4096 + 512 + 512 + 4096) x 2880 x 2 B = 1.91 GB; 201088 x 2880 x 2 B = 1.16 GB.
    assert step.experts / 1e9 == pytest.approx(1.90, abs=0.01)
    assert step.attention / 1e9 == pytest.approx(1.91, abs=0.01)
    assert step.unembedding / 1e9 == pytest.approx(1.16, abs=0.005)
    assert step.other / 1e9 < 0.03
    assert step.total / 1e9 == pytest.approx(5.0, abs=0.02)
    # An empty context still reads (and writes) the new position's K and V.
    assert 0 < step.kv_cache < 1e6


def test_expert_bytes_exact() -> None:
    config = preset("gpt-oss-120b")
    nibbles = 3 * 2880 * 2880 // 2
    scales = 3 * 2880 * 2880 // 32
    biases = (2 * 2880 + 2880) * 2
    assert expert_bytes(config) == nibbles + scales + biases


def test_active_experts_grow_with_batch_and_saturate() -> None:
    config = preset("gpt-oss-120b")
    assert expected_active_experts(config, 1) == 4
    values = [expected_active_experts(config, b) for b in (1, 2, 8, 64, 1024)]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(128, rel=1e-6)
    step = decode_step_bytes(config, batch_size=1024)
    assert step.experts == pytest.approx(36 * 128 * expert_bytes(config), rel=1e-6)


def test_kv_bytes_full_and_sliding_layers() -> None:
    config = preset("gpt-oss-120b")
    per_position_layer = 2 * 8 * 64 * 2
    # 18 full layers read context + 1 positions, 18 sliding layers at most 128; each writes one more.
    context = 10_000
    expected = 18 * (context + 2) * per_position_layer + 18 * (128 + 1) * per_position_layer
    assert kv_bytes_per_seq(config, context) == expected
    short = decode_step_bytes(config, batch_size=4, context_len=10)
    assert short.kv_cache == 4 * 36 * 12 * per_position_layer


def test_ceiling_and_fp32_weights() -> None:
    config = preset("gpt-oss-120b")
    step = decode_step_bytes(config)
    ceiling = decode_ceiling(step, 3.35e12)
    assert ceiling.seconds == pytest.approx(step.total / 3.35e12)
    assert ceiling.tokens_per_s == pytest.approx(670, rel=0.01)
    batch8 = decode_ceiling(decode_step_bytes(config, batch_size=8), 3.35e12)
    assert batch8.tokens_per_s == pytest.approx(8 * batch8.tokens_per_s_per_seq)
    fp32 = decode_step_bytes(config, weight_bytes=4)
    assert fp32.attention == pytest.approx(2 * step.attention, rel=1e-3)
    assert fp32.experts < 1.01 * step.experts  # MXFP4 stays MXFP4; only the biases grow


def test_bad_arguments() -> None:
    config = preset("tiny")
    with pytest.raises(ValueError, match="batch_size"):
        decode_step_bytes(config, batch_size=0)
    with pytest.raises(ValueError, match="context_len"):
        decode_step_bytes(config, context_len=-1)
    with pytest.raises(ValueError, match="bandwidth"):
        decode_ceiling(decode_step_bytes(config), 0)


def test_breakdown_text_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    text = format_breakdown(decode_step_bytes(preset("gpt-oss-120b")), 3.35e12)
    assert "5.003 GB" in text and "tokens/s" in text
    assert main(["--preset", "gpt-oss-20b", "--bandwidth-gbs", "1000"]) == 0
    assert "total" in capsys.readouterr().out


def test_expected_max_experts_per_rank() -> None:
    config = preset("tiny").replace(num_local_experts=8, num_experts_per_tok=2)
    # 2 of 8 experts over 2 ranks of 4: both on one rank with probability 2 * C(4, 2) / C(8, 2) = 12/28.
    assert expected_max_experts_per_rank(config, 2) == pytest.approx(1 + 12 / 28)
    big = preset("gpt-oss-120b")
    assert expected_max_experts_per_rank(big, 1) == pytest.approx(4)
    assert expected_max_experts_per_rank(big, 128) == pytest.approx(1)
    assert 1 < expected_max_experts_per_rank(big, 8) < expected_max_experts_per_rank(big, 2) < 4


@pytest.mark.parametrize("world_size", [1, 2, 8, 16])
def test_tensor_parallel_weight_bytes_match_a_ranks_parameters(world_size: int) -> None:
    """The estimate's resident bytes are exactly what rank 0's share of the model allocates (bf16, on meta)."""
    import torch
    from gptoss.engine.model.gpt_oss import GptOssModel

    config = preset("gpt-oss-120b")
    model = GptOssModel.create(config, torch.bfloat16, "meta", rank=0, world_size=world_size)
    allocated = sum(p.numel() * p.element_size() for p in model.parameters())
    estimate = tensor_parallel_estimate(config, world_size)
    assert estimate.weight_bytes_per_rank == pytest.approx(allocated, rel=1e-9)
    assert estimate.kv_bytes_per_token_per_rank == 36 * 2 * max(1, 8 // world_size) * 64 * 2


def test_tensor_parallel_table(capsys: pytest.CaptureFixture[str]) -> None:
    config = preset("gpt-oss-120b")
    one, eight = tensor_parallel_estimate(config, 1), tensor_parallel_estimate(config, 8)
    assert one.collective_seconds == 0 and one.tokens_per_s == pytest.approx(670, rel=0.01)
    assert eight.decode_bytes_per_rank < one.decode_bytes_per_rank / 4  # experts, heads and vocab all split
    assert eight.kv_tokens_per_rank > 100 * one.kv_tokens_per_rank  # 8x less KV per token, 57 GB more room
    assert splits_over(config, 8) and splits_over(config, 16) and not splits_over(config, 3)
    assert main(["--tensor-parallel", "1,2,4,8"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5
