"""Paged attention for gpt-oss in Triton: KV-cache write, prefill/extend, and split-K (flash-decoding) decode.

KV cache layout (one pair per layer): `k_cache`, `v_cache` each `[num_blocks, num_kv_heads, block_size, head_dim]`.
A block of one KV head is contiguous (16 x 64 x 2 B = 2 KiB at the defaults), so a tile of keys of one head
is read as a few long coalesced runs instead of 64-128 B strided pieces, and the GQA group of 8 query heads
sharing that KV head is served from the same tile. Slot `s` of the cache is block `s // block_size`, offset
`s % block_size` (what `slot_mapping` and `block_tables` index).

Semantics are `kernels.reference.paged_attention_reference`: sequence s owns query rows
`query_start_loc[s]:query_start_loc[s+1]` (its last `q_len` positions), keys `0..seq_lens[s]-1` through
`block_tables[s]`, causal, optional sliding window W (query i sees keys `i-W < j <= i`), and a per-head sink
logit that joins the softmax denominator only (it is not scaled and has no value row).

Kernels:
- `_rope_write_kv_kernel`: one program per new token takes its row of the fused q/k/v projection, rotates
  its q and k heads (YaRN RoPE), stores q and scatters k and v to the token's cache slot.
- `_prefill_kernel`: one program per (query tile of one sequence, KV head). A tile is `BLOCK_Q` consecutive
  query positions x the `GROUP` query heads of the KV head (`BLOCK_M = BLOCK_Q * GROUP` rows of one `tl.dot`).
  Programs find their sequence by binary search over `query_start_loc` (no host sync), and loop only over the
  keys the tile can see: from the first query's window start (never a block wholly before it: on windowed
  layers such blocks may be freed) to the last query's position. The sink initialises the running max and sum.
- `_decode_split_kernel`: one query per sequence, its keys split into chunks (flash-decoding) so that one long
  sequence still fills the GPU; the last split of a (sequence, KV head) to finish combines them (one launch),
  adding the sink to the denominator.

Batch invariance (`batch_invariant=True`, the default): a sequence's output is bit-identical alone or in any
batch. Query tiles are local to each sequence; decode split counts are a function of the sequence's own
context length only (fixed maximum), and the combine sums splits in order in a loop. In a mixed batch the
q_len == 1 sequences still go through the decode kernels (the prefill launch skips them), so their result does
not depend on whether a prefill shares their step.

Dispatch (no device sync): a batch is pure decode when `max_query_len == 1` or, without that hint, when
T == S (every sequence then has q_len 1, assuming q_len >= 1); otherwise the prefill kernel runs, plus the
decode kernels for the q_len == 1 sequences in batch-invariant mode.

Numerics: bf16 (or fp16) `tl.dot` with fp32 accumulation and fp32 softmax on GPU; fp32 caches use IEEE fp32
dots. Under `TRITON_INTERPRET=1` bf16 arithmetic is broken in the interpreter, so the launchers set the
`UPCAST` constexpr and every load is cast to fp32 first.
Triton 3.9 reads `TRITON_INTERPRET` when `@triton.jit` decorates (when this module, and triton.language
itself, are imported) and again while launching: set it before importing and leave it set. Kernels here
avoid triton.language's own @jit helpers (tl.zeros, tl.max, tl.sum) on the interpreter path, so they still
run if triton was imported before the variable was set (re-import this module then).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from gptoss.kernels.matmul import split_counters

LOG2E = 1.4426950408889634
# Finite stand-in for -inf as the initial running max: keeps exp2(m_old - m_new) NaN-free for rows that have
# seen no key yet (and for padded rows), with no extra branch.
NEG_BIG = -1.0e30

# Decode split policy. In batch-invariant mode the split count of a sequence is
# min(DECODE_MAX_SPLITS, cdiv(keys, DECODE_MIN_SPLIT_KEYS)): a function of its own length only. One key tile
# (64 keys) a split up to 4k keys: a 1k context at batch 1 runs 16 splits x 8 KV heads = 128 CTAs (132 SMs);
# past 4k the 64 splits (512 CTAs, ~4 waves) grow longer instead (512 keys each at 32k), so the partials
# (fp32, 8 heads x 64 dims a split) stay ~1/64 of the KV bytes a split streams there.
DECODE_MAX_SPLITS = 64
DECODE_MIN_SPLIT_KEYS = 64
# GPU launch shapes. Prefill: 128-row query tiles (16 positions x 8 heads at gpt-oss's GQA 8, the usual
# flash-attention tile for head dim 64) over 64-key tiles, 8 warps. Decode: the 8 query heads of a KV head
# padded to the 16 rows an MMA needs, 4 warps. Three stages so the block-table-indexed K/V loads are
# pipelined (cp.async) behind the dots. Not tuned on hardware yet.
PREFILL_BLOCK_M = 128
PREFILL_NUM_WARPS = 8
DECODE_NUM_WARPS = 4
NUM_STAGES = 3
# The decode split kernel is persistent: at most this many programs per SM (each loops over work items), so
# a grid sized for max_model_len (CUDA graphs) at batch 256 is 528 programs, not 131k mostly-idle CTAs.
# sm_90 (triton 3.9): ~100 registers x 128 threads and 20 KiB of shared memory a program -> 4 resident a SM.
DECODE_PROGRAMS_PER_SM = 4
# RoPE + KV write: one token a program, [Hq + Hkv -> 128, 32] halves (gpt-oss): 8 warps, 16 fp32 values a thread
# per half (4 warps spill 8 bytes under triton 3.6).
ROPE_NUM_WARPS = 8


def _tile_n(head_dim: int) -> int:
    """Keys per inner-loop tile."""
    return 64 if head_dim <= 64 else 32


def _is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it then runs on CPU, bf16 math is broken)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------
# RoPE + KV write, straight from the fused q/k/v projection
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _rope_write_kv_kernel(
    q_out_ptr,  # [T, Hq, D]: rotated queries
    qkv_ptr,  # [T, (Hq + 2 Hkv) * D]: the q/k/v projection, heads q..., k..., v...
    positions_ptr,  # [T] int
    cos_ptr,  # [max_positions, D/2] fp32 (YaRN-scaled)
    sin_ptr,
    k_cache_ptr,  # [num_blocks, Hkv, block_size, D]
    v_cache_ptr,
    slot_mapping_ptr,  # [T], < 0: the token writes no key/value
    stride_qkv,
    stride_qt,
    stride_qh,
    stride_rope,
    stride_kcb,
    stride_kch,
    stride_kcs,
    stride_vcb,
    stride_vch,
    stride_vcs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,  # >= Hq + Hkv: q and k heads are rotated as one tile
    KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,  # D / 2
    HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROUND_EACH_OP: tl.constexpr,  # 16-bit activations: round after each op as torch's apply_rope does
):
    """One program per token: rotate its q and k heads by halves (non-interleaved), store q, scatter k and v
    to the token's cache slot."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    act_ty = qkv_ptr.dtype.element_ty
    half = tl.arange(0, HALF_PAD)
    half_ok = half < HALF
    cos = tl.load(cos_ptr + pos * stride_rope + half, mask=half_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_rope + half, mask=half_ok, other=0.0)
    # transformers casts cos/sin to the activation dtype before rotating.
    cos = cos.to(act_ty).to(tl.float32)[None, :]
    sin = sin.to(act_ty).to(tl.float32)[None, :]

    heads = tl.arange(0, HEADS_PAD)
    qk_mask = (heads[:, None] < NUM_Q_HEADS + NUM_KV_HEADS) & half_ok[None, :]
    row = qkv_ptr + token * stride_qkv + heads[:, None] * (2 * HALF) + half[None, :]
    first = tl.load(row, mask=qk_mask, other=0.0).to(tl.float32)  # [HEADS_PAD, HALF_PAD]
    second = tl.load(row + HALF, mask=qk_mask, other=0.0).to(tl.float32)
    if ROUND_EACH_OP:
        new_first = (first * cos).to(act_ty).to(tl.float32) - (second * sin).to(act_ty).to(tl.float32)
        new_second = (second * cos).to(act_ty).to(tl.float32) + (first * sin).to(act_ty).to(tl.float32)
    else:
        new_first = first * cos - second * sin
        new_second = second * cos + first * sin

    is_q = heads[:, None] < NUM_Q_HEADS
    q_dst = q_out_ptr + token * stride_qt + heads[:, None] * stride_qh + half[None, :]
    tl.store(q_dst, new_first.to(q_out_ptr.dtype.element_ty), mask=qk_mask & is_q)
    tl.store(q_dst + HALF, new_second.to(q_out_ptr.dtype.element_ty), mask=qk_mask & is_q)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        kv_head = heads - NUM_Q_HEADS
        k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + kv_head[:, None] * stride_kch + half[None, :]
        k_mask = qk_mask & (heads[:, None] >= NUM_Q_HEADS)
        tl.store(k_dst, new_first.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(k_dst + HALF, new_second.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        v_heads = tl.arange(0, KV_HEADS_PAD)
        dims = tl.arange(0, 2 * HALF_PAD)
        v_mask = (v_heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < 2 * HALF)
        v_src = qkv_ptr + token * stride_qkv + (NUM_Q_HEADS + NUM_KV_HEADS + v_heads[:, None]) * (2 * HALF)
        v = tl.load(v_src + dims[None, :], mask=v_mask)
        v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + v_heads[:, None] * stride_vch
        tl.store(v_dst + dims[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rope_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
) -> torch.Tensor:
    """RoPE on the q and k heads of a fused projection, keys and values stored to the paged cache.

    qkv: `[T, (Hq + 2 Hkv) * D]` (q heads, then k, then v); positions `[T]`; cos/sin tables
    `[max_positions, D/2]` fp32 (already scaled by the YaRN attention factor); caches
    `[num_blocks, Hkv, block_size, D]`; slot_mapping `[T]` (negative: no write). Returns the rotated queries
    `[T, Hq, D]` in qkv's dtype. Same contract as `kernels.reference.rope_write_kv_reference`.
    """
    num_tokens = qkv.shape[0]
    _, num_kv_heads, block_size, head_dim = k_cache.shape
    if qkv.dim() != 2 or qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv {tuple(qkv.shape)} must be [T, ({num_q_heads} + 2 * {num_kv_heads}) * {head_dim}]")
    if positions.shape != (num_tokens,) or slot_mapping.shape != (num_tokens,):
        raise ValueError(f"positions {tuple(positions.shape)} and slot_mapping must be [{num_tokens}]")
    if cos_table.shape != sin_table.shape or cos_table.shape[1] != head_dim // 2:
        raise ValueError(f"cos/sin tables {tuple(cos_table.shape)} must be [max_positions, {head_dim // 2}]")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    for t in (qkv, cos_table, sin_table, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("the last dim of qkv, the rope tables and the caches must be contiguous")
    if sin_table.stride(0) != cos_table.stride(0):
        raise ValueError("the cos and sin tables must share their row stride")
    interpreted = _is_interpreted(_rope_write_kv_kernel)
    if not interpreted and qkv.device.type != "cuda":
        raise RuntimeError("gptoss.kernels.attention on CPU tensors needs TRITON_INTERPRET=1 set before it is imported")
    q = torch.empty(num_tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    _rope_write_kv_kernel[(num_tokens,)](
        q, qkv, positions, cos_table, sin_table, k_cache, v_cache, slot_mapping,
        qkv.stride(0), q.stride(0), q.stride(1), cos_table.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        **_rope_constexprs(num_q_heads, num_kv_heads, head_dim, block_size, qkv.dtype, interpreted),
        num_warps=ROPE_NUM_WARPS,
    )  # fmt: skip
    return q


def _rope_constexprs(
    num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, interpreted: bool
) -> dict:
    return {
        "NUM_Q_HEADS": num_q_heads,
        "NUM_KV_HEADS": num_kv_heads,
        "HEADS_PAD": _next_pow2(num_q_heads + num_kv_heads),
        "KV_HEADS_PAD": _next_pow2(num_kv_heads),
        "HALF": head_dim // 2,
        "HALF_PAD": _next_pow2(head_dim // 2),
        "BLOCK_SIZE": block_size,
        # The interpreter cannot do bf16 arithmetic, and rounding is the identity in fp32 anyway.
        "ROUND_EACH_OP": dtype != torch.float32 and not interpreted,
    }


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _find_sequence(query_start_loc_ptr, tile_id, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence s whose query tiles contain `tile_id`, tiles of s being numbered from
    query_start_loc[s] // BLOCK_Q + s (an upper bound on the tiles before s, so no host-side prefix sum)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _row_max(x, INTERPRETED: tl.constexpr):
    """tl.max(x, 1). Under the interpreter, tl.max and tl.sum are @triton.jit functions of triton's standard
    library: if triton was imported before TRITON_INTERPRET=1 was set they are compiled-mode functions the
    interpreter cannot call. tl.reduce is a builtin the interpreter patches, and it recognises the standard
    combine function and reduces with numpy, so this path works whatever the import order."""
    return tl.reduce(x, 1, tl.standard._elementwise_max) if INTERPRETED else tl.max(x, 1)


@triton.jit
def _row_sum(x, INTERPRETED: tl.constexpr):
    """tl.sum(x, 1); see `_row_max` for the interpreter branch."""
    return tl.reduce(x, 1, tl.standard._sum_combine) if INTERPRETED else tl.sum(x, 1)


@triton.jit
def _sum0(x, INTERPRETED: tl.constexpr):
    """tl.sum(x, 0); see `_row_max` for the interpreter branch."""
    return tl.reduce(x, 0, tl.standard._sum_combine) if INTERPRETED else tl.sum(x, 0)


@triton.jit
def _max0(x, INTERPRETED: tl.constexpr):
    """tl.max(x, 0); see `_row_max` for the interpreter branch."""
    return tl.reduce(x, 0, tl.standard._elementwise_max) if INTERPRETED else tl.max(x, 0)


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, HEAD_DIM_PAD]
    acc,  # [BLOCK_M, HEAD_DIM_PAD] fp32, unnormalised
    m_i,  # [BLOCK_M] fp32 running max (log2 domain)
    l_i,  # [BLOCK_M] fp32 running sum
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,  # this sequence's row of block_tables
    kv_head,
    stride_kcb,
    stride_kch,
    stride_kcs,
    stride_vcb,
    stride_vch,
    stride_vcs,
    tile_start,
    key_lo,  # first key any row may see (keys below are never loaded)
    key_hi,  # one past the last key any row may see
    q_pos,  # [BLOCK_M] absolute position of each row
    window,
    scale_log2e,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys tile_start .. tile_start + TILE_N - 1 (masked to [key_lo, key_hi))."""
    keys = tile_start + tl.arange(0, TILE_N)
    dims = tl.arange(0, HEAD_DIM_PAD)
    key_ok = (keys >= key_lo) & (keys < key_hi)
    # Masked: block-table entries outside [key_lo, key_hi) may be stale or -1 (freed window blocks).
    block = tl.load(block_table_ptr + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
    in_block = keys % BLOCK_SIZE
    load_mask = key_ok[:, None] & (dims[None, :] < HEAD_DIM)
    k_off = block * stride_kcb + kv_head * stride_kch + in_block * stride_kcs
    v_off = block * stride_vcb + kv_head * stride_vch + in_block * stride_vcs
    k = tl.load(k_cache_ptr + k_off[:, None] + dims[None, :], mask=load_mask, other=0.0)  # [TILE_N, D]
    v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=load_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [BLOCK_M, TILE_N]
    visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (keys[None, :] > q_pos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, _row_max(s, UPCAST))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + _row_sum(p, UPCAST)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _decode_num_splits(num_keys, MAX_SPLITS: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr, TILE_N: tl.constexpr):
    """(number of splits, keys per split) for a decode over `num_keys` keys; both depend on num_keys only."""
    num_keys = tl.maximum(num_keys, 1)
    wanted = tl.minimum((num_keys + MIN_SPLIT_KEYS - 1) // MIN_SPLIT_KEYS, MAX_SPLITS)
    per_split = (num_keys + wanted - 1) // wanted
    per_split = (per_split + TILE_N - 1) // TILE_N * TILE_N
    return (num_keys + per_split - 1) // per_split, per_split


# ----------------------------------------------------------------------------------------------------------
# Prefill / extend (also handles q_len == 1 rows when not batch-invariant)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _prefill_kernel(
    out_ptr,  # [T, Hq, D]
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,
    v_cache_ptr,
    sinks_ptr,  # [Hq] fp32
    block_tables_ptr,  # [S, max_blocks] int32
    query_start_loc_ptr,  # [S + 1] int32
    seq_lens_ptr,  # [S] int32
    scale_log2e,
    window,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kcb,
    stride_kch,
    stride_kcs,
    stride_vcb,
    stride_vch,
    stride_vcs,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SKIP_DECODE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, tile_id, num_seqs, BLOCK_Q)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if SKIP_DECODE:
        if q_len == 1:  # the decode kernels own these rows (batch invariance)
            return
    first_q = (tile_id - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if first_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_in_tile = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (q_in_tile < BLOCK_Q) & (first_q + q_in_tile < q_len)
    q_pos = context_len + first_q + q_in_tile
    token = (q_begin + first_q + q_in_tile).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_PAD)
    io_mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # The sink starts the running max and contributes exp(sink - max) = 1 to the running sum.
    m_i = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM_PAD], 0, tl.float32)

    key_hi = context_len + tl.minimum(first_q + BLOCK_Q, q_len)
    key_lo = 0
    if HAS_WINDOW:
        key_lo = tl.maximum(context_len + first_q - window + 1, 0)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile_start in range(key_lo // TILE_N * TILE_N, key_hi, TILE_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, kv_head,
            stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
            tile_start, key_lo, key_hi, q_pos, window, scale_log2e,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, HAS_WINDOW, UPCAST, DOT_PRECISION,
        )  # fmt: skip

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


# ----------------------------------------------------------------------------------------------------------
# Decode: split-K over the context, then combine with the sink
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    out_ptr,  # [T, Hq, D]: written by the last split of each (sequence, KV head)
    counter_ptr,  # int32 [S * Hkv], zero between launches: splits of a (sequence, KV head) done so far
    sinks_ptr,  # [Hq]
    part_acc_ptr,  # [S, Hq, num_splits_alloc, D] fp32, unnormalised
    part_max_ptr,  # [S, Hq, num_splits_alloc] fp32 (log2 domain)
    part_sum_ptr,  # [S, Hq, num_splits_alloc] fp32
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    scale_log2e,
    window,
    stride_qt,
    stride_qh,
    stride_kcb,
    stride_kch,
    stride_kcs,
    stride_vcb,
    stride_vch,
    stride_vcs,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_ps,
    stride_ph,
    stride_pn,
    num_kv_heads,
    grid_splits,  # split slots per (sequence, KV head): a bound from the longest possible sequence
    num_items,  # num_seqs * num_kv_heads * grid_splits
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    MIN_SPLIT_KEYS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_pow2(MAX_SPLITS): fixed per model, so the combine's reduction tree is too
    HAS_WINDOW: tl.constexpr,
    CHECK_Q_LEN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Persistent: program p takes the work items p, p + P, p + 2P, ... (item = (sequence, KV head, split slot)),
    so a grid bounded by the longest possible sequence (CUDA graphs: max_model_len) costs a few scalar loads
    per unused slot instead of a CTA launch. What an item computes does not depend on which program runs it.

    The combine is folded in (no second launch): after storing its partial, an item takes a ticket on its
    (sequence, KV head) counter (acq_rel, after a CTA barrier so every thread's partial is stored first); the
    item that takes the last ticket combines the GROUP heads from all the splits' partials, which it reads
    in the fixed [BLOCK_S] layout (so the sum does not depend on which split finished last), then re-arms the
    counter to 0 for the next launch (CUDA-graph replays need no memset)."""
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        split = item % grid_splits
        kv_head = (item // grid_splits) % num_kv_heads
        seq = item // (grid_splits * num_kv_heads)
        q_begin = tl.load(query_start_loc_ptr + seq)
        seq_len = tl.load(seq_lens_ptr + seq)
        key_lo = 0
        if HAS_WINDOW:
            key_lo = tl.maximum(seq_len - window, 0)
        num_splits, per_split = _decode_num_splits(seq_len - key_lo, MAX_SPLITS, MIN_SPLIT_KEYS, TILE_N)
        active = split < num_splits
        if CHECK_Q_LEN:  # sequences with q_len != 1 belong to the prefill kernel
            active = active & (tl.load(query_start_loc_ptr + seq + 1) - q_begin == 1)
        if active:
            _decode_split_item(
                part_acc_ptr, part_max_ptr, part_sum_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                scale_log2e, window, stride_qt, stride_qh,
                stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
                stride_bt, stride_ps, stride_ph, stride_pn,
                seq, kv_head, split, q_begin, seq_len, key_lo + split * per_split, per_split,
                GROUP, BLOCK_G, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, HAS_WINDOW, UPCAST, DOT_PRECISION,
            )  # fmt: skip
            tl.debug_barrier()
            pair = seq * num_kv_heads + kv_head
            if tl.atomic_add(counter_ptr + pair, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                for g in range(GROUP):
                    _combine_head(
                        out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, sinks_ptr,
                        seq, kv_head * GROUP + g, q_begin, num_splits,
                        stride_ot, stride_oh, stride_ps, stride_ph, stride_pn,
                        HEAD_DIM, HEAD_DIM_PAD, BLOCK_S, UPCAST,
                    )  # fmt: skip
                tl.store(counter_ptr + pair, 0)


@triton.jit
def _decode_split_item(
    part_acc_ptr, part_max_ptr, part_sum_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
    scale_log2e, window, stride_qt, stride_qh,
    stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
    stride_bt, stride_ps, stride_ph, stride_pn,
    seq, kv_head, split, q_begin, seq_len, split_lo, per_split,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One split of one (sequence, KV head): keys split_lo .. split_lo + per_split - 1 (clipped to the
    sequence) for the GROUP query heads, as an unnormalised partial (acc, max, sum)."""
    split_hi = tl.minimum(split_lo + per_split, seq_len)
    rows = tl.arange(0, BLOCK_G)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    dims = tl.arange(0, HEAD_DIM_PAD)
    io_mask = row_ok[:, None] & (dims[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + q_begin.to(tl.int64) * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=io_mask, other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = tl.full([BLOCK_G], 0, tl.int32) + (seq_len - 1)
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.full([BLOCK_G], 0, tl.float32)
    acc = tl.full([BLOCK_G, HEAD_DIM_PAD], 0, tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile_start in range(split_lo, split_hi, TILE_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, kv_head,
            stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
            tile_start, split_lo, split_hi, q_pos, window, scale_log2e,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, TILE_N, HAS_WINDOW, UPCAST, DOT_PRECISION,
        )  # fmt: skip

    part = seq.to(tl.int64) * stride_ps + head * stride_ph + split * stride_pn  # [BLOCK_G]
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(part_max_ptr + part, m_i, mask=row_ok)
    tl.store(part_sum_ptr + part, l_i, mask=row_ok)


@triton.jit
def _combine_head(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, sinks_ptr,
    seq, head, q_begin, num_splits,
    stride_ot, stride_oh, stride_ps, stride_ph, stride_pn,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_S: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """The output row of one (sequence, query head) from its splits' partials with the sink: all of them loaded
    at once as a [BLOCK_S, D] tile and reduced over the split axis. The reduction tree depends on BLOCK_S (a
    constant of the launch table, not of the batch) and unused splits add exact zeros, so the order is fixed.
    Loads bypass L1 (.cg): other SMs wrote the partials, and this SM's L1 may hold an earlier launch's lines."""
    splits = tl.arange(0, BLOCK_S)
    used = splits < num_splits
    part = seq.to(tl.int64) * stride_ps + head * stride_ph + splits * stride_pn  # [BLOCK_S]
    part_max = tl.load(part_max_ptr + part, mask=used, other=-1.0e30, cache_modifier=".cg")
    part_sum = tl.load(part_sum_ptr + part, mask=used, other=0.0, cache_modifier=".cg")
    sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
    m_all = tl.maximum(_max0(part_max, INTERPRETED), sink)
    weight = tl.where(used, tl.exp2(part_max - m_all), 0.0)
    l_all = tl.exp2(sink - m_all) + _sum0(part_sum * weight, INTERPRETED)
    dims = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :], mask=used[:, None], other=0.0, cache_modifier=".cg"
    )
    acc = _sum0(acc * weight[:, None], INTERPRETED)  # [HEAD_DIM_PAD]
    l_all = tl.where(l_all == 0.0, 1.0, l_all)
    tl.store(
        out_ptr + q_begin.to(tl.int64) * stride_ot + head * stride_oh + dims,
        (acc / l_all).to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor | None,
    scale: float,
    sliding_window: int | None,
    batch_invariant: bool = True,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """Attention of queries `[T, Hq, D]` over the paged KV cache; returns `[T, Hq, D]` in query.dtype.

    k_cache, v_cache: `[num_blocks, Hkv, block_size, D]`; block_tables `[S, max_blocks]` int32;
    query_start_loc `[S + 1]` int32; seq_lens `[S]` int32 (context incl. the new tokens); sinks `[Hq]` fp32 or
    bf16 (None: no sink); sliding_window: W or None. The launcher never syncs with the device. Optional host
    hints the caller already knows: `max_query_len` (== 1 selects the pure-decode path; without it a batch
    with T == S is taken as pure decode, so every sequence must then have q_len >= 1) and `max_seq_len`
    (must be >= every seq_lens[s]; bounds the decode split grid, default block_tables.shape[1] * block_size).
    """
    num_tokens, num_q_heads, head_dim = query.shape
    _, num_kv_heads, block_size, cache_head_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if v_cache.shape != k_cache.shape or cache_head_dim != head_dim:
        raise ValueError(f"cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)} vs query {tuple(query.shape)}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if query.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"query {query.dtype} and caches {k_cache.dtype}/{v_cache.dtype} must share a dtype")
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError("query_start_loc must be [S + 1] and block_tables [S, max_blocks]")
    for t in (query, k_cache, v_cache, block_tables):
        if t.stride(-1) != 1:
            raise ValueError("the last dim of query, caches and block_tables must be contiguous")
    if sinks is not None and sinks.shape != (num_q_heads,):
        raise ValueError(f"sinks {tuple(sinks.shape)} must be [{num_q_heads}]")

    out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    has_window = sliding_window is not None and sliding_window > 0
    window = int(sliding_window) if has_window else 0
    interpreted = _is_interpreted(_prefill_kernel)
    if not interpreted and query.device.type != "cuda":
        raise RuntimeError("gptoss.kernels.attention on CPU tensors needs TRITON_INTERPRET=1 set before it is imported")
    common = {
        "head_dim": head_dim,
        "block_size": block_size,
        "window": window,
        "has_window": has_window,
        "scale_log2e": float(scale) * LOG2E,
        "upcast": interpreted,
        # fp32 caches (CPU tests, debugging) get true fp32 dots on GPU rather than TF32.
        "precision": "ieee" if query.dtype == torch.float32 else "tf32",
    }
    if sinks is None:  # a sink of -1e30 contributes exactly 0 and keeps the running max finite
        sinks = torch.full((num_q_heads,), NEG_BIG, device=query.device, dtype=torch.float32)
    all_decode = max_query_len == 1 if max_query_len is not None else num_tokens == num_seqs
    if all_decode:
        _launch_decode(out, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, sinks,
                       group, batch_invariant, max_seq_len, check_q_len=False, **common)  # fmt: skip
        return out

    tile_n = _tile_n(head_dim)
    # Interpreter: 16-row tiles, so the tiny test sequences span several query tiles.
    block_m = max(16 if interpreted else PREFILL_BLOCK_M, _next_pow2(group))
    block_q = block_m // group
    # cdiv(q_len_s, BLOCK_Q) <= q_len_s // BLOCK_Q + 1: enough programs for every sequence's tiles, no sync.
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        out, query, k_cache, v_cache, sinks, block_tables, query_start_loc, seq_lens,
        common["scale_log2e"], window, num_seqs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=_next_pow2(head_dim), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
        HAS_WINDOW=has_window, SKIP_DECODE=batch_invariant,
        UPCAST=interpreted, DOT_PRECISION=common["precision"],
        num_warps=PREFILL_NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if batch_invariant:
        _launch_decode(out, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, sinks,
                       group, batch_invariant, max_seq_len, check_q_len=True, **common)  # fmt: skip
    return out


def _decode_plan(
    num_seqs: int,
    num_kv_heads: int,
    head_dim: int,
    longest: int,
    window: int | None,
    batch_invariant: bool,
    num_sms: int,
) -> tuple[int, int, int, int]:
    """(keys per tile, least keys per split, most splits, split grid size) of a decode launch whose longest
    sequence has `longest` keys (an upper bound: CUDA graphs pass max_model_len)."""
    tile_n = _tile_n(head_dim)
    min_split_keys = max(DECODE_MIN_SPLIT_KEYS, tile_n)
    if batch_invariant:
        max_splits = DECODE_MAX_SPLITS
    else:
        # Enough programs for ~4 waves, but no more splits than that: fewer partials to combine.
        wanted = 4 * num_sms / max(1, num_seqs * num_kv_heads)
        max_splits = min(DECODE_MAX_SPLITS, _next_pow2(math.ceil(wanted)))
    if window is not None:
        longest = min(longest, window)
    # The grid only bounds the split index; each sequence's split count comes from its own length.
    grid_splits = max(1, min(max_splits, math.ceil(max(1, longest) / min_split_keys)))
    return tile_n, min_split_keys, max_splits, grid_splits


def launch_specs(model, scenario) -> list:
    """The attention launches of one step in `scenario` at `model`'s shapes (kernels.launch_spec types), for
    benchmarks/static_report.py: RoPE + KV write, then prefill, or the decode split kernel (its combine folded
    in) on full and on sliding-window layers. Decode grids are sized by the exact context (eager); under CUDA
    graphs the split kernel gets max_model_len as its bound and skips the extra work items (it is persistent)."""
    from gptoss.kernels.launch_spec import LaunchSpec

    tokens, d = scenario.tokens, model.head_dim
    group, block_size = model.q_heads // model.kv_heads, 16
    layer_kinds = (
        ("full", None, model.layers - model.sliding_layers),
        ("sliding", model.sliding_window, model.sliding_layers),
    )
    kv_ptrs = {
        "k_cache_ptr": "*bf16",
        "v_cache_ptr": "*bf16",
        "block_tables_ptr": "*i32",
        "query_start_loc_ptr": "*i32",
        "seq_lens_ptr": "*i32",
        "sinks_ptr": "*fp32",
        "scale_log2e": "fp32",
    }
    cache_strides = ("stride_kcb", "stride_kch", "stride_kcs", "stride_vcb", "stride_vch", "stride_vcs")
    qkv_row = (model.q_heads + 2 * model.kv_heads) * d
    specs = [
        LaunchSpec(
            name="attn.rope_write_kv",
            kernel=_rope_write_kv_kernel,
            pointers={"q_out_ptr": "*bf16", "qkv_ptr": "*bf16", "positions_ptr": "*i64", "cos_ptr": "*fp32",
                      "sin_ptr": "*fp32", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64"},
            constants=_rope_constexprs(model.q_heads, model.kv_heads, d, block_size, torch.bfloat16, False),
            num_warps=ROPE_NUM_WARPS, num_stages=1, ctas=tokens,
            bytes_per_cta=(qkv_row + model.q_heads * d + 2 * model.kv_heads * d) * 2 + d * 4,
            total_bytes=tokens * ((qkv_row + model.q_heads * d + 2 * model.kv_heads * d) * 2 + d * 4),
            launches_per_step=model.layers,
            aligned=("stride_qkv", "stride_qt", "stride_qh", "stride_rope", *cache_strides),
        )
    ]  # fmt: skip
    if not scenario.decode:
        block_m = max(PREFILL_BLOCK_M, _next_pow2(group))
        for kind, window, count in layer_kinds:
            keys = tokens if window is None else min(tokens, window)
            ctas = triton.cdiv(tokens, block_m // group) * model.kv_heads
            specs.append(
                LaunchSpec(
                    name=f"attn.prefill ({kind})",
                    kernel=_prefill_kernel,
                    pointers={**kv_ptrs, "out_ptr": "*bf16", "q_ptr": "*bf16"},
                    constants={"GROUP": group, "HEAD_DIM": d, "HEAD_DIM_PAD": _next_pow2(d), "BLOCK_SIZE": block_size,
                               "BLOCK_M": block_m, "BLOCK_Q": block_m // group, "TILE_N": _tile_n(d),
                               "HAS_WINDOW": window is not None, "SKIP_DECODE": True, "UPCAST": False,
                               "DOT_PRECISION": "tf32"},
                    num_warps=PREFILL_NUM_WARPS, num_stages=NUM_STAGES, ctas=ctas,
                    # Each query tile reads the keys it sees (half the context on average when causal).
                    bytes_per_cta=(keys if window else keys / 2) * d * 2 * 2,
                    total_bytes=ctas * (keys if window else keys / 2) * d * 2 * 2 + 2 * tokens * model.q_heads * d * 2,
                    launches_per_step=count,
                    aligned=("stride_qt", "stride_qh", "stride_ot", "stride_oh", *cache_strides),
                )
            )  # fmt: skip
        return specs
    parts = {"part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32"}
    for kind, window, count in layer_kinds:
        keys = scenario.context if window is None else min(scenario.context, window)
        tile_n, min_split_keys, max_splits, grid_splits = _decode_plan(
            tokens, model.kv_heads, d, scenario.context, window, True, 132
        )
        items = tokens * model.kv_heads * grid_splits
        programs = min(items, DECODE_PROGRAMS_PER_SM * 132)
        kv_bytes = tokens * model.kv_heads * keys * d * 2 * 2
        partial_bytes = tokens * model.q_heads * grid_splits * (d + 2) * 4
        split_constants = {"TILE_N": tile_n, "MAX_SPLITS": max_splits, "MIN_SPLIT_KEYS": min_split_keys,
                           "HAS_WINDOW": window is not None, "CHECK_Q_LEN": False, "HEAD_DIM": d,
                           "HEAD_DIM_PAD": _next_pow2(d)}  # fmt: skip
        # The partials are written once and read back once by the combining item; then the output row.
        total = kv_bytes + 2 * partial_bytes + tokens * model.q_heads * d * 2
        specs.append(
            LaunchSpec(
                name=f"attn.decode_split (+combine, {kind})",
                kernel=_decode_split_kernel,
                pointers={**kv_ptrs, **parts, "q_ptr": "*bf16", "out_ptr": "*bf16", "counter_ptr": "*i32"},
                constants={"GROUP": group, "BLOCK_G": max(16, _next_pow2(group)), "BLOCK_SIZE": block_size,
                           "BLOCK_S": _next_pow2(max_splits), "UPCAST": False, "DOT_PRECISION": "tf32",
                           **split_constants},
                num_warps=DECODE_NUM_WARPS, num_stages=NUM_STAGES, ctas=programs,
                bytes_per_cta=total / programs, total_bytes=total, launches_per_step=count,
                aligned=("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_ps", "stride_ph",
                         *cache_strides),
                notes={"work_items": str(items)},
            )
        )  # fmt: skip
    return specs


def _launch_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor,
    group: int,
    batch_invariant: bool,
    max_seq_len: int | None,
    *,
    check_q_len: bool,
    head_dim: int,
    block_size: int,
    window: int,
    has_window: bool,
    scale_log2e: float,
    upcast: bool,
    precision: str,
) -> None:
    """Split-K decode of the q_len == 1 sequences (all of them unless `check_q_len`) into `out`."""
    num_seqs = seq_lens.shape[0]
    num_q_heads, num_kv_heads = query.shape[1], k_cache.shape[1]
    longest = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    tile_n, min_split_keys, max_splits, grid_splits = _decode_plan(
        num_seqs, num_kv_heads, head_dim, longest, window if has_window else None, batch_invariant,
        _num_sms(query.device),
    )  # fmt: skip
    head_dim_pad = _next_pow2(head_dim)
    part_acc = torch.empty(num_seqs, num_q_heads, grid_splits, head_dim_pad, device=query.device,
                           dtype=torch.float32)  # fmt: skip
    part_max = torch.empty(num_seqs, num_q_heads, grid_splits, device=query.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    num_items = num_seqs * num_kv_heads * grid_splits
    counters = split_counters(query.device, num_seqs * num_kv_heads)
    _decode_split_kernel[(min(num_items, DECODE_PROGRAMS_PER_SM * _num_sms(query.device)),)](
        out, counters, sinks,
        part_acc, part_max, part_sum, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        scale_log2e, window,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), part_max.stride(0), part_max.stride(1),
        part_max.stride(2),
        num_kv_heads, grid_splits, num_items,
        GROUP=group, BLOCK_G=max(16, _next_pow2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, TILE_N=tile_n, MAX_SPLITS=max_splits, MIN_SPLIT_KEYS=min_split_keys,
        BLOCK_S=_next_pow2(max_splits), HAS_WINDOW=has_window, CHECK_Q_LEN=check_q_len, UPCAST=upcast,
        DOT_PRECISION=precision, num_warps=DECODE_NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
