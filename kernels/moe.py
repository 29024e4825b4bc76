"""Fused MXFP4 mixture-of-experts for gpt-oss: routing, two grouped matmuls, SwiGLU, weighted combine.

Data flow for `fused_moe(x [T, H], router_logits [T, E], ...)` with P = T * top_k (token, slot) pairs:

1. `moe_route` (no host sync; one Triton program for decode-sized batches, torch ops beyond): top-k by
   logit, softmax over the k in fp32, then the pairs sorted by expert (stable, so by pair id inside an
   expert) and cut into row tiles of `block_m` rows that never straddle two experts. The grid is an upper
   bound on the tile count; slots past the real tiles and empty experts exit at once, so decode does no
   work for the experts nobody chose.
2. matmul 1 (`_moe_matmul_kernel`, SWIGLU epilogue): for each tile, gather the tile's token rows of x, multiply
   by W1[e]^T read as packed MXFP4 and dequantised in registers, add b1, split the interleaved gate/up
   columns, clamped SwiGLU -> `act [P, I]` in expert-sorted row order.
3. matmul 2 (same kernel, WEIGHTED epilogue): `act @ W2[e]^T + b2`, times the pair's routing weight, written
   to row `pair` of `y [P, H]` fp32 (batch-invariant mode) or atomically added into `out32 [T, H]` (fast mode).
4. combine (`_moe_combine_kernel`): out[t] = sum over slots j = 0..k-1 of y[t * k + j], in that fixed order.

Batch invariance (the default): the K loop always uses the same BLOCK_K and never splits K, each output row
of a tile depends only on its own input row, and BLOCK_N, BLOCK_K and the rows per warp are fixed per model
shape; only BLOCK_M (with num_warps) grows with the token count, between tiles that run the same Hopper MMA
instruction sequence per warpgroup (see _INVARIANT_CONFIGS). The combine sums the k slots in slot order.
So a token's output is bit-identical alone or in any batch.

The kernels are plain functions turned into Triton kernels lazily (`_kernels()`) so that whether they run
in the interpreter is decided by `TRITON_INTERPRET` at launch time, not at import time: triton 3.6 and 3.9
both choose `InterpretedFunction` vs `JITFunction` inside `triton.jit(...)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

MXFP4_BLOCK = 32  # fp4 values sharing one e8m0 scale


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`), read at every launch."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (plain functions, jitted in `_kernels`)
# ----------------------------------------------------------------------------------------------------------


def _moe_matmul_kernel(
    a_ptr,
    stride_am,
    stride_ak,  # activations: x [T, K] (GATHER_A) or act [P, K] in sorted order
    wb_ptr,
    stride_wbe,
    stride_wbn,  # MXFP4 blocks [E, N, K/32, 16] uint8, the last two dims contiguous
    ws_ptr,
    stride_wse,
    stride_wsn,
    stride_wsk,  # e8m0 scales [E, N, K/32] uint8
    bias_ptr,
    stride_be,
    stride_bn,  # bias [E, N]
    out_ptr,
    stride_om,
    stride_on,  # act [P, N/2] | y [P, N] fp32 | out32 [T, N] fp32
    sorted_pair_ptr,  # [P] int32: pair id (token * TOP_K + slot) of each expert-sorted row
    pair_weight_ptr,  # [P] fp32: routing weight of each pair id
    tile_expert_ptr,  # [num_tiles] int32: expert of each row tile, -1 for unused grid slots
    tile_row_start_ptr,  # [num_tiles] int32: first sorted row of each tile
    expert_offsets_ptr,  # [E + 1] int32: sorted rows of expert e are offsets[e] .. offsets[e + 1] - 1
    N,  # weight rows (output features before SwiGLU)
    swiglu_limit,
    swiglu_alpha,
    K: tl.constexpr,  # reduction size: a model constant (also keeps triton 3.6's interpreter happy in range())
    TOP_K: tl.constexpr,
    GATHER_A: tl.constexpr,  # True: A row = token of the pair (matmul 1); False: A row = sorted row
    SWIGLU: tl.constexpr,  # True: SwiGLU epilogue on interleaved gate/up -> N/2 outputs per row
    ATOMIC_OUT: tl.constexpr,  # (not SWIGLU) True: atomic add into out[token]; False: store out[pair]
    FP32_MATH: tl.constexpr,  # interpreter: bf16 arithmetic is broken there, so upcast operands to fp32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # weight rows per tile (2x the SwiGLU outputs per tile)
    BLOCK_K: tl.constexpr,
):
    # N-blocks vary fastest across the grid, so the CTAs in flight share a few row tiles (their gathered
    # activations stay in L2) and one expert's weights (8 MB at 120b shapes, also L2-resident) at a time.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:  # grid slot beyond the real tiles (the grid is an upper bound so routing never syncs)
        return
    row_start = tl.load(tile_row_start_ptr + pid_m)
    row_end = tl.load(expert_offsets_ptr + expert + 1)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    pairs = tl.load(sorted_pair_ptr + rows, mask=row_mask, other=0)
    a_rows = pairs // TOP_K if GATHER_A else rows

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    expert64 = expert.to(tl.int64)
    wb_rows = wb_ptr + expert64 * stride_wbe + offs_n[:, None] * stride_wbn  # [BLOCK_N, 1]
    ws_rows = ws_ptr + expert64 * stride_wse + offs_n[:, None] * stride_wsn
    # Row offsets in int64: P * H passes 2^31 elements past ~186k tokens at 120b shapes.
    a_base = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am  # [BLOCK_M, 1]

    HALF_K: tl.constexpr = BLOCK_K // 2
    GROUPS_K: tl.constexpr = BLOCK_K // 32
    # Packed weights: byte b of a row holds elements 2b (low nibble) and 2b + 1 (high nibble); with the
    # [K/32, 16] dims contiguous, byte b sits at offset b. K is a multiple of 32, so masking whole bytes
    # and scale groups by K is exact. The weight tile of step k0 + BLOCK_K is loaded while step k0 is
    # dequantised and multiplied (loads only block at first use), which hides DRAM latency at decode where
    # a few programs stream whole experts; it does not change the arithmetic.
    offs_b = tl.arange(0, HALF_K)
    offs_g = tl.arange(0, GROUPS_K)
    packed = tl.load(wb_rows + offs_b[None, :], mask=n_mask[:, None] & (offs_b[None, :] < K // 2), other=0)
    scale_bits = tl.load(
        ws_rows + offs_g[None, :] * stride_wsk, mask=n_mask[:, None] & (offs_g[None, :] < K // 32), other=127
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        next_b = (k0 + BLOCK_K) // 2 + offs_b
        next_g = (k0 + BLOCK_K) // 32 + offs_g
        packed_next = tl.load(wb_rows + next_b[None, :], mask=n_mask[:, None] & (next_b[None, :] < K // 2), other=0)
        scale_bits_next = tl.load(
            ws_rows + next_g[None, :] * stride_wsk, mask=n_mask[:, None] & (next_g[None, :] < K // 32), other=127
        )
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_base + offs_k[None, :] * stride_ak, mask=row_mask[:, None] & (offs_k[None, :] < K), other=0.0)
        packed32 = packed.to(tl.int32)
        nibbles = tl.reshape(tl.join(packed32 & 0xF, packed32 >> 4), (BLOCK_N, BLOCK_K))
        # e2m1 -> fp32: |v| = 2^(e - 1) * (1 + m / 2) for exponent bits e >= 1 (built as fp32 bits with
        # biased exponent e + 126), and m / 2 for e == 0 (subnormal); bit 3 is the sign.
        exp_bits = (nibbles >> 1) & 0x3
        man_bit = nibbles & 0x1
        normal = (((exp_bits + 126) << 23) | (man_bit << 22)).to(tl.float32, bitcast=True)
        magnitude = tl.where(exp_bits == 0, man_bit.to(tl.float32) * 0.5, normal)
        values = tl.where(nibbles >= 8, -magnitude, magnitude)
        # e8m0 -> fp32 2^(s - 127) by placing s in the exponent field: exact (no exp2 approximation).
        scale = (scale_bits.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # [BLOCK_N, GROUPS_K]
        w = tl.reshape(tl.reshape(values, (BLOCK_N, GROUPS_K, 32)) * scale[:, :, None], (BLOCK_N, BLOCK_K))
        if FP32_MATH:
            acc += tl.dot(a.to(tl.float32), tl.trans(w))
        else:
            # e2m1 * 2^s is exact in bf16, so only the activations round (fp32 activations go to bf16).
            acc += tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        packed = packed_next
        scale_bits = scale_bits_next

    bias = tl.load(bias_ptr + expert64 * stride_be + offs_n * stride_bn, mask=n_mask, other=0.0)
    acc += bias.to(tl.float32)[None, :]
    if SWIGLU:
        # Weight rows alternate gate (even) / up (odd), so output column c pairs acc columns 2c and 2c + 1.
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        gate = tl.minimum(gate, swiglu_limit)
        up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit)
        act = (up + 1.0) * (gate * tl.sigmoid(swiglu_alpha * gate))
        offs_c = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_c[None, :] * stride_on
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_c[None, :] < N // 2))
    else:
        weight = tl.load(pair_weight_ptr + pairs, mask=row_mask, other=0.0)
        y = acc * weight[:, None]
        if ATOMIC_OUT:
            out_ptrs = out_ptr + (pairs // TOP_K).to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
            tl.atomic_add(out_ptrs, y, mask=row_mask[:, None] & n_mask[None, :])
        else:
            out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
            tl.store(out_ptrs, y, mask=row_mask[:, None] & n_mask[None, :])


def _moe_combine_kernel(
    y_ptr,  # [T * TOP_K, H] fp32, row t * TOP_K + j = weighted output of token t's slot j
    out_ptr,  # [T, H]
    H,
    stride_ym,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):  # fixed slot order: the sum never depends on the batch
        acc += tl.load(y_ptr + (token * TOP_K + slot) * stride_ym + offs_h, mask=mask, other=0.0)
    tl.store(out_ptr + token * stride_om + offs_h, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _moe_route_kernel(
    logits_ptr,
    stride_lt,
    stride_le,  # router logits [T, E]
    expert_ids_ptr,  # out [T, TOP_K] int32 (contiguous)
    expert_weights_ptr,  # out [T, TOP_K] fp32 (contiguous)
    sorted_pairs_ptr,  # out [P] int32
    expert_offsets_ptr,  # out [E + 1] int32
    tile_expert_ptr,
    tile_row_start_ptr,  # out [num_slots] int32
    num_tokens,
    num_slots,
    E: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,  # >= T
    BLOCK_E: tl.constexpr,  # >= E
    BLOCK_KK: tl.constexpr,  # >= TOP_K
    BLOCK_P: tl.constexpr,  # >= T * TOP_K
    BLOCK_S: tl.constexpr,  # >= num_slots
):
    """All of `moe_route` in one program (small batches): one launch instead of ~25 torch kernels."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    t_mask = offs_t < num_tokens
    e_valid = offs_e < E
    logits = tl.load(
        logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :] * stride_le,
        mask=t_mask[:, None] & e_valid[None, :],
        other=0.0,
    ).to(tl.float32)
    logits = tl.where(e_valid[None, :], logits, float("-inf"))
    # Top-k by repeated argmax (ties go to the lower expert id); softmax over the k chosen logits.
    top_max = tl.max(logits, axis=1)
    denom = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(logits, axis=1)
        best_id = tl.argmax(logits, axis=1, tie_break_left=True)
        tl.store(expert_ids_ptr + offs_t * TOP_K + slot, best_id.to(tl.int32), mask=t_mask)
        tl.store(expert_weights_ptr + offs_t * TOP_K + slot, best, mask=t_mask)
        denom += tl.exp(best - top_max)
        logits = tl.where(offs_e[None, :] == best_id[:, None], float("-inf"), logits)
    tl.debug_barrier()  # the chosen logits and ids are re-read below, by other threads of this program
    offs_kk = tl.arange(0, BLOCK_KK)
    tk_mask = t_mask[:, None] & (offs_kk[None, :] < TOP_K)
    weight_ptrs = expert_weights_ptr + offs_t[:, None] * TOP_K + offs_kk[None, :]
    chosen = tl.load(weight_ptrs, mask=tk_mask, other=0.0)
    tl.store(weight_ptrs, tl.exp(chosen - top_max[:, None]) / denom[:, None], mask=tk_mask)

    # Group pairs by expert: a sort on (expert, pair id) keys is the stable sort of the torch path.
    offs_p = tl.arange(0, BLOCK_P)
    p_mask = offs_p < num_tokens * TOP_K
    pair_expert = tl.load(expert_ids_ptr + offs_p, mask=p_mask, other=E)
    counts = tl.histogram(pair_expert, BLOCK_E, mask=p_mask)  # [BLOCK_E]
    ends = tl.cumsum(counts, 0)
    starts = ends - counts
    tl.store(expert_offsets_ptr + offs_e, starts, mask=e_valid)
    tl.store(expert_offsets_ptr + 1 + offs_e, ends, mask=offs_e == E - 1)  # the total, at [E]
    keys = tl.sort(pair_expert * BLOCK_P + offs_p)
    tl.store(sorted_pairs_ptr + offs_p, keys % BLOCK_P, mask=p_mask)

    # Row tiles: slot s belongs to the expert whose tile range [tile_begin, tile_end) holds s.
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    tile_begin = tile_end - tiles
    offs_s = tl.arange(0, BLOCK_S)
    slot_expert = tl.sum((tile_end[None, :] <= offs_s[:, None]).to(tl.int32), axis=1)
    valid = slot_expert < E
    one_hot = slot_expert[:, None] == offs_e[None, :]
    first_tile = tl.sum(tl.where(one_hot, tile_begin[None, :], 0), axis=1)
    row_base = tl.sum(tl.where(one_hot, starts[None, :], 0), axis=1)
    s_mask = offs_s < num_slots
    tl.store(tile_expert_ptr + offs_s, tl.where(valid, slot_expert, -1), mask=s_mask)
    tl.store(tile_row_start_ptr + offs_s, tl.where(valid, row_base + (offs_s - first_tile) * BLOCK_M, 0), mask=s_mask)


