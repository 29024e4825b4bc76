"""RMSNorm on the CPU path."""

from __future__ import annotations

import torch


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.reference.add_rms_norm_reference` in two ops rather than nine: torch's own RMSNorm on the fp32
    sum (the same math; tests/test_cpu_kernels.py checks it against the reference)."""
    summed = x if residual is None else x + residual
    x32 = summed.to(torch.float32)
    normed = torch.nn.functional.rms_norm(x32, (x32.shape[-1],), weight.to(torch.float32), eps)
    return normed.to(x.dtype), summed
