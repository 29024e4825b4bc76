"""RMSNorm fused with the residual add, in Triton: one launch where torch needs about ten.

`add_rms_norm(x, residual, weight, eps)` returns `(rms_norm(x + residual), x + residual)` (its torch reference:
`kernels.reference.add_rms_norm_reference`): the pre-norm transformer's "add the sublayer output to the
residual stream, then normalise for the next sublayer". The
sum is rounded to x's dtype before it is normalised and before it is stored as the new residual, exactly as
`x = x + sublayer(...)` followed by `rms_norm(x)` does in torch (and transformers), so the fused path
changes no bit of the residual stream and the normalised value differs from the unfused torch ops only by
the fp32 summation order of the mean of squares (<= a few fp32 ulps before the final rounding).
With `residual=None` (the first layer) it is a plain RMSNorm and the residual is x itself (no copy).

One program per row; the row (hidden 2880 at gpt-oss -> BLOCK_H 4096) is held in registers, and the
reduction order is fixed by BLOCK_H alone, so a row's bits do not depend on the batch.

The kernel is a plain function jitted lazily (as in kernels/matmul.py) so `TRITON_INTERPRET` is read at
launch; it reduces with `tl.reduce(..., tl.standard._sum_combine)`, which the interpreter runs with numpy even
when triton was imported before the variable was set (see kernels/attention.py `_row_max`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gptoss.kernels.moe import interpreting


def _add_rms_norm_kernel(
    x_ptr,  # [T, H]
    residual_ptr,  # [T, H] (unused without HAS_RESIDUAL)
    weight_ptr,  # [H]
    out_ptr,  # [T, H] normalised
    residual_out_ptr,  # [T, H] x + residual, in x's dtype (unused without HAS_RESIDUAL)
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the activation dtype first: the residual stream keeps the bits of torch's `x + r`.
        s = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, s, mask=mask)
        x = s.to(tl.float32)
    mean_sq = tl.reduce(x * x, 0, tl.standard._sum_combine) / H
    y = x * tl.rsqrt(mean_sq + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


_JITTED: dict[bool, object] = {}


def _kernel() -> object:
    mode = interpreting()
    if mode not in _JITTED:
        _JITTED[mode] = triton.jit(_add_rms_norm_kernel)
    return _JITTED[mode]


def num_warps_for(hidden: int) -> int:
    """4 warps up to 4096 elements a row (32 fp32 values a thread at gpt-oss's 2880 -> 4096), 8 beyond."""
    return 4 if hidden <= 4096 else 8


def launch_specs(model, scenario) -> list:
    """The fused add + RMSNorm launches of one step (kernels.launch_spec types), for
    benchmarks/static_report.py: two per layer and the final norm, one program a token."""
    from gptoss.kernels.launch_spec import LaunchSpec

    tokens, hidden = scenario.tokens, model.hidden
    row_bytes = hidden * 2 * 4 + hidden * 2  # x, residual in; out, residual out; the weight
    return [
        LaunchSpec(
            name="norm.add_rms_norm",
            kernel=_add_rms_norm_kernel,
            pointers={**dict.fromkeys(("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr"), "*bf16"),
                      "eps": "fp32"},
            constants={"HAS_RESIDUAL": True, "BLOCK_H": triton.next_power_of_2(hidden)},
            num_warps=num_warps_for(hidden), num_stages=1, ctas=tokens, bytes_per_cta=row_bytes,
            total_bytes=tokens * row_bytes, launches_per_step=2 * model.layers + 1,
            aligned=("stride_x", "stride_r", "stride_o", "stride_ro", "H") if hidden % 16 == 0 else (),
        )
    ]  # fmt: skip


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(x + residual) * weight, x + residual)` for `x`, `residual` `[T, H]` (same dtype) and `weight`
    `[H]`; with `residual=None`, `(rms_norm(x) * weight, x)`. Outputs are in x's dtype."""
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)} must be [T, H] and weight {tuple(weight.shape)} [H]")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    if not x.is_cuda and not interpreting():
        raise RuntimeError("gptoss.kernels.norm needs CUDA tensors (or TRITON_INTERPRET=1); use the reference on CPU")
    for t in (x, residual, weight):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("the last dim of x, residual and weight must be contiguous")
    num_tokens, hidden = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x
    if num_tokens == 0:
        return out, residual_out
    _kernel()[(num_tokens,)](
        x, residual if residual is not None else x, weight, out, residual_out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), residual_out.stride(0),
        hidden, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK_H=triton.next_power_of_2(hidden),
        num_warps=num_warps_for(hidden),
    )  # fmt: skip
    return out, residual_out
