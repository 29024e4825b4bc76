"""Checkpoint maker, loader and config parsing: layout, sharding, and errors that name every bad tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gptoss.engine.model.config import FULL, SLIDING, ModelConfig, preset
from gptoss.engine.model.gpt_oss import GptOssModel
from gptoss.engine.model.loader import CheckpointError, load_weights, randomize_weights
from gptoss.engine.model.random_checkpoint import make_random_checkpoint
from gptoss.kernels.reference import mxfp4_dequantize
from safetensors.torch import load_file, save_file


def test_checkpoint_has_hf_layout(tiny_checkpoint: Path) -> None:
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shard = load_file(str(tiny_checkpoint / index["weight_map"]["model.layers.0.mlp.experts.down_proj_blocks"]))
    config = ModelConfig.from_json(tiny_checkpoint)
    blocks = shard["model.layers.0.mlp.experts.down_proj_blocks"]
    scales = shard["model.layers.0.mlp.experts.down_proj_scales"]
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (e, h, i // 32, 16)
    assert scales.dtype == torch.uint8 and tuple(scales.shape) == (e, h, i // 32)
    assert shard["model.layers.0.mlp.experts.down_proj_bias"].dtype == torch.bfloat16


def test_mxfp4_nibble_order_and_scale() -> None:
    # One row of 32 values: byte 0x21 holds 0.5 (low nibble, earlier) then 1.0 (high nibble).
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21
    blocks[0, 0, 1] = 0xF9  # -0.5 then -6
    scales = torch.tensor([[128]], dtype=torch.uint8)  # x2
    row = mxfp4_dequantize(blocks, scales)[0]
    assert row[:4].tolist() == [1.0, 2.0, -1.0, -12.0]
    assert row[4:].abs().sum() == 0


def test_single_file_checkpoint_loads_like_sharded(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = ModelConfig.from_json(tiny_checkpoint)
    merged: dict[str, torch.Tensor] = {}
    for shard in tiny_checkpoint.glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    save_file(merged, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    a = GptOssModel.create(config, torch.float32, "cpu")
    b = GptOssModel.create(config, torch.float32, "cpu")
    load_weights(a, tiny_checkpoint, progress=False)
    load_weights(b, tmp_path, progress=False)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_loader_error_names_every_bad_tensor(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = ModelConfig.from_json(tiny_checkpoint)
    merged: dict[str, torch.Tensor] = {}
    for shard in tiny_checkpoint.glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    del merged["model.layers.1.self_attn.sinks"]
    del merged["lm_head.weight"]
    merged["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    merged["model.layers.0.mlp.experts.gate_up_proj_scales"] = merged[
        "model.layers.0.mlp.experts.gate_up_proj_scales"
    ].to(torch.float32)
    merged["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(merged, str(tmp_path / "model.safetensors"))
    model = GptOssModel.create(config, torch.float32, "cpu")
    with pytest.raises(CheckpointError) as info:
        load_weights(model, tmp_path, progress=False)
    message = str(info.value)
    for name in (
        "model.layers.1.self_attn.sinks",
        "lm_head.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.0.mlp.experts.gate_up_proj_scales",
        "model.layers.0.extra.weight",
    ):
        assert name in message


def test_non_finite_weights_fail_the_load_unless_skipped(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A NaN in a dense weight, an infinity in a bias and a NaN e8m0 scale (0xFF) are each named; a model
    with them would fail every request later (the sampler saw NaN logits)."""
    config = ModelConfig.from_json(tiny_checkpoint)
    merged: dict[str, torch.Tensor] = {}
    for shard in tiny_checkpoint.glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    merged["model.layers.1.self_attn.q_proj.weight"][3, 5] = float("nan")
    merged["model.layers.0.mlp.experts.down_proj_bias"][0, 0] = float("inf")
    merged["model.layers.2.mlp.experts.gate_up_proj_scales"][1, 2, 0] = 0xFF
    save_file(merged, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_weights(GptOssModel.create(config, torch.float32, "cpu"), tmp_path, progress=False)
    message = str(err.value)
    assert "non-finite values (NaN or infinity) in 3 tensors" in message
    for name in (
        "model.layers.1.self_attn.q_proj.weight: 1 of",
        "model.layers.0.mlp.experts.down_proj_bias: 1 of",
        "model.layers.2.mlp.experts.gate_up_proj_scales: 1 of",
    ):
        assert name in message
    # The opt-out loads it as it is.
    model = GptOssModel.create(config, torch.float32, "cpu")
    load_weights(model, tmp_path, progress=False, check_finite=False)
    assert model.model.layers[1].self_attn.q_proj.weight[3, 5].isnan()


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path: Path) -> None:
    model = GptOssModel.create(preset("tiny"), torch.float32, "cpu")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors\.index\.json"):
        load_weights(model, tmp_path, progress=False)


def test_random_weights_follow_the_checkpoint_layout() -> None:
    model = GptOssModel.create(preset("tiny"), torch.float32, "cpu")
    randomize_weights(model, seed=3)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8
    assert torch.isfinite(model.lm_head.weight).all()


def test_make_checkpoint_with_custom_sizes_and_real_tokenizer(shared_dir: Path, tmp_path: Path) -> None:
    config = preset("tiny").replace(num_hidden_layers=2, hidden_size=64, intermediate_size=32)
    out = make_random_checkpoint(tmp_path, config, tokenizer_path=shared_dir / "vocab" / "o200k_harmony.tokenizer.json")
    loaded = ModelConfig.from_json(out)
    # The vocabulary grows to the real tokenizer's 201088 ids; eos is looked up by name.
    assert loaded.vocab_size == 201088 and loaded.eos_token_id == 200002
    assert loaded.num_hidden_layers == 2 and loaded.layer_types == (SLIDING, FULL)


# The sizes every config.json states (gpt-oss-20b's), besides the keys named differently by the two namings.
SIZES_20B = {
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
}


def test_config_accepts_hf_and_original_names() -> None:
    hf = ModelConfig.from_dict(
        {
            **SIZES_20B,
            "num_experts_per_tok": 4,
            "num_local_experts": 32,
            "num_hidden_layers": 24,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        }
    )
    original = ModelConfig.from_dict(
        {
            **SIZES_20B,
            "experts_per_token": 4,
            "num_experts": 32,
            "num_hidden_layers": 24,
            "rope_scaling_factor": 32.0,
            "initial_context_length": 4096,
            "rope_ntk_alpha": 1.0,
            "rope_ntk_beta": 32.0,
        }
    )
    new_style = ModelConfig.from_dict(
        {
            **SIZES_20B,
            "num_experts_per_tok": 4,
            "num_local_experts": 32,
            "num_hidden_layers": 24,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "truncate": False,
            },
        }
    )
    assert hf == original == new_style == preset("gpt-oss-20b")
    assert hf.layer_types[:2] == (SLIDING, FULL)


def test_config_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        preset("tiny").replace(hidden_size=100)
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_dict(
            {
                **SIZES_20B,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "num_hidden_layers": 3,
                "layer_types": ["full_attention"],
            }
        )
