"""The gpt-oss transformer over a flat batch of tokens from many sequences and a paged KV cache.

Module and parameter names follow the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj.weight`, ...)
so the loader maps tensors by name. MXFP4 experts stay packed (uint8 blocks and e8m0 scales); the MoE op
dequantises them on the fly. Heavy ops go through `gptoss.engine.model.ops`, which picks Triton kernels or the
torch references by `kernel_backend` ("auto": Triton on CUDA, torch elsewhere).

The decode path is a fixed list of launches per layer (at most 12; tests/test_model.py counts them):
add+RMSNorm, the fused q/k/v GEMM, RoPE + KV write, attention (split + combine), o_proj, add+RMSNorm, router
GEMM, MoE (route, two matmuls, combine). The residual stream is carried beside the hidden states: each
sublayer's output is added to it inside the next RMSNorm (`ops.add_rms_norm`), the MoE's by the next layer's
input norm (or the final norm), so no add runs on its own. q/k/v share one weight `[q; k; v]` concatenated
once after loading (`Attention.fuse_qkv`); the per-projection parameters stay (as views into it) so the loader
and a tensor-parallel split per rank see the checkpoint's names and shapes.

Multi-GPU (tensor parallel): every layer takes `rank` and `world_size` and loads only its share of the weights
(engine/model/parallel_layers.py). Attention splits its heads (column-parallel q/k/v, row-parallel o_proj),
the MoE its experts (expert parallel; the router is replicated so every rank routes identically), the
embedding and unembedding the vocabulary. Each layer's attention and MoE end in one sum over ranks, in a fixed
order in batch-invariant mode (engine/distributed/collectives.py), so every rank holds the full hidden state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from gptoss.engine.distributed.collectives import reduce_sum
from gptoss.engine.model import ops
from gptoss.engine.model.config import ModelConfig
from gptoss.engine.model.forward_batch import ForwardBatch
from gptoss.engine.model.parallel_layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    attention_heads,
    even_shard,
)
from gptoss.engine.worker.kv_cache import KVCache
from gptoss.kernels.reference import MXFP4_BLOCK, rope_cos_sin, yarn_inv_freq
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(rms_norm(x + residual), x + residual)`, `[T, H]` each; `residual=None`: `(rms_norm(x), x)`."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps, backend=backend)


def _linear(in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    layer.requires_grad_(False)
    return layer


class Attention(nn.Module):
    """GQA attention with sinks; sliding-window or full by layer type. Heads are split over ranks (KV heads
    replicated when there are more ranks than KV heads)."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer]
        self.sliding_window = config.window_of_layer(layer)
        self.head_dim = d = config.head_dim
        self.q_head_start, self.num_heads, kv_head_start, self.num_kv_heads = attention_heads(config, rank, world_size)
        self.scale = config.head_dim**-0.5
        h = config.hidden_size
        self.q_proj = ColumnParallelLinear(h, self.num_heads * d, self.q_head_start * d, True, dtype)
        self.k_proj = ColumnParallelLinear(h, self.num_kv_heads * d, kv_head_start * d, True, dtype)
        self.v_proj = ColumnParallelLinear(h, self.num_kv_heads * d, kv_head_start * d, True, dtype)
        self.o_proj = RowParallelLinear(self.num_heads * d, h, self.q_head_start * d, dtype, world_size, group)
        # Sinks stay fp32: they join an fp32 softmax denominator.
        self.sinks = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32), requires_grad=False)
        self.qkv_weight: torch.Tensor | None = None  # [q; k; v] `[(Hq + 2 Hkv) * D, H]`, made by fuse_qkv
        self.qkv_bias: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Concatenate this rank's q, k and v weights and biases into one `[q; k; v]` projection (once, after
        the weights are loaded), and make the three parameters views into it: no memory is duplicated, and
        a later in-place load into q/k/v_proj still updates the fused weight."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections])
        start = 0
        for p in projections:
            rows = p.weight.shape[0]
            p.weight.data = weight[start : start + rows]
            p.bias.data = bias[start : start + rows]
            start += rows
        self.qkv_weight, self.qkv_bias = weight, bias

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """The sinks of this rank's query heads."""
        param.copy_(loaded[self.q_head_start : self.q_head_start + self.num_heads])

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope_tables: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        kv_cache: KVCache,
        batch_invariant: bool,
        backend: str,
    ) -> torch.Tensor:
        """`x` `[T, H]` (normalised) at `positions` `[T]` -> `[T, H]`; writes this step's keys/values into
        `kv_cache`. `rope_tables`: YaRN cos and sin `[max_positions, D/2]` fp32."""
        num_tokens = x.shape[0]
        if self.qkv_weight is None or self.qkv_weight.device != x.device:
            self.fuse_qkv()  # a model whose weights were set without the loader
        qkv = ops.linear(x, self.qkv_weight, self.qkv_bias, batch_invariant, backend=backend)
        k_cache, v_cache = kv_cache
        cos_table, sin_table = rope_tables
        q = ops.rope_write_kv(
            qkv, positions, cos_table, sin_table, k_cache, v_cache, batch.slot_mapping[self.layer_type],
            self.num_heads, backend=backend,
        )  # fmt: skip
        attn = ops.paged_attention(
            q,
            k_cache,
            v_cache,
            batch.block_tables[self.layer_type],
            batch.query_start_loc,
            batch.seq_lens,
            self.sinks,
            self.scale,
            self.sliding_window,
            max_query_len=batch.max_query_len,
            max_seq_len=batch.max_seq_len,
            batch_invariant=batch_invariant,
            backend=backend,
        )
        # reshape is a view: every path returns a contiguous [T, Hq, D].
        return self.o_proj(attn.reshape(num_tokens, -1), batch_invariant, backend)


