"""Picks the implementation of each heavy op for where its tensors live: Triton on CUDA, torch elsewhere
(`kernels/cpu.py`: the references of `kernels/reference.py` rearranged for speed).

The Triton modules are imported lazily so a CPU-only install never compiles anything.
"""

from __future__ import annotations

import torch
from gptoss.kernels import cpu, reference


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch_invariant: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`x` `[T, K]` @ `weight` `[N, K]`^T + `bias` `[N]` -> `[T, N]` in `out_dtype` (default x.dtype).

    cuBLAS picks its algorithm (and split-K) from the row count, so a row's bits depend on the batch; in
    batch-invariant mode CUDA tensors go through the Triton kernel, whose per-element reduction order depends
    on K only (it accumulates in fp32 and rounds once, to out_dtype). Otherwise, and on CPU, torch.
    """
    if x.is_cuda and batch_invariant:
        from gptoss.kernels.matmul import linear as triton_linear

        return triton_linear(x, weight, bias, out_dtype=out_dtype)
    out = torch.nn.functional.linear(x, weight, bias)
    return out if out_dtype is None else out.to(out_dtype)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store `[T, Hkv, D]` keys/values into the paged caches at `slot_mapping` `[T]`."""
    if key.is_cuda:
        from gptoss.kernels.attention import write_kv as triton_write_kv

        triton_write_kv(key, value, k_cache, v_cache, slot_mapping)
    else:
        cpu.write_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    max_query_len: int,
    max_seq_len: int,
    batch_invariant: bool = True,
) -> torch.Tensor:
    """Attention of `[T, Hq, D]` queries over the paged cache; see kernels.reference.paged_attention_reference."""
    if query.is_cuda:
        from gptoss.kernels.attention import paged_attention as triton_paged_attention

        return triton_paged_attention(
            query,
            k_cache,
            v_cache,
            block_tables,
            query_start_loc,
            seq_lens,
            sinks,
            scale,
            sliding_window,
            batch_invariant=batch_invariant,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
        )
    return cpu.paged_attention(
        query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, sinks, scale, sliding_window, max_query_len
    )


def moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w1_blocks: torch.Tensor,
    w1_scales: torch.Tensor,
    w1_bias: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    w2_bias: torch.Tensor,
    top_k: int,
    swiglu_limit: float,
    swiglu_alpha: float,
    packed: tuple | None = None,
    expert_start: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The MXFP4 mixture of experts on `[T, H]`; see kernels.reference.moe_reference.

    On CUDA the Triton kernel reads `packed` (w1, w2 `kernels.moe.Mxfp4Weights`, made at load by
    `MXFP4Experts.pack_for_kernels`; the blocks/scales arguments then hold the same packed bytes). It is
    batch-invariant in every mode. Elsewhere `kernels.cpu.moe` (the reference, with cached dequantised experts)
    reads the checkpoint layout.

    Expert parallel: the weights hold experts `expert_start ..` only (router_logits still cover all experts);
    the result is then the sum over the slots routed to those experts, in `out_dtype` (default x's dtype). On
    CPU that is the reference itself (tensor parallelism on CPU is for tests)."""
    ep = {"expert_start": expert_start, "out_dtype": out_dtype}
    if x.is_cuda:
        if packed is None:
            raise RuntimeError("CUDA MoE weights are not packed: call GptOssModel.pack_experts() after loading")
        from gptoss.kernels.moe import fused_moe

        return fused_moe(x, router_logits, packed[0], packed[1], top_k, swiglu_limit, swiglu_alpha, **ep)
    args = (x, router_logits, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias, top_k)
    if w1_blocks.shape[0] != router_logits.shape[1] or out_dtype is not None:
        return reference.moe_reference(*args, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, **ep)
    return cpu.moe(*args, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha)
