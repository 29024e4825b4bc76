"""Picks the implementation of each heavy op: Triton kernels or the torch path (`kernels/cpu/`, the references
of `kernels/reference.py` rearranged for speed, and the references themselves).

`backend` (EngineArgs.kernel_backend): "auto" runs Triton on CUDA tensors and the torch path elsewhere;
"triton" runs the Triton kernels wherever the tensors are, CPU tensors through the Triton interpreter
(`TRITON_INTERPRET=1`, set before the kernels are imported: `enable_triton_interpreter`); "torch" runs the
torch path everywhere. The Triton modules are imported lazily so a CPU-only install never compiles anything.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from gptoss.kernels import cpu, reference


def use_triton(tensor: torch.Tensor, backend: str) -> bool:
    """Whether an op on `tensor` runs the Triton kernel under `backend` (see the module docstring)."""
    if backend == "auto":
        return tensor.is_cuda
    if backend == "torch":
        return False
    if backend == "triton":
        from gptoss.kernels.moe import interpreting

        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(
                "kernel_backend='triton' on CPU tensors runs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before the kernels are imported (ops.enable_triton_interpreter())"
            )
        return True
    raise ValueError(f"kernel_backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def enable_triton_interpreter() -> None:
    """Run Triton kernels on CPU from now on: set TRITON_INTERPRET=1 and re-import kernels.attention if it was
    imported without it (its kernels are decorated at import; the others are jitted at launch)."""
    os.environ["TRITON_INTERPRET"] = "1"
    module = sys.modules.get("gptoss.kernels.attention")
    if module is not None and not module._is_interpreted(module._prefill_kernel):
        importlib.reload(module)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch_invariant: bool = True,
    out_dtype: torch.dtype | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """`x` `[T, K]` @ `weight` `[N, K]`^T + `bias` `[N]` -> `[T, N]` in `out_dtype` (default x.dtype).

    cuBLAS picks its algorithm (and split-K) from the row count, so a row's bits depend on the batch; in
    batch-invariant mode CUDA tensors go through the Triton kernel, whose per-element reduction order depends
    on K only (it accumulates in fp32 and rounds once, to out_dtype); CPU tensors go through torch in tiles of
    one fixed shape (a CPU BLAS likewise picks its kernel from the row count). Otherwise torch (cuBLAS is
    faster when the bits may depend on the batch).
    """
    if batch_invariant and use_triton(x, backend):
        from gptoss.kernels.matmul import linear as triton_linear

        return triton_linear(x, weight, bias, out_dtype=out_dtype)
    if batch_invariant and not x.is_cuda:
        out = reference.linear_fixed_shape(x, weight, bias)
    else:
        out = torch.nn.functional.linear(x, weight, bias)
    return out if out_dtype is None else out.to(out_dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual) * weight, x + residual)` `[T, H]`; see kernels.norm.add_rms_norm."""
    if use_triton(x, backend):
        from gptoss.kernels.norm import add_rms_norm as triton_add_rms_norm

        return triton_add_rms_norm(x, residual, weight, eps)
    return cpu.add_rms_norm(x, residual, weight, eps)


def rope_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """RoPE on the fused projection's q and k heads, k and v stored to the cache; returns q `[T, Hq, D]`.
    See kernels.reference.rope_write_kv_reference (the torch path: kernels.cpu.rope_write_kv, equal to it bit for
    bit; its q is a view, not contiguous across tokens)."""
    args = (qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping, num_q_heads)
    if use_triton(qkv, backend):
        from gptoss.kernels.attention import rope_write_kv as triton_rope_write_kv

        return triton_rope_write_kv(*args)
    return cpu.rope_write_kv(*args)


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
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of `[T, Hq, D]` queries over the paged cache; see kernels.reference.paged_attention_reference."""
    if use_triton(query, backend):
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
        query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, sinks, scale, sliding_window, batch_invariant
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
    *,
    backend: str = "auto",
    expert_start: int = 0,
    out_dtype: torch.dtype | None = None,
    batch_invariant: bool = True,
) -> torch.Tensor:
    """The MXFP4 mixture of experts on `[T, H]`; see kernels.reference.moe_reference.

    The Triton kernel reads `packed` (w1, w2 `kernels.moe.Mxfp4Weights`, made at load by
    `MXFP4Experts.pack_for_kernels` when the model's backend runs it; the blocks/scales arguments then hold the
    same packed bytes). It is batch-invariant in every mode. The torch path, `kernels.cpu.moe` (the reference,
    with cached dequantised experts), reads the checkpoint layout.

    Expert parallel: the weights hold experts `expert_start ..` only (router_logits still cover all experts);
    the result is then the sum over the slots routed to those experts, in `out_dtype` (default x's dtype). On
    the torch path that is the reference itself (tensor parallelism there is for tests)."""
    ep = {"expert_start": expert_start, "out_dtype": out_dtype}
    if use_triton(x, backend):
        if packed is None:
            raise RuntimeError("MoE weights are not packed for the Triton kernel: call GptOssModel.pack_experts()")
        from gptoss.kernels.moe import fused_moe

        return fused_moe(x, router_logits, packed[0], packed[1], top_k, swiglu_limit, swiglu_alpha, **ep)
    args = (x, router_logits, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias, top_k)
    if w1_blocks.shape[0] != router_logits.shape[1] or out_dtype is not None:
        return reference.moe_reference(*args, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, **ep)
    return cpu.moe(*args, swiglu_limit=swiglu_limit, swiglu_alpha=swiglu_alpha, batch_invariant=batch_invariant)
