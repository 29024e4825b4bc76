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
- `_write_kv_kernel`: one program per new token scatters its `[Hkv, D]` keys and values to its slot.
- `_prefill_kernel`: one program per (query tile of one sequence, KV head). A tile is `BLOCK_Q` consecutive
  query positions x the `GROUP` query heads of the KV head (`BLOCK_M = BLOCK_Q * GROUP` rows of one `tl.dot`).
  Programs find their sequence by binary search over `query_start_loc` (no host sync), and loop only over the
  keys the tile can see: from the first query's window start (never a block wholly before it: on windowed
  layers such blocks may be freed) to the last query's position. The sink initialises the running max and sum.
- `_decode_split_kernel` + `_decode_combine_kernel`: one query per sequence, its keys split into chunks
  (flash-decoding) so that one long sequence still fills the GPU; the combine adds the sink to the denominator.

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

LOG2E = 1.4426950408889634
# Finite stand-in for -inf as the initial running max: keeps exp2(m_old - m_new) NaN-free for rows that have
# seen no key yet (and for padded rows), with no extra branch.
NEG_BIG = -1.0e30

# Decode split policy. In batch-invariant mode the split count of a sequence is
# min(DECODE_MAX_SPLITS, cdiv(keys, DECODE_MIN_SPLIT_KEYS)): a function of its own length only.
DECODE_MAX_SPLITS = 64
DECODE_MIN_SPLIT_KEYS = 256
# GPU launch shapes. Prefill: 128-row query tiles (16 positions x 8 heads at gpt-oss's GQA 8, the usual
# flash-attention tile for head dim 64) over 64-key tiles, 8 warps. Decode: the 8 query heads of a KV head
# padded to the 16 rows an MMA needs, 4 warps. Three stages so the block-table-indexed K/V loads are
# pipelined (cp.async) behind the dots. Not tuned on hardware yet.
PREFILL_BLOCK_M = 128
PREFILL_NUM_WARPS = 8
DECODE_NUM_WARPS = 4
NUM_STAGES = 3


def _tile_n(head_dim: int) -> int:
    """Keys per inner-loop tile."""
    return 64 if head_dim <= 64 else 32


def _is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it then runs on CPU, bf16 math is broken)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------
# KV write
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    key_ptr,  # [T, Hkv, D]
    value_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [num_blocks, Hkv, block_size, D]
    v_cache_ptr,
    slot_mapping_ptr,  # [T] int64, < 0: skip
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kch,
    stride_kcs,
    stride_vcb,
    stride_vch,
    stride_vcs,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + heads[:, None] * stride_kch + dims[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + heads[:, None] * stride_vch + dims[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values `[T, Hkv, D]` into the paged caches `[num_blocks, Hkv, block_size, D]` in place.

    `slot_mapping` `[T]` (int32/int64): slot = block_id * block_size + offset; negative slots are skipped.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or k_cache.shape != v_cache.shape:
        raise ValueError(f"shape mismatch: key {tuple(key.shape)} value {tuple(value.shape)}")
    if k_cache.shape[1] != num_kv_heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match key {tuple(key.shape)}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")
    if num_tokens == 0:
        return
    for t in (key, value, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("the last dim of key, value and the caches must be contiguous")
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=_next_pow2(num_kv_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_next_pow2(head_dim),
        BLOCK_SIZE=k_cache.shape[2],
    )


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
    stride_ps,
    stride_ph,
    stride_pn,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    MIN_SPLIT_KEYS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    CHECK_Q_LEN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_begin = tl.load(query_start_loc_ptr + seq)
    if CHECK_Q_LEN:
        if tl.load(query_start_loc_ptr + seq + 1) - q_begin != 1:  # the prefill kernel owns this sequence
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    key_lo = 0
    if HAS_WINDOW:
        key_lo = tl.maximum(seq_len - window, 0)
    num_splits, per_split = _decode_num_splits(seq_len - key_lo, MAX_SPLITS, MIN_SPLIT_KEYS, TILE_N)
    if split >= num_splits:
        return
    split_lo = key_lo + split * per_split
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
def _decode_combine_kernel(
    out_ptr,  # [T, Hq, D]
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    sinks_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    window,
    stride_ot,
    stride_oh,
    stride_ps,
    stride_ph,
    stride_pn,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    MIN_SPLIT_KEYS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    CHECK_Q_LEN: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_begin = tl.load(query_start_loc_ptr + seq)
    if CHECK_Q_LEN:
        if tl.load(query_start_loc_ptr + seq + 1) - q_begin != 1:
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    key_lo = 0
    if HAS_WINDOW:
        key_lo = tl.maximum(seq_len - window, 0)
    num_splits, _ = _decode_num_splits(seq_len - key_lo, MAX_SPLITS, MIN_SPLIT_KEYS, TILE_N)
    part = seq.to(tl.int64) * stride_ps + head * stride_ph
    sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
    m_all = sink
    for split in range(num_splits):  # max is order-independent
        m_all = tl.maximum(m_all, tl.load(part_max_ptr + part + split * stride_pn))
    l_all = tl.exp2(sink - m_all)
    dims = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.full([HEAD_DIM_PAD], 0, tl.float32)
    for split in range(num_splits):  # sequential sum: the order is fixed by the split index alone
        weight = tl.exp2(tl.load(part_max_ptr + part + split * stride_pn) - m_all)
        l_all += tl.load(part_sum_ptr + part + split * stride_pn) * weight
        acc += tl.load(part_acc_ptr + (part + split * stride_pn) * HEAD_DIM_PAD + dims) * weight
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
    tile_n = _tile_n(head_dim)
    min_split_keys = max(DECODE_MIN_SPLIT_KEYS, tile_n)
    if batch_invariant:
        max_splits = DECODE_MAX_SPLITS
    else:
        # Enough programs for ~4 waves, but no more splits than that: fewer partials to combine.
        wanted = 4 * _num_sms(query.device) / max(1, num_seqs * num_kv_heads)
        max_splits = min(DECODE_MAX_SPLITS, _next_pow2(math.ceil(wanted)))
    longest = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    if has_window:
        longest = min(longest, window)
    # The grid only bounds the split index; each sequence's split count comes from its own length.
    grid_splits = max(1, min(max_splits, math.ceil(max(1, longest) / min_split_keys)))
    head_dim_pad = _next_pow2(head_dim)
    part_acc = torch.empty(num_seqs, num_q_heads, grid_splits, head_dim_pad, device=query.device,
                           dtype=torch.float32)  # fmt: skip
    part_max = torch.empty(num_seqs, num_q_heads, grid_splits, device=query.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    _decode_split_kernel[(num_seqs, num_kv_heads, grid_splits)](
        part_acc, part_max, part_sum, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        scale_log2e, window,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), part_max.stride(0), part_max.stride(1), part_max.stride(2),
        GROUP=group, BLOCK_G=max(16, _next_pow2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, TILE_N=tile_n, MAX_SPLITS=max_splits, MIN_SPLIT_KEYS=min_split_keys,
        HAS_WINDOW=has_window, CHECK_Q_LEN=check_q_len, UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=DECODE_NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    _decode_combine_kernel[(num_seqs, num_q_heads)](
        out, part_acc, part_max, part_sum, sinks, query_start_loc, seq_lens, window,
        out.stride(0), out.stride(1), part_max.stride(0), part_max.stride(1), part_max.stride(2),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, TILE_N=tile_n, MAX_SPLITS=max_splits,
        MIN_SPLIT_KEYS=min_split_keys, HAS_WINDOW=has_window,
        CHECK_Q_LEN=check_q_len, num_warps=1,
    )  # fmt: skip
