"""The fused residual add + RMSNorm (kernels/norm.py) against its torch reference.

Without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set by conftest): that checks its
indexing, masking and arithmetic in fp32; bf16 numerics on GPU are checked by the same tests on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from gptoss.kernels.norm import add_rms_norm
from gptoss.kernels.reference import add_rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# (rows, hidden): ragged row counts, hidden sizes below, at and above a power of two (gpt-oss: 2880).
SHAPES = [(1, 96), (3, 64), (7, 2880), (16, 100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{h}" for r, h in SHAPES])
def test_add_rms_norm_matches_reference(dtype: torch.dtype, with_residual: bool, shape: tuple[int, int]) -> None:
    """The residual sum is bit-identical to torch's `x + residual` (one rounding of the exact fp32 sum of two
    16-bit or fp32 values either way). The normalised output differs only by the summation order of the
    mean of squares: within 1e-6 relative in fp32, and within one bf16 rounding (2^-8 relative) in bf16.
    The interpreter converts fp32 to bf16 by truncation, not to nearest (triton 3.9, measured): there the
    bf16 sum is within one bf16 ulp (2^-7 relative) and the output within two (2^-6)."""
    rows, hidden = shape
    gen = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    residual = (torch.randn(rows, hidden, generator=gen) * 10).to(dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    expected, expected_sum = add_rms_norm_reference(x, residual, weight, 1e-5)
    x, weight = x.to(DEVICE), weight.to(DEVICE)
    out, summed = add_rms_norm(x, residual.to(DEVICE) if residual is not None else None, weight, 1e-5)
    assert out.dtype == dtype and summed.dtype == dtype and out.shape == x.shape
    truncating = dtype == torch.bfloat16 and DEVICE == "cpu"
    if truncating:
        torch.testing.assert_close(summed.float().cpu(), expected_sum.float(), rtol=2.0**-7, atol=0)
    else:
        assert torch.equal(summed.cpu(), expected_sum)
    if not with_residual:
        assert summed is x  # x itself, no copy
    rtol = 1e-6 if dtype == torch.float32 else 2.0**-6 if truncating else 2.0**-8
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=rtol, atol=1e-6)


def test_strided_rows_and_empty() -> None:
    """Rows with a stride larger than hidden (a slice of a wider buffer), and zero rows."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 80, generator=gen).to(DEVICE)
    x, residual, weight = wide[:, :48], wide[:, 16:64], torch.randn(48, generator=gen).to(DEVICE)
    out, summed = add_rms_norm(x, residual, weight, 1e-5)
    expected, expected_sum = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(summed, expected_sum)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    out, summed = add_rms_norm(x[:0], residual[:0], weight, 1e-5)
    assert out.shape == (0, 48) and summed.shape == (0, 48)


def test_rejects_mismatched_inputs() -> None:
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, None, torch.zeros(7, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.zeros(2, 8, dtype=torch.float64, device=DEVICE), torch.zeros(8, device=DEVICE), 1e-5)


def test_rows_are_batch_invariant() -> None:
    """A row's bits do not depend on how many rows share the launch."""
    gen = torch.Generator().manual_seed(4)
    x, residual = torch.randn(9, 2880, generator=gen).to(DEVICE), torch.randn(9, 2880, generator=gen).to(DEVICE)
    weight = torch.randn(2880, generator=gen).to(DEVICE)
    out, _ = add_rms_norm(x, residual, weight, 1e-5)
    for row in (0, 4, 8):
        alone, _ = add_rms_norm(x[row : row + 1], residual[row : row + 1], weight, 1e-5)
        assert torch.equal(alone[0], out[row])