_JITTED: dict[bool, tuple] = {}


def _kernels() -> tuple:
    """(matmul, combine, route) kernels for the current mode; `triton.jit` picks interpreter vs compiler."""
    mode = interpreting()
    if mode not in _JITTED:
        _JITTED[mode] = tuple(triton.jit(fn) for fn in (_moe_matmul_kernel, _moe_combine_kernel, _moe_route_kernel))
    return _JITTED[mode]


# ----------------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeRouting:
    """Tokens grouped by expert. P = T * top_k pairs; pair id p = token * top_k + slot.

    expert_ids `[T, k]` int32 and expert_weights `[T, k]` fp32 (softmax over the k chosen logits);
    sorted_pairs `[P]` int32: pair ids ordered by expert (then by pair id);
    expert_offsets `[E + 1]` int32: expert e owns sorted rows offsets[e] .. offsets[e + 1] - 1;
    tile_expert / tile_row_start `[max_tiles]` int32: one entry per `block_m`-row tile of one expert,
    then -1 / 0 for the unused slots of the upper-bound grid.
    """

    expert_ids: torch.Tensor
    expert_weights: torch.Tensor
    sorted_pairs: torch.Tensor
    expert_offsets: torch.Tensor
    tile_expert: torch.Tensor
    tile_row_start: torch.Tensor
    block_m: int


