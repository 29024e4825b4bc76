"""The model's collectives over a tensor-parallel group, with the summation order fixed where it matters.

A ring or tree all-reduce (NCCL's, gloo's) cuts the buffer into chunks whose boundaries depend on its size, so
which partial sums an element goes through, and in what order, depends on how many tokens the batch holds:
a token's bits would change with the batch. `reduce_sum(..., fixed_order=True)` instead adds every element's
N partials in rank order, `((p0 + p1) + p2) + ...`, whatever the batch, in one of two ways that give the same
bits (so the choice, made from the size, cannot leak the batch into a token either):
- small messages (decode): all-gather the partials, add locally; one collective, (N-1) x S bytes received;
- large messages (prefill): all-to-all (rank r receives every rank's r-th slice), add its slice in rank order,
  all-gather the sums; two collectives but 2 (N-1)/N x S bytes, what a ring all-reduce moves.
The crossover is where the all-gather's extra bytes cost more than one more collective's latency
(`LATENCY_BYTES`: ~10 us at NVLink's 450 GB/s). `fixed_order=False` is a plain all-reduce (the engine's
`--no-batch-invariant` mode).

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


# Bytes a link moves in one small collective's latency (10 us at 450 GB/s): the all-gather reduction's extra
# traffic must exceed this before a second collective pays.
LATENCY_BYTES = 4.5e6


def _sum_in_rank_order(parts: torch.Tensor) -> torch.Tensor:
    """`[N, ...]` -> `[...]`: parts[0] + parts[1] + ... added left to right (elementwise, batch-independent)."""
    out = parts[0] + parts[1]
    for r in range(2, parts.shape[0]):
        out += parts[r]
    return out


def _reduce_two_phase(x: torch.Tensor, world_size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-to-all the flat partial's N slices, sum one slice per rank in rank order, all-gather the sums."""
    flat = x.contiguous().view(-1)
    numel = flat.numel()
    chunk = -(-numel // world_size)
    if chunk * world_size != numel:
        flat = torch.nn.functional.pad(flat, (0, chunk * world_size - numel))
    received = torch.empty_like(flat)
    dist.all_to_all_single(received, flat, group=group)  # received[j * chunk:] = rank j's slice `rank`
    mine = _sum_in_rank_order(received.view(world_size, chunk))
    return all_gather_stacked(mine, world_size, group).view(-1)[:numel].view(x.shape)


def reduce_sum(
    x: torch.Tensor,
    world_size: int,
    group: dist.ProcessGroup | None,
    fixed_order: bool = True,
    two_phase: bool | None = None,
) -> torch.Tensor:
    """The sum of `x` over the ranks, on every rank (a new tensor or `x` itself, summed in place).

    `two_phase` forces the large-message method on or off (tests); by default it is picked from the size."""
    if world_size == 1:
        return x
    if not fixed_order:
        dist.all_reduce(x, group=group)
        return x
    if two_phase is None:
        two_phase = x.nbytes * (world_size - 1) * (world_size - 2) / world_size > LATENCY_BYTES
    if two_phase:
        return _reduce_two_phase(x, world_size, group)
    return _sum_in_rank_order(all_gather_stacked(x, world_size, group))


def gather_last_dim(x: torch.Tensor, world_size: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`[N, C]` per rank -> `[N, world_size * C]`, rank r's columns at `r*C : (r+1)*C` (vocab-parallel logits)."""
    if world_size == 1:
        return x
    parts = all_gather_stacked(x, world_size, group)  # [W, N, C]
    return parts.permute(1, 0, 2).reshape(x.shape[0], world_size * x.shape[1])
