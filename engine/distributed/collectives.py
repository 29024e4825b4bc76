"""The model's collectives over a tensor-parallel group, with the summation order fixed where it matters.

A ring or tree all-reduce (NCCL's, gloo's) cuts the buffer into chunks whose boundaries depend on its size, so
which partial sums an element goes through, and in what order, depends on how many tokens the batch holds:
a token's bits would change with the batch. `reduce_sum(..., fixed_order=True)` instead all-gathers the
ranks' partials and adds them locally in rank order, `((p0 + p1) + p2) + ...` for every element, whatever the
batch. It moves (N-1)/N x N times the bytes of a reduce-scatter + all-gather all-reduce (N = world size)
but a decode step's partial is a few kB to a few hundred kB, so latency dominates either way (see
benchmarks/RESULTS.md). `fixed_order=False` is a plain all-reduce (the engine's `--no-batch-invariant` mode).

With world size 1 every function returns its input: the single-GPU path runs no collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_stacked(x: torch.Tensor, world_size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`[*S]` on each rank -> `[world_size, *S]`, rank r's tensor at index r (one collective, capturable)."""
    x = x.contiguous()
    out = torch.empty((world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    # torch >= 2.12 names the flat all-gather `all_gather_single`; older releases `all_gather_into_tensor`.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out.view(world_size, *x.shape)


def reduce_sum(
    x: torch.Tensor, world_size: int, group: dist.ProcessGroup | None, fixed_order: bool = True
) -> torch.Tensor:
    """The sum of `x` over the ranks, on every rank (a new tensor or `x` itself, summed in place)."""
    if world_size == 1:
        return x
    if not fixed_order:
        dist.all_reduce(x, group=group)
        return x
    parts = all_gather_stacked(x, world_size, group)
    out = parts[0] + parts[1]
    for r in range(2, world_size):
        out += parts[r]
    return out


def gather_last_dim(x: torch.Tensor, world_size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`[N, C]` per rank -> `[N, world_size * C]`, rank r's columns at `r*C : (r+1)*C` (vocab-parallel logits)."""
    if world_size == 1:
        return x
    parts = all_gather_stacked(x, world_size, group)  # [W, N, C]
    return parts.permute(1, 0, 2).reshape(x.shape[0], world_size * x.shape[1])