def max_row_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum over experts of ceil(count_e / block_m): each non-empty expert wastes < 1 tile."""
    return triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)


# The one-program routing kernel holds [T, E] logits and [slots, E] tile masks in registers: decode-sized
# batches only (T <= 64 at E = 128, k = 4; sm_90: 40 registers at T = 1, a few hundred bytes of spills at 64).
_FUSED_ROUTE_MAX_PAIRS = 256
_FUSED_ROUTE_MAX_LOGITS = 8192


def moe_route(router_logits: torch.Tensor, top_k: int, block_m: int, fused: bool | None = None) -> MoeRouting:
    """Top-k routing and expert-sorted row tiles for `router_logits` `[T, E]`; no device-to-host sync.

    The grid size is an upper bound known on the host, so the whole MoE can be captured in a CUDA graph.
    `fused` picks the one-program Triton kernel (default: for small batches on CUDA or the interpreter) or
    torch ops; both give the same tiles, ids and sorted pairs (weights to rounding).
    """
    num_tokens, num_experts = router_logits.shape
    num_pairs = num_tokens * top_k
    num_slots = max_row_tiles(num_pairs, num_experts, block_m)
    block_t, block_e = triton.next_power_of_2(num_tokens), triton.next_power_of_2(num_experts)
    if fused is None:
        fused = (
            (router_logits.is_cuda or interpreting())
            and num_pairs <= _FUSED_ROUTE_MAX_PAIRS
            and block_t * block_e <= _FUSED_ROUTE_MAX_LOGITS
        )
    if not fused:
        return _moe_route_torch(router_logits, top_k, block_m, num_slots)
    device = router_logits.device
    expert_ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    expert_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    sorted_pairs = torch.empty(num_pairs, dtype=torch.int32, device=device)
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=device)
    tile_expert = torch.empty(num_slots, dtype=torch.int32, device=device)
    tile_row_start = torch.empty(num_slots, dtype=torch.int32, device=device)
    route_kernel = _kernels()[2]
    route_kernel[(1,)](
        router_logits,
        router_logits.stride(0),
        router_logits.stride(1),
        expert_ids,
        expert_weights,
        sorted_pairs,
        expert_offsets,
        tile_expert,
        tile_row_start,
        num_tokens,
        num_slots,
        E=num_experts,
        TOP_K=top_k,
        BLOCK_M=block_m,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        BLOCK_KK=triton.next_power_of_2(top_k),
        BLOCK_P=triton.next_power_of_2(num_pairs),
        BLOCK_S=triton.next_power_of_2(num_slots),
        num_warps=8,
    )
    return MoeRouting(expert_ids, expert_weights, sorted_pairs, expert_offsets, tile_expert, tile_row_start, block_m)


def _moe_route_torch(router_logits: torch.Tensor, top_k: int, block_m: int, num_slots: int) -> MoeRouting:
    """`moe_route` with torch ops (any batch size)."""
    num_experts = router_logits.shape[1]
    device = router_logits.device
    top_logits, top_ids = torch.topk(router_logits, top_k, dim=-1)
    expert_weights = torch.softmax(top_logits.to(torch.float32), dim=-1)
    expert_ids = top_ids.to(torch.int32)
    flat_experts = expert_ids.reshape(-1)
    sorted_experts, sorted_pairs = torch.sort(flat_experts, stable=True)
    expert_range = torch.arange(num_experts + 1, dtype=torch.int32, device=device)
    expert_offsets = torch.searchsorted(sorted_experts, expert_range, out_int32=True)
    counts = expert_offsets[1:] - expert_offsets[:-1]
    tiles_per_expert = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_expert, 0, dtype=torch.int32)  # [E]
    slot = torch.arange(num_slots, dtype=torch.int32, device=device)
    tile_expert = torch.searchsorted(tile_end, slot, right=True, out_int32=True)  # E past the last tile
    valid = tile_expert < num_experts
    expert = tile_expert.clamp(max=num_experts - 1)
    first_tile = tile_end[expert] - tiles_per_expert[expert]
    tile_row_start = torch.where(valid, expert_offsets[expert] + (slot - first_tile) * block_m, 0)
    return MoeRouting(
        expert_ids=expert_ids,
        expert_weights=expert_weights,
        sorted_pairs=sorted_pairs.to(torch.int32),
        expert_offsets=expert_offsets,
        tile_expert=torch.where(valid, tile_expert, -1).to(torch.int32),
        tile_row_start=tile_row_start.to(torch.int32),
        block_m=block_m,
    )


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeConfig:
    """Tile sizes for both matmuls. BLOCK_N counts weight rows (matmul 1 emits BLOCK_N / 2 SwiGLU columns)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Batch-invariant table: both entries give each Hopper warpgroup a 64 x 64 output tile (64 x 128 with 8 warps
# splits N over two warpgroups; 128 x 64 with 8 warps splits M), so every output element goes through the
# same m64n64k16 wgmma sequence in any batch (tests/test_moe_kernel.py checks the instrShape in the sm_90
# TTGIR). Only the row tile grows for prefill. sm_90 registers (triton 3.6): 169-181 and 218-234, no spills.
_INVARIANT_CONFIGS: list[tuple[int, MoeConfig]] = [
    (2048, MoeConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)),
    (1 << 62, MoeConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3)),
]
# Fast (non-invariant) table: small row tiles (mma.sync) and narrow weight tiles for decode, so a handful of
# experts still fill the SMs; the combine is an fp32 atomic add, so the slot order is not fixed. No spills.
_FAST_CONFIGS: list[tuple[int, MoeConfig]] = [
    (16, MoeConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)),
    (256, MoeConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)),
    (2048, MoeConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)),
    (1 << 62, MoeConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)),
]
# The interpreter runs one Python program per tile: fewer, bigger tiles are faster there.
_INTERPRETER_CONFIG = MoeConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=1)


