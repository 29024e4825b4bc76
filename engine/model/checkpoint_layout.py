"""The Hugging Face gpt-oss checkpoint's tensors: names, shapes and stored dtypes, in one place.

The checkpoint maker writes exactly these, the loader expects exactly these, and `--random-weights` fills the
model with values drawn the same way, so all three agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gptoss.engine.model.config import ModelConfig
from gptoss.kernels.reference import MXFP4_BLOCK


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


def layer_tensor_specs(config: ModelConfig, layer: int) -> list[TensorSpec]:
    """The tensors of decoder layer `layer`, as stored (bf16, MXFP4 experts as uint8 blocks and scales)."""
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    q, kv = config.q_size, config.kv_size
    bf16, u8 = torch.bfloat16, torch.uint8
    half_block = MXFP4_BLOCK // 2
    prefix = f"model.layers.{layer}."
    specs = [
        (f"{prefix}input_layernorm.weight", (h,), bf16),
        (f"{prefix}post_attention_layernorm.weight", (h,), bf16),
        (f"{prefix}self_attn.q_proj.weight", (q, h), bf16),
        (f"{prefix}self_attn.q_proj.bias", (q,), bf16),
        (f"{prefix}self_attn.k_proj.weight", (kv, h), bf16),
        (f"{prefix}self_attn.k_proj.bias", (kv,), bf16),
        (f"{prefix}self_attn.v_proj.weight", (kv, h), bf16),
        (f"{prefix}self_attn.v_proj.bias", (kv,), bf16),
        (f"{prefix}self_attn.o_proj.weight", (h, q), bf16),
        (f"{prefix}self_attn.o_proj.bias", (h,), bf16),
        (f"{prefix}self_attn.sinks", (config.num_attention_heads,), bf16),
        (f"{prefix}mlp.router.weight", (e, h), bf16),
        (f"{prefix}mlp.router.bias", (e,), bf16),
        (f"{prefix}mlp.experts.gate_up_proj_blocks", (e, 2 * i, h // MXFP4_BLOCK, half_block), u8),
        (f"{prefix}mlp.experts.gate_up_proj_scales", (e, 2 * i, h // MXFP4_BLOCK), u8),
        (f"{prefix}mlp.experts.gate_up_proj_bias", (e, 2 * i), bf16),
        (f"{prefix}mlp.experts.down_proj_blocks", (e, h, i // MXFP4_BLOCK, half_block), u8),
        (f"{prefix}mlp.experts.down_proj_scales", (e, h, i // MXFP4_BLOCK), u8),
        (f"{prefix}mlp.experts.down_proj_bias", (e, h), bf16),
    ]
    return [TensorSpec(name, shape, dtype) for name, shape, dtype in specs]


def checkpoint_tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint, embedding first, then layer by layer, then the final norm and head."""
    h, v = config.hidden_size, config.vocab_size
    specs = [TensorSpec("model.embed_tokens.weight", (v, h), torch.bfloat16)]
    for layer in range(config.num_hidden_layers):
        specs.extend(layer_tensor_specs(config, layer))
    specs.append(TensorSpec("model.norm.weight", (h,), torch.bfloat16))
    specs.append(TensorSpec("lm_head.weight", (v, h), torch.bfloat16))
    return specs


# Scales around 2^-6: random e2m1 values (|x| <= 6) then give weights of std ~0.03, like a trained layer's.
_SCALE_LOW, _SCALE_HIGH = 119, 124


def random_tensor(spec: TensorSpec, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random tensor for `spec`, drawn so that a random model's activations stay in a sane range."""
    name = spec.name
    if name.endswith("_blocks"):
        return torch.randint(0, 256, spec.shape, dtype=torch.uint8, generator=generator, device=device)
    if name.endswith("_scales"):
        return torch.randint(_SCALE_LOW, _SCALE_HIGH, spec.shape, dtype=torch.uint8, generator=generator, device=device)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        values = 1.0 + 0.1 * torch.randn(spec.shape, generator=generator, device=device)
    elif name.endswith("sinks") or name == "model.embed_tokens.weight":
        values = torch.randn(spec.shape, generator=generator, device=device)
    elif name.endswith("router.weight"):
        # Router logits need spread, or every token picks the same experts.
        values = torch.randn(spec.shape, generator=generator, device=device) / spec.shape[-1] ** 0.5
    elif name.endswith("bias"):
        values = 0.05 * torch.randn(spec.shape, generator=generator, device=device)
    else:
        values = torch.randn(spec.shape, generator=generator, device=device) / spec.shape[-1] ** 0.5
    return values.to(spec.dtype)