class MXFP4Experts(nn.Module):
    """This rank's experts (`num_local_experts / world_size` whole experts from `expert_start`), as stored in
    the checkpoint; biases in fp32 (they are added in fp32).

    When the Triton MoE runs them (kernel_backend "auto" on CUDA, or "triton"), `pack_for_kernels` (called by
    the loader once the weights are in) re-lays values and scales on the device into the MoE kernel's tiled
    layout (kernels/moe.py `pack_mxfp4`) and keeps only that copy: the parameters then hold the packed bytes
    (same count, other shapes) and `packed` the kernel's view. The torch path keeps the checkpoint layout (the
    torch reference reads it).
    """

    def __init__(self, config: ModelConfig, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.expert_start, e = even_shard(config.num_local_experts, rank, world_size, "experts")
        h, i = config.hidden_size, config.intermediate_size
        half_block = MXFP4_BLOCK // 2
        u8 = torch.uint8
        self.gate_up_proj_blocks = nn.Parameter(
            torch.empty(e, 2 * i, h // MXFP4_BLOCK, half_block, dtype=u8), requires_grad=False
        )
        self.gate_up_proj_scales = nn.Parameter(torch.empty(e, 2 * i, h // MXFP4_BLOCK, dtype=u8), requires_grad=False)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * i, dtype=torch.float32), requires_grad=False)
        self.down_proj_blocks = nn.Parameter(
            torch.empty(e, h, i // MXFP4_BLOCK, half_block, dtype=u8), requires_grad=False
        )
        self.down_proj_scales = nn.Parameter(torch.empty(e, h, i // MXFP4_BLOCK, dtype=u8), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.empty(e, h, dtype=torch.float32), requires_grad=False)
        self.packed: tuple | None = None  # (w1, w2) kernels.moe.Mxfp4Weights once packed

    def pack_for_kernels(self, backend: str) -> None:
        """Re-lay the weights for the Triton MoE kernel (once, after loading; a no-op when `backend` runs the
        torch reference on these tensors, or when done)."""
        if self.packed is not None or not ops.use_triton(self.gate_up_proj_blocks, backend):
            return
        from gptoss.kernels.moe import pack_mxfp4

        packed = []
        for name in ("gate_up_proj", "down_proj"):
            blocks, scales = getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales")
            weights = pack_mxfp4(blocks, scales, getattr(self, f"{name}_bias"))
            # Replace, so the checkpoint-layout copy is freed (65 GB at 120b: two copies would not fit).
            setattr(self, f"{name}_blocks", nn.Parameter(weights.values, requires_grad=False))
            setattr(self, f"{name}_scales", nn.Parameter(weights.scales, requires_grad=False))
            packed.append(weights)
        self.packed = tuple(packed)

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        """Every expert tensor is `[E, ...]`: this rank's experts are a contiguous run of its first dim."""
        param.copy_(loaded[self.expert_start : self.expert_start + param.shape[0]])


class MoE(nn.Module):
    """Expert-parallel MoE: the router is replicated (every rank routes every token identically), each rank
    runs the tokens' slots that chose its experts, and one sum over ranks combines them."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.router = _linear(config.hidden_size, config.num_local_experts, True, dtype)
        self.experts = MXFP4Experts(config, rank, world_size)
        self.top_k = config.num_experts_per_tok
        self.swiglu_limit = config.swiglu_limit
        self.swiglu_alpha = config.swiglu_alpha
        self.world_size = world_size
        self.group = group

    def forward(self, x: torch.Tensor, batch_invariant: bool, backend: str) -> torch.Tensor:
        """`x` `[T, H]` (normalised) -> `[T, H]`."""
        experts = self.experts
        parallel = self.world_size > 1
        out = ops.moe(
            x,
            ops.linear(x, self.router.weight, self.router.bias, batch_invariant, backend=backend),
            experts.gate_up_proj_blocks,
            experts.gate_up_proj_scales,
            experts.gate_up_proj_bias,
            experts.down_proj_blocks,
            experts.down_proj_scales,
            experts.down_proj_bias,
            self.top_k,
            self.swiglu_limit,
            self.swiglu_alpha,
            packed=experts.packed,
            backend=backend,
            expert_start=experts.expert_start,
            # This rank's partial stays fp32 through the sum over ranks: one rounding, as on one GPU.
            out_dtype=torch.float32 if parallel else None,
        )
        if not parallel:
            return out
        return reduce_sum(out, self.world_size, self.group, fixed_order=batch_invariant).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, layer, dtype, rank, world_size, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MoE(config, dtype, rank, world_size, group)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope_tables: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        kv_cache: KVCache,
        batch_invariant: bool,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x, residual)` -> `(moe output, residual)`: the layer's input is `x + residual` (x alone when
        residual is None), and its output `moe output + residual`, left for the next norm to add."""
        h, residual = self.input_layernorm(x, residual, backend)
        h = self.self_attn(h, positions, rope_tables, batch, kv_cache, batch_invariant, backend)
        h, residual = self.post_attention_layernorm(h, residual, backend)
        return self.mlp(h, batch_invariant, backend), residual


class Backbone(nn.Module):
    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, rank: int, world_size: int, group: dist.ProcessGroup | None
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, dtype, rank, world_size, group
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, layer, dtype, rank, world_size, group) for layer in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class GptOssModel(nn.Module):
    """gpt-oss for causal LM. Build it with `GptOssModel.create` (no init work on the weights), then load.

    Parameters use the checkpoint's names (each rank's hold its share: see parallel_layers); `forward` returns
    final hidden states and `compute_logits` the fp32 logits of the rows that sample. With `world_size > 1`
    every rank calls both with the same inputs (they run collectives over `group`, default the world).
    """

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.bfloat16,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.rank = rank
        self.world_size = world_size
        self.model = Backbone(config, dtype, rank, world_size, group)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, rank, world_size, group)
        self.batch_invariant = True
        # "auto", "triton" or "torch" (ops.use_triton); the runner sets EngineArgs.kernel_backend before loading:
        # the MoE weights' layout depends on it.
        self.kernel_backend = "auto"
        self._rope_cos: torch.Tensor | None = None
        self._rope_sin: torch.Tensor | None = None

    @classmethod
    def create(
        cls,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
    ) -> GptOssModel:
        """Allocate the model (rank's share of it) on `device` with uninitialised weights (built on `meta`, so
        nothing is computed for weights that the loader overwrites anyway)."""
        with torch.device("meta"):
            model = cls(config, dtype, rank, world_size, group)
        model.to_empty(device=device)
        model.eval()
        return model

    def finish_loading(self) -> None:
        """Build the kernels' weight layouts from the loaded parameters (the loaders call it once at the end):
        the fused q/k/v weight, and the MoE weights re-laid for the Triton kernel when `kernel_backend` runs it
        (so set the backend before loading)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_qkv()
        self.pack_experts()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def pack_experts(self) -> None:
        """Re-lay every layer's MXFP4 experts for the Triton MoE kernel (after loading; a no-op on the torch
        path: CPU under kernel_backend "auto")."""
        for layer in self.model.layers:
            layer.mlp.experts.pack_for_kernels(self.kernel_backend)

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin `[max_positions, head_dim/2]`, computed once per device, in fp32 as transformers does."""
        if self._rope_cos is None or self._rope_cos.device != device:
            config = self.config
            rope = config.rope_scaling
            inv_freq, attention_factor = yarn_inv_freq(
                config.head_dim,
                config.rope_theta,
                rope.factor,
                rope.original_max_position_embeddings,
                rope.beta_fast,
                rope.beta_slow,
                rope.truncate,
            )
            positions = torch.arange(config.max_position_embeddings, device=device)
            self._rope_cos, self._rope_sin = rope_cos_sin(
                positions, inv_freq.to(device), attention_factor, torch.float32
            )
        return self._rope_cos, self._rope_sin

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        batch: ForwardBatch,
        kv_caches: list[KVCache],
    ) -> torch.Tensor:
        """Token ids `[T]` at `positions` `[T]` -> final hidden states `[T, H]`, reading and writing the cache."""
        rope_tables = self._rope_tables(input_ids.device)
        backend = self.kernel_backend
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, rope_tables, batch, kv_cache, self.batch_invariant, backend)
        return self.model.norm(x, residual, backend)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` -> `[N, V]` fp32 (batch-invariant on CUDA: written in fp32 straight from the accumulator)."""
        return self.lm_head(hidden, self.batch_invariant, self.kernel_backend)