def pick_config(num_tokens: int, batch_invariant: bool = True) -> MoeConfig:
    """Tile sizes for `num_tokens` (the table is keyed on the token count only)."""
    if interpreting():
        return _INTERPRETER_CONFIG
    table = _INVARIANT_CONFIGS if batch_invariant else _FAST_CONFIGS
    for max_tokens, config in table:
        if num_tokens <= max_tokens:
            return config
    return table[-1][1]


def _check_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, experts: int, rows: int, cols: int, name: str
) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"{name} blocks and scales must be uint8")
    if tuple(blocks.shape) != (experts, rows, cols // MXFP4_BLOCK, MXFP4_BLOCK // 2):
        raise ValueError(f"{name}_blocks {tuple(blocks.shape)} != {(experts, rows, cols // 32, 16)}")
    if tuple(scales.shape) != (experts, rows, cols // MXFP4_BLOCK):
        raise ValueError(f"{name}_scales {tuple(scales.shape)} != {(experts, rows, cols // 32)}")
    if tuple(bias.shape) != (experts, rows):
        raise ValueError(f"{name}_bias {tuple(bias.shape)} != {(experts, rows)}")
    if blocks.stride(3) != 1 or blocks.stride(2) != MXFP4_BLOCK // 2:
        raise ValueError(f"{name}_blocks must have its last two dims contiguous (one row = cols/2 bytes)")


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w1_blocks: torch.Tensor,
    w1_scales: torch.Tensor,
    w1_bias: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    w2_bias: torch.Tensor,
    top_k: int,
    swiglu_limit: float = 7.0,
    swiglu_alpha: float = 1.702,
    batch_invariant: bool = True,
    config: MoeConfig | None = None,
    expert_start: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The gpt-oss MoE block in Triton; same contract as `kernels.reference.moe_reference`.

    x: `[T, H]` (bf16, fp16 or fp32); router_logits: `[T, E]`;
    w1: blocks `[E, 2I, H/32, 16]` uint8, scales `[E, 2I, H/32]` uint8, bias `[E, 2I]` (gate/up interleaved
    rows); w2: blocks `[E, H, I/32, 16]` uint8, scales `[E, H, I/32]` uint8, bias `[E, H]`.
    Returns `[T, H]` in `out_dtype` (default x's dtype). `batch_invariant=False` adds the k slots with fp32
    atomics (slightly faster, not bit-reproducible). `config` overrides the tile table (benchmarks, tests).

    Expert parallel: with weights for experts `expert_start .. expert_start + E' - 1` only (router_logits
    still `[T, E]`), routing runs over all E experts as usual, then the tiles of other experts are dropped
    (`tile_expert` -1, so their programs exit) and the local ones renumbered; slots routed elsewhere add 0.
    """
    if x.dim() != 2 or router_logits.dim() != 2 or router_logits.shape[0] != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and router_logits {tuple(router_logits.shape)} must be [T, H], [T, E]")
    num_tokens, hidden = x.shape
    num_experts = router_logits.shape[1]
    local_experts = w1_blocks.shape[0]
    if not (expert_start >= 0 and expert_start + local_experts <= num_experts):
        raise ValueError(f"experts {expert_start}..{expert_start + local_experts - 1} not among {num_experts}")
    intermediate = w1_blocks.shape[1] // 2
    if hidden % MXFP4_BLOCK or intermediate % MXFP4_BLOCK:
        raise ValueError(f"hidden {hidden} and intermediate {intermediate} must be multiples of 32")
    _check_mxfp4(w1_blocks, w1_scales, w1_bias, local_experts, 2 * intermediate, hidden, "w1")
    _check_mxfp4(w2_blocks, w2_scales, w2_bias, local_experts, hidden, intermediate, "w2")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be in 1..{num_experts}")
    if not x.is_cuda and not interpreting():
        raise RuntimeError("fused_moe needs CUDA tensors (or TRITON_INTERPRET=1); use moe_reference on CPU")
    out_dtype = out_dtype or x.dtype
    if num_tokens == 0:
        return x.new_empty(0, hidden, dtype=out_dtype)

    matmul_kernel, combine_kernel, _ = _kernels()
    fp32_math = interpreting()
    config = config or pick_config(num_tokens, batch_invariant)
    routing = moe_route(router_logits, top_k, config.block_m)
    expert_parallel = local_experts != num_experts
    if expert_parallel:
        tile_expert = routing.tile_expert
        mine = (tile_expert >= expert_start) & (tile_expert < expert_start + local_experts)
        routing = replace(
            routing,
            tile_expert=torch.where(mine, tile_expert - expert_start, -1).to(torch.int32),
            # The kernel reads offsets[local + 1] as the end of local expert `local`'s rows.
            expert_offsets=routing.expert_offsets[expert_start:],
        )
    num_pairs = num_tokens * top_k
    num_slots = routing.tile_expert.numel()
    launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    common = (
        routing.sorted_pairs,
        routing.expert_weights,
        routing.tile_expert,
        routing.tile_row_start,
        routing.expert_offsets,
    )

    act = torch.empty(num_pairs, intermediate, dtype=x.dtype, device=x.device)
    grid1 = (triton.cdiv(2 * intermediate, config.block_n), num_slots)
    matmul_kernel[grid1](
        x,
        x.stride(0),
        x.stride(1),
        w1_blocks,
        w1_blocks.stride(0),
        w1_blocks.stride(1),
        w1_scales,
        w1_scales.stride(0),
        w1_scales.stride(1),
        w1_scales.stride(2),
        w1_bias,
        w1_bias.stride(0),
        w1_bias.stride(1),
        act,
        act.stride(0),
        act.stride(1),
        *common,
        2 * intermediate,
        float(swiglu_limit),
        float(swiglu_alpha),
        K=hidden,
        TOP_K=top_k,
        GATHER_A=True,
        SWIGLU=True,
        ATOMIC_OUT=False,
        FP32_MATH=fp32_math,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        **launch,
    )

    if batch_invariant:
        # Rows of slots routed to other ranks' experts are never written: they must read as 0 in the combine.
        alloc = torch.zeros if expert_parallel else torch.empty
        out_rows = alloc(num_pairs, hidden, dtype=torch.float32, device=x.device)
    else:
        out_rows = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    grid2 = (triton.cdiv(hidden, config.block_n), num_slots)
    matmul_kernel[grid2](
        act,
        act.stride(0),
        act.stride(1),
        w2_blocks,
        w2_blocks.stride(0),
        w2_blocks.stride(1),
        w2_scales,
        w2_scales.stride(0),
        w2_scales.stride(1),
        w2_scales.stride(2),
        w2_bias,
        w2_bias.stride(0),
        w2_bias.stride(1),
        out_rows,
        out_rows.stride(0),
        out_rows.stride(1),
        *common,
        hidden,
        float(swiglu_limit),
        float(swiglu_alpha),
        K=intermediate,
        TOP_K=top_k,
        GATHER_A=False,
        SWIGLU=False,
        ATOMIC_OUT=not batch_invariant,
        FP32_MATH=fp32_math,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        **launch,
    )
    if not batch_invariant:
        return out_rows.to(out_dtype)

    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=x.device)
    block_h = 1024 if hidden > 512 else triton.next_power_of_2(hidden)
    combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        out_rows,
        out,
        hidden,
        out_rows.stride(0),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return out
