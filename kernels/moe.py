"""Fused MXFP4 mixture-of-experts for gpt-oss: routing, two grouped matmuls, SwiGLU, weighted combine.

Data flow for `fused_moe(x [T, H], router_logits [T, E], w1, w2, top_k)` with P = T * top_k (token, slot)
pairs and w1/w2 `Mxfp4Weights` (re-laid once at load by `pack_mxfp4`):

1. `moe_route` (no host sync): `_route_topk_kernel`, one program per ROUTE_BLOCK_T tokens, picks each token's
   top-k by logit (ties to the lowest expert id) and softmaxes the k logits in fp32; a token's ids and weights
   are computed by the same instructions from its own row alone, whatever the batch. The pairs are then
   grouped by expert (stable: by pair id inside an expert) and cut into row tiles of `block_m` rows that never
   straddle two experts. Up to ROUTE_BLOCK_T tokens (decode) the same program also groups (one launch);
   beyond, `_route_group_kernel` does it from per-block histograms (two launches). The grid of the matmuls is
   an upper bound on the tile count; slots past the real tiles exit at once.
2. matmul 1 (`_moe_matmul_kernel`, SWIGLU epilogue): out^T = W1[e] @ x_tile^T, "swap-AB": the weights are
   the MMA's M side (64 weight rows per warp group, dequantised in registers: the register operand) and the
   tokens its N side, 16 per MMA (no padding of one decode token to 64 rows). Bias, clamped SwiGLU on the
   interleaved gate/up rows -> `act [P, I]` (bf16 on GPU) in expert-sorted row order.
3. matmul 2 (same kernel, partial epilogue): act @ W2[e]^T, split over K into `split_k_for(...)` parts (a
   function of the model's shapes only) written as fp32 partials `[S, P, H]` by pair id.
4. combine (`_moe_combine_kernel`): out[t] = sum over slots j (in order) of weight[t, j] * (sum over splits s
   (in order) of partial[s, t*k + j] + b2[e_tj]).

Weights (`pack_mxfp4`, re-laid once at load, on the device): each expert's [N, K] MXFP4 matrix is stored as
tiles of BLOCK_N rows x BLOCK_K columns, each tile contiguous (4 KiB of values, 256 B of scales), the K tiles
of one row block consecutive, the last one holding only the K % BLOCK_K remaining columns (no padding: the
120b experts' K = 2880 is not a multiple of 128; that tail tile is peeled out of the main loop, so the loop's
loads are unmasked 16-byte vectors). Inside a tile the order is the wgmma A fragment's (`_weight_tile`):
memory row 32 h + 8 w + g is weight row 16 w + 8 h + g, and lane t's 16 bytes of a row are its 4 words, word v
holding its 8 values of scale group v (columns 32 v + 8 j + 2 t + (0, 1), j = 0..3). So each thread's
16-byte cp.async (two per K step) lands exactly the bytes its MMA fragment needs, a warp's copies cover 512
contiguous bytes (whole cache lines), the read back from shared memory is the thread's own 16 bytes
(LDS.128, no layout conversion), and every reshape / permute after it only renames registers. Scales: one
32-bit word (the row's 4 groups) per memory row, streamed by cp.async through the same stages. (With
`num_stages=1` the same code loads the weights with LDG.128 straight into the fragment registers, no shared
memory, but without prefetch; the default keeps the cp.async stages.)

e2m1 -> bf16 by bit operations: a nibble's 3 magnitude bits placed at bf16 bits 6..8 read as bf16 are exactly
fp4 * 2^-126 (normal numbers for the exponent codes 1..3, the bf16 subnormal 2^-127 for the code 0.5), the
sign bit goes to bit 15; one multiply by 2^(s - 1) then gives fp4 * 2^(s - 127) exactly. The bits of each
32-bit word are pre-placed at load (`_WORD_BIT_SOURCES`) so that a pair of values (one bf16x2 register)
is `rotl(word, r) & mask`: 4 funnel shifts + 5 lop3 per 8 values, then one HMUL2 per pair by 2^(s - 1)
(built two scales per 32-bit add). On CUDA this is inline PTX (`_decode_words_asm`); the interpreter and the
fallback (`ASM_DECODE = False`) run the same bit operations in Triton (fp32 patterns in the interpreter,
which cannot do bf16 arithmetic). 2^(s - 1) fits bf16 for s <= 128 (|w| <= 12); a checkpoint with larger
scales gets a second exact multiply (`WIDE_SCALES`, chosen once at load).

Batch invariance: every output element is a fixed sequence of `wgmma m64 n16 k16` steps (16 tokens per MMA
at every batch size; big batches give a CTA several 16-token sub-tiles that reuse the dequantised weights)
over fixed BLOCK_K steps in order, in a split-K whose count depends on the model's shapes only; the splits
and the k slots are summed in fixed order by the combine. A token's routing, weights and output are
bit-identical alone or in any batch.

The kernels are plain functions turned into Triton kernels lazily (`_kernels()`) so that whether they run in
the interpreter is decided by `TRITON_INTERPRET` at launch time, not at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gptoss.kernels.reference import MXFP4_BLOCK

ROUTE_BLOCK_T = 32  # tokens per routing program; up to this many tokens routing is one launch
ROUTE_NUM_WARPS = 8  # 4 warps spill the [32, 128] top-k tile on sm_90
MMA_TOKENS = 16  # tokens per MMA (the wgmma N width): fixed, so bits never depend on the batch
COMBINE_BLOCK_T = 2  # tokens per combine program on GPU
LOOP_UNROLL = tl.constexpr(2)  # K tiles per iteration of the matmul's main loop (the static report's unit)
# The e2m1 decode as inline PTX on the GPU (False: the same bit operations in plain Triton, the fallback).
ASM_DECODE = True
TARGET_CTAS = 264  # split-K aims at >= 2 CTAs per SM of a 132-SM H100/H200 (a constant: not device-dependent)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (`TRITON_INTERPRET=1`), read at every launch."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (plain functions, jitted in `_kernels`)
# ----------------------------------------------------------------------------------------------------------


# Inline PTX of the GPU decode (tests/test_moe_kernel.py runs both through a small PTX emulator against the
# pure-Triton bit operations). $8 / $4: the input word; $0.. the bf16 outputs, low half first.
_DECODE_PTX = tl.constexpr("""{
        .reg .b32 t, o;
        and.b32 o, $8, 0x81C081C0;
        mov.b32 {$0, $1}, o;
        shf.l.wrap.b32 t, $8, $8, 12;
        and.b32 o, t, 0x81C081C0;
        mov.b32 {$2, $3}, o;
        shf.l.wrap.b32 t, $8, $8, 6;
        and.b32 o, t, 0x81C081C0;
        mov.b32 {$4, $5}, o;
        shf.l.wrap.b32 t, $8, $8, 10;
        and.b32 t, t, 0x01000100;
        shf.l.wrap.b32 o, $8, $8, 2;
        and.b32 o, o, 0x80C080C0;
        or.b32 o, o, t;
        mov.b32 {$6, $7}, o;
        }""")
_SCALE_PTX = tl.constexpr("""{
        .reg .b32 a, b;
        and.b32 a, $4, 0x00FF00FF;
        shl.b32 a, a, 7;
        add.u32 a, a, 0x3F003F00;
        mov.b32 {$0, $2}, a;
        shr.u32 b, $4, 1;
        and.b32 b, b, 0x7F807F80;
        add.u32 b, b, 0x3F003F00;
        mov.b32 {$1, $3}, b;
        }""")


def _rotl(x, r: tl.constexpr):
    """Rotate uint32 `x` left by `r` bits (one `shf.l.wrap` on the GPU)."""
    return (x << r) | (x >> (32 - r))


def _half_values(o, FP32_MATH: tl.constexpr):
    """uint32 bf16x2 patterns -> (low, high) values: bf16, or fp32 (a bf16 pattern << 16 is the same number)."""
    if FP32_MATH:
        return (o << 16).to(tl.float32, bitcast=True), ((o >> 16) << 16).to(tl.float32, bitcast=True)
    return o.to(tl.uint16).to(tl.bfloat16, bitcast=True), (o >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


def _decode_words_bits(words, FP32_MATH: tl.constexpr):
    """uint32 words -> their 8 values (pair j = 0..3, low / high half) as 8 tensors of the words' shape, each
    fp4 * 2^-126 exactly (bf16, fp32 when FP32_MATH): the pure-Triton decode (interpreter, fallback)."""
    m: tl.constexpr = 0x81C081C0
    a, b = _half_values(words & m, FP32_MATH)
    c, d = _half_values(_rotl(words, 12) & m, FP32_MATH)
    e, f = _half_values(_rotl(words, 6) & m, FP32_MATH)
    g, h = _half_values((_rotl(words, 2) & 0x80C080C0) | (_rotl(words, 10) & 0x01000100), FP32_MATH)
    return a, b, c, d, e, f, g, h


def _decode_words_asm(words):
    """`_decode_words_bits` as inline PTX (bf16): 4 `shf` + 5 `lop3` per word of 8 values."""
    return tl.inline_asm_elementwise(
        asm=_DECODE_PTX,
        constraints="=h,=h,=h,=h,=h,=h,=h,=h,r",
        args=[words],
        dtype=(tl.bfloat16,) * 8,
        is_pure=True,
        pack=1,
    )


def _scale_factors_asm(s_word):
    """A word of 4 e8m0 scales (s <= 128) -> the 4 factors 2^(s - 1) as bf16, two per 32-bit operation:
    (s + 126) << 7 is the bf16 pattern of 2^(s - 1) and stays below bit 15 of its half."""
    f0, f1, f2, f3 = tl.inline_asm_elementwise(
        asm=_SCALE_PTX,
        constraints="=h,=h,=h,=h,r",
        args=[s_word],
        dtype=(tl.bfloat16,) * 4,
        is_pure=True,
        pack=1,
    )
    return tl.reshape(tl.join(tl.join(f0, f2), tl.join(f1, f3)), (s_word.shape[0], 4))


def _weight_tile(
    w_base,
    s_base,
    BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,
    FP32_MATH: tl.constexpr,
    ASM_DECODE: tl.constexpr,
    WIDE_SCALES: tl.constexpr,
):
    """One K tile of the fragment-ordered layout (`pack_mxfp4`) -> [BLOCK_N, 128] weights fp4 * 2^(s - 127),
    bf16 (fp32 when FP32_MATH), in logical row / column order. GROUPS: 32-column groups present (4, fewer
    in the last tile of a K that is not a multiple of 128: the rest reads as zeros).

    Memory row rm = 32 h + 8 w + g of the tile is weight row 16 w + 8 h + g; byte 16 t + 4 v + i of a row
    (4 GROUPS t + 4 v + i in a narrower tile) is byte i of word v of lane t, and word v holds that lane's 8
    values of group v: columns 32 v + 8 j + 2 t + (0, 1), j = 0..3. So a thread's 16-byte load is its wgmma
    A fragment (rows g, g + 8 of its warp's 16, columns 2 t + 8 q + 16 c), the tensor ops below only rename
    registers, and a warp's 16-byte loads cover 512 contiguous bytes."""
    offs_rm = tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, 16)  # word 4 t + v of a memory row
    w_words = w_base.to(tl.pointer_type(tl.int32))
    if GROUPS == 4:
        words = tl.load(w_words + offs_rm[:, None] * 16 + offs_w[None, :])
        # One 32-bit word of 4 scales per memory row: a 4-byte cp.async.
        s_word = tl.load(s_base.to(tl.pointer_type(tl.int32)) + offs_rm)
        s_word = tl.reshape(tl.permute(tl.reshape(s_word, (2, BLOCK_N // 16, 8)), (1, 0, 2)), (BLOCK_N,))
        scale_bits = (s_word[:, None] >> (8 * tl.arange(0, 4))[None, :]) & 0xFF
    else:
        lane, word = offs_w // 4, offs_w % 4
        words = tl.load(
            w_words + offs_rm[:, None] * (4 * GROUPS) + (lane * GROUPS + word)[None, :],
            mask=(word < GROUPS)[None, :],
            other=0,
        )
        offs_g = tl.arange(0, 4)
        scale_bits = tl.load(
            s_base + offs_rm[:, None] * GROUPS + offs_g[None, :], mask=(offs_g < GROUPS)[None, :], other=127
        )
        scale_bits = tl.reshape(
            tl.permute(tl.reshape(scale_bits, (2, BLOCK_N // 16, 8, 4)), (1, 0, 2, 3)), (BLOCK_N, 4)
        )
    words = words.to(tl.uint32, bitcast=True)
    if ASM_DECODE:
        a, b, c, d, e, f, g, h = _decode_words_asm(words)
    else:
        a, b, c, d, e, f, g, h = _decode_words_bits(words, FP32_MATH)
    values = tl.join(tl.join(tl.join(a, b), tl.join(c, d)), tl.join(tl.join(e, f), tl.join(g, h)))
    # dims: memory row (h, w, g) | word (t, v) | half, j0, j1 (pair j = 2 j1 + j0)
    # -> weight row (w, h, g) | column (v, j1, j0, t, half) = 32 v + 8 j + 2 t + half
    values = tl.reshape(values, (2, BLOCK_N // 16, 8, 4, 4, 2, 2, 2))
    values = tl.reshape(tl.permute(values, (1, 0, 2, 4, 7, 6, 3, 5)), (BLOCK_N, 128))
    # x 2^(s - 1) (exact; 2^(s - 1) fits bf16 for s <= 128, WIDE_SCALES multiplies the rest in a second step)
    if FP32_MATH:
        s = scale_bits.to(tl.uint32)
        s_low = tl.minimum(s, 128) if WIDE_SCALES else s
        factor = ((s_low + 126) << 23).to(tl.float32, bitcast=True)
        w = tl.reshape(values, (BLOCK_N, 4, 32)) * factor[:, :, None]
        if WIDE_SCALES:
            w = w * ((s - s_low + 127) << 23).to(tl.float32, bitcast=True)[:, :, None]
    elif ASM_DECODE and GROUPS == 4 and not WIDE_SCALES:
        w = tl.reshape(values, (BLOCK_N, 4, 32)) * _scale_factors_asm(s_word)[:, :, None]
    else:
        s = scale_bits.to(tl.uint16)
        s_low = tl.minimum(s, 128) if WIDE_SCALES else s
        # (triton 3.6 widens uint16 op int-literal results to 32 bits: narrow before the bitcast)
        factor = ((s_low + 126) << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        w = tl.reshape(values, (BLOCK_N, 4, 32)) * factor[:, :, None]
        if WIDE_SCALES:
            w = w * ((s - s_low + 127) << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)[:, :, None]
    return tl.reshape(w, (BLOCK_N, 128))


def _load_tokens(a_base, row_mask, offs_k, K: tl.constexpr, FP32_MATH: tl.constexpr, MASK_K: tl.constexpr, stride_ak):
    """[MMA_TOKENS, BLOCK_K] activations of one token sub-tile, transposed to [BLOCK_K, MMA_TOKENS]. Columns
    past K (MASK_K: the tail tile) read as zeros, as their weights do."""
    mask = row_mask[:, None] & (offs_k[None, :] < K) if MASK_K else row_mask[:, None]
    a = tl.load(a_base + offs_k[None, :] * stride_ak, mask=mask, other=0.0)
    a = a.to(tl.float32) if FP32_MATH else a.to(tl.bfloat16)
    return tl.trans(a)


def _swiglu_store(
    acc,
    bias,
    rows,
    row_mask,
    pid_n,
    out_ptr,
    stride_om,
    stride_on,
    N,
    swiglu_limit,
    swiglu_alpha,
    BLOCK_N: tl.constexpr,
    MMA_T: tl.constexpr,
):
    """acc [BLOCK_N weight rows, MMA_T tokens] + bias -> clamped SwiGLU of the interleaved gate/up rows."""
    acc = acc + bias[:, None]
    # Weight rows alternate gate (even) / up (odd): output feature c pairs acc rows 2c and 2c + 1.
    gate, up = tl.split(tl.reshape(tl.trans(acc), (MMA_T, BLOCK_N // 2, 2)))
    gate = tl.minimum(gate, swiglu_limit)
    up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit)
    act = (up + 1.0) * (gate * tl.sigmoid(swiglu_alpha * gate))
    offs_c = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_c[None, :] * stride_on
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_c[None, :] < N // 2))


def _partial_store(acc, pairs, row_mask, offs_n, n_mask, out_ptr, stride_om, stride_on):
    """acc [BLOCK_N, MMA_T] -> out[pair, n] (fp32 partial sums of one K split)."""
    out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, tl.trans(acc), mask=row_mask[:, None] & n_mask[None, :])


def _moe_matmul_kernel(
    a_ptr,
    stride_am,
    stride_ak,  # activations: x [T, K] (GATHER_A) or act [P, K] in sorted order
    w_ptr,
    stride_we,
    stride_wt,  # values [E, N_TILES, BLOCK_N * K / 2] uint8 (pack_mxfp4 layout)
    s_ptr,
    stride_se,
    stride_st,  # scales [E, N_TILES, BLOCK_N * K / 32] uint8
    bias_ptr,
    stride_be,  # bias [E, N] fp32 (SWIGLU only; the combine adds matmul 2's)
    out_ptr,
    stride_os,
    stride_om,
    stride_on,  # act [P, N/2] (SWIGLU) | partials [SPLIT_K, P, N] fp32
    sorted_pair_ptr,  # [P] int32: pair id (token * TOP_K + slot) of each expert-sorted row
    tile_expert_ptr,  # [num_tiles] int32: expert of each row tile, -1 for unused grid slots
    tile_row_start_ptr,  # [num_tiles] int32: first sorted row of each tile
    expert_offsets_ptr,  # [E + 1] int32: sorted rows of expert e are offsets[e] .. offsets[e + 1] - 1
    N,  # weight rows (output features before SwiGLU)
    swiglu_limit,
    swiglu_alpha,
    K: tl.constexpr,  # reduction size: a model constant
    TOP_K: tl.constexpr,
    GATHER_A: tl.constexpr,  # True: A row = token of the pair (matmul 1); False: A row = sorted row
    SWIGLU: tl.constexpr,  # True: bias + SwiGLU epilogue; False: fp32 partial sums by pair id
    FP32_MATH: tl.constexpr,  # interpreter: bf16 arithmetic is broken there, so decode and multiply in fp32
    WIDE_SCALES: tl.constexpr,  # some e8m0 scale > 128: a second exact multiply in the decode
    ASM_DECODE: tl.constexpr,  # GPU: the e2m1 bit operations as inline PTX (the pure-Triton ones otherwise)
    SUBTILES: tl.constexpr,  # 16-token sub-tiles per CTA (1, 2 or 4): they share each dequantised weight tile
    BLOCK_N: tl.constexpr,  # weight rows per CTA (the MMA's M side)
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < 0:  # grid slot beyond the real tiles (the grid is an upper bound so routing never syncs)
        return
    MMA_T: tl.constexpr = 16
    row_start = tl.load(tile_row_start_ptr + pid_m)
    row_end = tl.load(expert_offsets_ptr + expert + 1)

    expert64 = expert.to(tl.int64)
    w_tile = w_ptr + expert64 * stride_we + pid_n.to(tl.int64) * stride_wt
    s_tile = s_ptr + expert64 * stride_se + pid_n.to(tl.int64) * stride_st
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N

    # Token sub-tiles: rows row_start + 16 j .. + 15 of the expert-sorted order.
    rows0 = row_start + tl.arange(0, MMA_T)
    mask0 = rows0 < row_end
    pairs0 = tl.load(sorted_pair_ptr + rows0, mask=mask0, other=0)
    # Row offsets in int64: P * H passes 2^31 elements past ~186k tokens at 120b shapes.
    a0 = a_ptr + ((pairs0 // TOP_K) if GATHER_A else rows0).to(tl.int64)[:, None] * stride_am
    acc0 = tl.zeros((BLOCK_N, MMA_T), dtype=tl.float32)
    if SUBTILES > 1:
        rows1 = rows0 + MMA_T
        mask1 = rows1 < row_end
        pairs1 = tl.load(sorted_pair_ptr + rows1, mask=mask1, other=0)
        a1 = a_ptr + ((pairs1 // TOP_K) if GATHER_A else rows1).to(tl.int64)[:, None] * stride_am
        acc1 = tl.zeros((BLOCK_N, MMA_T), dtype=tl.float32)
    if SUBTILES > 2:
        rows2 = rows0 + 2 * MMA_T
        mask2 = rows2 < row_end
        pairs2 = tl.load(sorted_pair_ptr + rows2, mask=mask2, other=0)
        a2 = a_ptr + ((pairs2 // TOP_K) if GATHER_A else rows2).to(tl.int64)[:, None] * stride_am
        acc2 = tl.zeros((BLOCK_N, MMA_T), dtype=tl.float32)
        rows3 = rows0 + 3 * MMA_T
        mask3 = rows3 < row_end
        pairs3 = tl.load(sorted_pair_ptr + rows3, mask=mask3, other=0)
        a3 = a_ptr + ((pairs3 // TOP_K) if GATHER_A else rows3).to(tl.int64)[:, None] * stride_am
        acc3 = tl.zeros((BLOCK_N, MMA_T), dtype=tl.float32)

    # Full 128-column K tiles, then (K % 128 != 0) one narrower tail tile: the tail is stored with its own
    # compile-time shape, so the main loop's loads are unmasked 16-byte vectors.
    FULL_TILES: tl.constexpr = K // BLOCK_K
    TAIL_GROUPS: tl.constexpr = (K % BLOCK_K) // 32
    K_TILES: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K  # K is a multiple of 32
    TILES_PER_SPLIT: tl.constexpr = (K_TILES + SPLIT_K - 1) // SPLIT_K
    TILE_BYTES: tl.constexpr = BLOCK_N * BLOCK_K // 2
    TILE_SCALES: tl.constexpr = BLOCK_N * BLOCK_K // 32
    kt_begin = pid_s * TILES_PER_SPLIT
    kt_end = tl.minimum(kt_begin + TILES_PER_SPLIT, K_TILES)
    # Unrolled twice: the pipeline's per-iteration bookkeeping is paid once per two K tiles.
    for kt in tl.range(kt_begin, tl.minimum(kt_end, FULL_TILES), loop_unroll_factor=LOOP_UNROLL):
        w = _weight_tile(
            w_tile + kt * TILE_BYTES, s_tile + kt * TILE_SCALES, BLOCK_N, 4, FP32_MATH, ASM_DECODE, WIDE_SCALES
        )
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        acc0 += tl.dot(w, _load_tokens(a0, mask0, offs_k, K, FP32_MATH, False, stride_ak))
        if SUBTILES > 1:
            acc1 += tl.dot(w, _load_tokens(a1, mask1, offs_k, K, FP32_MATH, False, stride_ak))
        if SUBTILES > 2:
            acc2 += tl.dot(w, _load_tokens(a2, mask2, offs_k, K, FP32_MATH, False, stride_ak))
            acc3 += tl.dot(w, _load_tokens(a3, mask3, offs_k, K, FP32_MATH, False, stride_ak))
    if TAIL_GROUPS > 0:
        if kt_end == K_TILES:
            w = _weight_tile(
                w_tile + FULL_TILES * TILE_BYTES,
                s_tile + FULL_TILES * TILE_SCALES,
                BLOCK_N,
                TAIL_GROUPS,
                FP32_MATH,
                ASM_DECODE,
                WIDE_SCALES,
            )
            offs_k = FULL_TILES * BLOCK_K + tl.arange(0, BLOCK_K)
            acc0 += tl.dot(w, _load_tokens(a0, mask0, offs_k, K, FP32_MATH, True, stride_ak))
            if SUBTILES > 1:
                acc1 += tl.dot(w, _load_tokens(a1, mask1, offs_k, K, FP32_MATH, True, stride_ak))
            if SUBTILES > 2:
                acc2 += tl.dot(w, _load_tokens(a2, mask2, offs_k, K, FP32_MATH, True, stride_ak))
                acc3 += tl.dot(w, _load_tokens(a3, mask3, offs_k, K, FP32_MATH, True, stride_ak))

    if SWIGLU:
        bias = tl.load(bias_ptr + expert64 * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        _swiglu_store(
            acc0,
            bias,
            rows0,
            mask0,
            pid_n,
            out_ptr,
            stride_om,
            stride_on,
            N,
            swiglu_limit,
            swiglu_alpha,
            BLOCK_N,
            MMA_T,
        )
        if SUBTILES > 1:
            _swiglu_store(
                acc1,
                bias,
                rows1,
                mask1,
                pid_n,
                out_ptr,
                stride_om,
                stride_on,
                N,
                swiglu_limit,
                swiglu_alpha,
                BLOCK_N,
                MMA_T,
            )
        if SUBTILES > 2:
            _swiglu_store(
                acc2,
                bias,
                rows2,
                mask2,
                pid_n,
                out_ptr,
                stride_om,
                stride_on,
                N,
                swiglu_limit,
                swiglu_alpha,
                BLOCK_N,
                MMA_T,
            )
            _swiglu_store(
                acc3,
                bias,
                rows3,
                mask3,
                pid_n,
                out_ptr,
                stride_om,
                stride_on,
                N,
                swiglu_limit,
                swiglu_alpha,
                BLOCK_N,
                MMA_T,
            )
    else:
        part = out_ptr + pid_s.to(tl.int64) * stride_os
        _partial_store(acc0, pairs0, mask0, offs_n, n_mask, part, stride_om, stride_on)
        if SUBTILES > 1:
            _partial_store(acc1, pairs1, mask1, offs_n, n_mask, part, stride_om, stride_on)
        if SUBTILES > 2:
            _partial_store(acc2, pairs2, mask2, offs_n, n_mask, part, stride_om, stride_on)
            _partial_store(acc3, pairs3, mask3, offs_n, n_mask, part, stride_om, stride_on)


def _moe_combine_kernel(
    part_ptr,  # [SPLIT_K, T * TOP_K, H] fp32 partial sums of matmul 2 by pair id
    stride_ps,
    stride_pm,
    expert_ids_ptr,  # [T * TOP_K] int32
    expert_weights_ptr,  # [T * TOP_K] fp32
    bias_ptr,  # [E, H] fp32
    stride_be,
    out_ptr,  # [T, H]
    stride_om,
    num_tokens,
    H,
    TOP_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum over slots j of weight[t, j] * (sum over splits s of partial[s, t*k + j] + b2[e_tj]), both
    sums in index order: every element's arithmetic is fixed, whatever the batch or the tile."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = tokens < num_tokens
    mask = t_mask[:, None] & (offs_h[None, :] < H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pairs = tokens.to(tl.int64) * TOP_K + slot
        expert = tl.load(expert_ids_ptr + pairs, mask=t_mask, other=0).to(tl.int64)
        y = tl.load(bias_ptr + expert[:, None] * stride_be + offs_h[None, :], mask=mask, other=0.0)
        for split in tl.static_range(SPLIT_K):
            y += tl.load(
                part_ptr + split * stride_ps + pairs[:, None] * stride_pm + offs_h[None, :], mask=mask, other=0.0
            )
        acc += tl.load(expert_weights_ptr + pairs, mask=t_mask, other=0.0)[:, None] * y
    tl.store(
        out_ptr + tokens.to(tl.int64)[:, None] * stride_om + offs_h[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _route_topk(
    logits_ptr,
    stride_lt,
    stride_le,
    expert_ids_ptr,
    expert_weights_ptr,
    offs_t,
    t_mask,
    E: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_KK: tl.constexpr,
):
    """Top-k of each token's logits (ties to the lowest expert id) and the softmax of the k chosen, in fp32.
    Every value depends only on the token's own row: the same bits in any batch and any program."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_kk = tl.arange(0, BLOCK_KK)
    e_valid = offs_e < E
    logits = tl.load(
        logits_ptr + offs_t.to(tl.int64)[:, None] * stride_lt + offs_e[None, :] * stride_le,
        mask=t_mask[:, None] & e_valid[None, :],
        other=0.0,
    ).to(tl.float32)
    logits = tl.where(e_valid[None, :], logits, float("-inf"))
    top_max = tl.max(logits, axis=1)
    chosen = tl.zeros((offs_t.shape[0], BLOCK_KK), dtype=tl.float32)
    ids = tl.zeros((offs_t.shape[0], BLOCK_KK), dtype=tl.int32)
    denom = tl.zeros(top_max.shape, dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(logits, axis=1)
        best_id = tl.argmax(logits, axis=1, tie_break_left=True)
        chosen = tl.where(offs_kk[None, :] == slot, best[:, None], chosen)
        ids = tl.where(offs_kk[None, :] == slot, best_id[:, None], ids)
        denom += tl.exp(best - top_max)  # slots in order: a fixed summation order
        logits = tl.where(offs_e[None, :] == best_id[:, None], float("-inf"), logits)
    out_offs = offs_t[:, None] * TOP_K + offs_kk[None, :]
    out_mask = t_mask[:, None] & (offs_kk[None, :] < TOP_K)
    tl.store(expert_ids_ptr + out_offs, ids, mask=out_mask)
    tl.store(expert_weights_ptr + out_offs, tl.exp(chosen - top_max[:, None]) / denom[:, None], mask=out_mask)


def _block_pair_experts(expert_ids_ptr, block, num_pairs, E: tl.constexpr, PAIRS: tl.constexpr, BLOCK_P: tl.constexpr):
    """Expert of each pair of routing block `block` (PAIRS pairs, padded to BLOCK_P; E where masked)."""
    offs_p = tl.arange(0, BLOCK_P)
    pair_ids = block * PAIRS + offs_p
    p_mask = (offs_p < PAIRS) & (pair_ids < num_pairs)
    return tl.load(expert_ids_ptr + pair_ids, mask=p_mask, other=E), p_mask


def _write_tiles(
    counts,
    tile_expert_ptr,
    tile_row_start_ptr,
    num_slots,
    E: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Row tiles from the per-expert pair counts [BLOCK_E]: slot s belongs to the expert whose tile range
    [tile_begin, tile_end) holds s; slots past the last tile get expert -1. Chunks of 16 slots bound registers."""
    offs_e = tl.arange(0, BLOCK_E)
    ends = tl.cumsum(counts, 0)
    starts = ends - counts
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    tile_begin = tile_end - tiles
    for s0 in range(0, num_slots, 16):
        offs_s = s0 + tl.arange(0, 16)
        slot_expert = tl.sum((tile_end[None, :] <= offs_s[:, None]).to(tl.int32), axis=1)
        valid = slot_expert < E
        one_hot = slot_expert[:, None] == offs_e[None, :]
        first_tile = tl.sum(tl.where(one_hot, tile_begin[None, :], 0), axis=1)
        row_base = tl.sum(tl.where(one_hot, starts[None, :], 0), axis=1)
        s_mask = offs_s < num_slots
        tl.store(tile_expert_ptr + offs_s, tl.where(valid, slot_expert, -1), mask=s_mask)
        row_start = tl.where(valid, row_base + (offs_s - first_tile) * BLOCK_M, 0)
        tl.store(tile_row_start_ptr + offs_s, row_start, mask=s_mask)


def _scatter_block_pairs(
    expert_ids_ptr,
    sorted_pairs_ptr,
    scratch_ptr,
    base,
    block,
    num_pairs,
    E: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Write routing block `block`'s pair ids at their expert-sorted rows: base[e] (the first row of expert e
    for this block) + the pair's rank among the block's pairs of its expert by pair id (a stable order).
    `scratch` [BLOCK_E] turns base into a gather. The rank is counted in chunks of 16 pairs, not sorted:
    a bounded register tile, and cheap in the interpreter."""
    pair_expert, p_mask = _block_pair_experts(expert_ids_ptr, block, num_pairs, E, PAIRS, BLOCK_P)
    tl.store(scratch_ptr + tl.arange(0, BLOCK_E), base)
    tl.debug_barrier()  # the scratch row is read back below by other threads of this program
    offs_p = tl.arange(0, BLOCK_P)
    rank = tl.zeros((BLOCK_P,), dtype=tl.int32)
    for q0 in tl.static_range(0, BLOCK_P, 16):
        offs_q = q0 + tl.arange(0, 16)
        q_expert = tl.load(
            expert_ids_ptr + block * PAIRS + offs_q,
            mask=(offs_q < PAIRS) & (block * PAIRS + offs_q < num_pairs),
            other=E,
        )
        earlier = (q_expert[None, :] == pair_expert[:, None]) & (offs_q[None, :] < offs_p[:, None])
        rank += tl.sum(earlier.to(tl.int32), axis=1)
    dest = tl.load(scratch_ptr + pair_expert, mask=p_mask, other=0) + rank
    tl.store(sorted_pairs_ptr + dest, block * PAIRS + offs_p, mask=p_mask)


def _route_topk_kernel(
    logits_ptr,
    stride_lt,
    stride_le,  # router logits [T, E]
    expert_ids_ptr,  # out [T, TOP_K] int32 (contiguous)
    expert_weights_ptr,  # out [T, TOP_K] fp32 (contiguous)
    hist_ptr,  # out [num_blocks, BLOCK_E] int32: pairs per expert in each block (GROUP=False)
    sorted_pairs_ptr,  # out [P] int32 (GROUP=True)
    expert_offsets_ptr,  # out [E + 1] int32 (GROUP=True)
    tile_expert_ptr,
    tile_row_start_ptr,  # out [num_slots] int32 (GROUP=True)
    scratch_ptr,  # [num_blocks, BLOCK_E] int32
    num_tokens,
    num_slots,
    E: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_KK: tl.constexpr,  # next power of two >= TOP_K
    BLOCK_P: tl.constexpr,  # next power of two >= BLOCK_T * TOP_K
    GROUP: tl.constexpr,  # one program holds every token: also group by expert and write the tiles
):
    block = tl.program_id(0)
    offs_t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_tokens
    _route_topk(
        logits_ptr,
        stride_lt,
        stride_le,
        expert_ids_ptr,
        expert_weights_ptr,
        offs_t,
        t_mask,
        E,
        TOP_K,
        BLOCK_E,
        BLOCK_KK,
    )
    tl.debug_barrier()  # the ids are re-read below, by other threads of this program
    PAIRS: tl.constexpr = BLOCK_T * TOP_K
    num_pairs = num_tokens * TOP_K
    pair_expert, p_mask = _block_pair_experts(expert_ids_ptr, block, num_pairs, E, PAIRS, BLOCK_P)
    counts = tl.histogram(pair_expert, BLOCK_E, mask=p_mask)
    offs_e = tl.arange(0, BLOCK_E)
    if GROUP:
        ends = tl.cumsum(counts, 0)
        tl.store(expert_offsets_ptr + offs_e, ends - counts, mask=offs_e < E)
        tl.store(expert_offsets_ptr + 1 + offs_e, ends, mask=offs_e == E - 1)  # the total, at [E]
        _scatter_block_pairs(
            expert_ids_ptr, sorted_pairs_ptr, scratch_ptr, ends - counts, block, num_pairs, E, BLOCK_E, PAIRS, BLOCK_P
        )
        _write_tiles(counts, tile_expert_ptr, tile_row_start_ptr, num_slots, E, BLOCK_E, BLOCK_M)
    else:
        tl.store(hist_ptr + block * BLOCK_E + offs_e, counts)


def _route_group_kernel(
    expert_ids_ptr,  # [T * TOP_K] int32
    hist_ptr,  # [num_blocks, BLOCK_E] int32
    sorted_pairs_ptr,  # out [P] int32
    expert_offsets_ptr,  # out [E + 1] int32
    tile_expert_ptr,
    tile_row_start_ptr,  # out [num_slots] int32
    scratch_ptr,  # [num_blocks, BLOCK_E] int32
    num_pairs,
    num_blocks,
    num_slots,
    E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PAIRS: tl.constexpr,  # pairs per routing block (ROUTE_BLOCK_T * TOP_K)
    BLOCK_P: tl.constexpr,
):
    """One program per routing block: its pairs' sorted rows from the histograms of all blocks (exclusive
    prefix over the blocks before it); program 0 also writes the offsets and the tiles."""
    block = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    before = tl.zeros((BLOCK_E,), dtype=tl.int32)
    total = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for b0 in range(0, num_blocks, 16):  # 16 blocks' histograms at a time
        offs_b = b0 + tl.arange(0, 16)
        h = tl.load(hist_ptr + offs_b[:, None] * BLOCK_E + offs_e[None, :], mask=offs_b[:, None] < num_blocks, other=0)
        total += tl.sum(h, axis=0)
        before += tl.sum(tl.where(offs_b[:, None] < block, h, 0), axis=0)
    expert_start = tl.cumsum(total, 0) - total
    _scatter_block_pairs(
        expert_ids_ptr,
        sorted_pairs_ptr,
        scratch_ptr + block * BLOCK_E,
        expert_start + before,
        block,
        num_pairs,
        E,
        BLOCK_E,
        PAIRS,
        BLOCK_P,
    )
    if block == 0:
        tl.store(expert_offsets_ptr + offs_e, expert_start, mask=offs_e < E)
        tl.store(expert_offsets_ptr + 1 + offs_e, expert_start + total, mask=offs_e == E - 1)
        _write_tiles(total, tile_expert_ptr, tile_row_start_ptr, num_slots, E, BLOCK_E, BLOCK_M)


_KERNEL_FNS = (_moe_matmul_kernel, _moe_combine_kernel, _route_topk_kernel, _route_group_kernel)
# Device functions the kernels call, by their module-level names. A compiled kernel needs them as
# JITFunctions, the interpreter as plain functions: `_kernels` binds the names for the current mode.
_HELPER_FNS = {
    fn.__name__: fn
    for fn in (
        _rotl,
        _half_values,
        _decode_words_bits,
        _decode_words_asm,
        _scale_factors_asm,
        _weight_tile,
        _load_tokens,
        _swiglu_store,
        _partial_store,
        _route_topk,
        _block_pair_experts,
        _write_tiles,
        _scatter_block_pairs,
    )
}
_JITTED: dict[bool, tuple] = {}
_JITTED_HELPERS: dict[bool, dict] = {}


def _kernels() -> tuple:
    """(matmul, combine, route_topk, route_group) for the current mode; `triton.jit` picks interpreter or not.
    Also binds the helper names to the same mode's versions (so call this before compiling a kernel)."""
    mode = interpreting()
    if mode not in _JITTED:
        _JITTED_HELPERS[mode] = {name: triton.jit(fn) for name, fn in _HELPER_FNS.items()}
        _JITTED[mode] = tuple(triton.jit(fn) for fn in _KERNEL_FNS)
    globals().update(_HELPER_FNS if mode else _JITTED_HELPERS[mode])
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


def route_launches(num_tokens: int) -> int:
    """Kernel launches of `moe_route` for `num_tokens` tokens (1 up to ROUTE_BLOCK_T, else 2)."""
    return 1 if num_tokens <= ROUTE_BLOCK_T else 2


def moe_route(router_logits: torch.Tensor, top_k: int, block_m: int) -> MoeRouting:
    """Top-k routing and expert-sorted row tiles for `router_logits` `[T, E]`; no device-to-host sync.

    One implementation for every token count: the per-token top-k and softmax are computed by the same code
    in every program (so a token's ids and weights have the same bits alone and in any batch); the grouping
    is exact integer work. The grid size is an upper bound known on the host (CUDA-graph capturable).
    """
    num_tokens, num_experts = router_logits.shape
    if not router_logits.is_cuda and not interpreting():
        raise RuntimeError("moe_route needs CUDA tensors (or TRITON_INTERPRET=1); use moe_route_reference")
    num_pairs = num_tokens * top_k
    num_slots = max_row_tiles(num_pairs, num_experts, block_m)
    block_e = triton.next_power_of_2(num_experts)
    num_blocks = max(1, triton.cdiv(num_tokens, ROUTE_BLOCK_T))
    device = router_logits.device
    i32 = {"dtype": torch.int32, "device": device}
    expert_ids = torch.empty(num_tokens, top_k, **i32)
    expert_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    sorted_pairs = torch.empty(num_pairs, **i32)
    expert_offsets = torch.empty(num_experts + 1, **i32)
    tile_expert = torch.empty(num_slots, **i32)
    tile_row_start = torch.empty(num_slots, **i32)
    hist = torch.empty(num_blocks, block_e, **i32)
    scratch = torch.empty(num_blocks, block_e, **i32)
    _, _, topk_kernel, group_kernel = _kernels()
    group_here = num_blocks == 1
    block_p = triton.next_power_of_2(ROUTE_BLOCK_T * top_k)
    topk_kernel[(num_blocks,)](
        router_logits,
        router_logits.stride(0),
        router_logits.stride(1),
        expert_ids,
        expert_weights,
        hist,
        sorted_pairs,
        expert_offsets,
        tile_expert,
        tile_row_start,
        scratch,
        num_tokens,
        num_slots,
        E=num_experts,
        TOP_K=top_k,
        BLOCK_M=block_m,
        BLOCK_T=ROUTE_BLOCK_T,
        BLOCK_E=block_e,
        BLOCK_KK=triton.next_power_of_2(top_k),
        BLOCK_P=block_p,
        GROUP=group_here,
        num_warps=ROUTE_NUM_WARPS,
    )
    if not group_here:
        group_kernel[(num_blocks,)](
            expert_ids,
            hist,
            sorted_pairs,
            expert_offsets,
            tile_expert,
            tile_row_start,
            scratch,
            num_pairs,
            num_blocks,
            num_slots,
            E=num_experts,
            BLOCK_M=block_m,
            BLOCK_E=block_e,
            PAIRS=ROUTE_BLOCK_T * top_k,
            BLOCK_P=block_p,
            num_warps=ROUTE_NUM_WARPS,
        )
    return MoeRouting(expert_ids, expert_weights, sorted_pairs, expert_offsets, tile_expert, tile_row_start, block_m)


def moe_route_reference(router_logits: torch.Tensor, top_k: int, block_m: int) -> MoeRouting:
    """`moe_route` with torch ops (the test oracle). torch.topk's tie order is unspecified: compare on logits
    without ties (the kernel's rule is the lowest expert id)."""
    num_tokens, num_experts = router_logits.shape
    num_slots = max_row_tiles(num_tokens * top_k, num_experts, block_m)
    device = router_logits.device
    top_logits, top_ids = torch.topk(router_logits.float(), top_k, dim=-1)
    expert_weights = torch.softmax(top_logits, dim=-1)
    expert_ids = top_ids.to(torch.int32)
    sorted_experts, sorted_pairs = torch.sort(expert_ids.reshape(-1), stable=True)
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
# Weights: the load-time layout
# ----------------------------------------------------------------------------------------------------------

BLOCK_N = 64  # weight rows per CTA: one warp group's wgmma M
BLOCK_K = 128  # K step: 64 B of values and 4 scale bytes per weight row


@dataclass(frozen=True)
class Mxfp4Weights:
    """One MXFP4 expert matrix `[E, N, K]` in the kernel's layout (see the module docstring).

    values `[E, N_pad / BLOCK_N, BLOCK_N * K / 2]` uint8; scales `[E, N_pad / BLOCK_N, BLOCK_N * K / 32]`
    uint8; bias `[E, N]` fp32. N_pad rounds N up to BLOCK_N (zero rows, never stored out). `wide_scales`:
    some scale exceeds 128, so the decode needs its second multiply.
    """

    values: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor
    n: int
    k: int
    wide_scales: bool

    @property
    def num_experts(self) -> int:
        return self.values.shape[0]


# The fragment bit layout. A 32-bit word holds the 8 values of one thread, one row and one scale group: pairs
# j = 0..3 (columns 8 j + 2 t + (0, 1) of the group), each decoded into one bf16x2 register as
# `rotl(word, r) & mask`: the value's sign at bf16 bit 15, its three magnitude bits at bits 8..6 (read as
# bf16 that is fp4 * 2^-126 exactly), the second value of the pair 16 bits higher. Pairs 0..2 take one
# rotation each (0, 12, 6); pair 3 two (2 for the sign and low magnitude bits, 10 for the top one). The 32
# source bits are all distinct (`_word_bit_sources` asserts it): 4 rotations + 5 masks per 8 values.
_PAIR_ROTATIONS = (0, 12, 6, None)
_NIBBLE_TARGET_BITS = (6, 7, 8, 15)  # fp4 nibble bit 0 (mantissa), 1, 2 (exponent), 3 (sign) -> bf16 bit


def _word_bit_sources() -> torch.Tensor:
    """[4 (pair j), 2 (half), 4 (nibble bit)] -> the word bit the decode moves to that value's bf16 bit."""
    sources = torch.empty(4, 2, 4, dtype=torch.int64)
    for j, rotation in enumerate(_PAIR_ROTATIONS):
        for half in range(2):
            for bit, target in enumerate(_NIBBLE_TARGET_BITS):
                r = rotation if rotation is not None else (10 if target == 8 else 2)
                sources[j, half, bit] = (target + 16 * half - r) % 32
    assert sorted(sources.flatten().tolist()) == list(range(32)), "decode rotations must use every bit once"
    return sources


_WORD_BIT_SOURCES = _word_bit_sources()


def _fragment_tile(codes: torch.Tensor, groups: int) -> torch.Tensor:
    """[NB * BLOCK_N, tiles * 32 * groups] fp4 codes (one per uint8, low 4 bits) -> [NB, tiles, BLOCK_N *
    groups * 16] bytes of `_weight_tile`'s layout (memory row 32 h + 8 w + g = weight row 16 w + 8 h + g;
    lane t's word v holds columns 32 v + 8 j + 2 t + half of the row, bits per `_WORD_BIT_SOURCES`)."""
    blocks = codes.shape[0] // BLOCK_N
    tiles = codes.shape[1] // (32 * groups)
    c = codes.reshape(blocks, BLOCK_N // 16, 2, 8, tiles, groups, 4, 4, 2).to(torch.int64)
    # -> [NB, tiles, h, w, g, t, v, j, half]
    c = c.permute(0, 4, 2, 1, 3, 7, 5, 6, 8)
    bits = (c[..., None] >> torch.arange(4, device=codes.device)) & 1  # [..., j, half, nibble bit]
    words = (bits << _WORD_BIT_SOURCES.to(codes.device)).sum(dim=(-3, -2, -1))  # [NB, tiles, h, w, g, t, v]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.reshape(blocks, tiles, -1).view(torch.uint8)  # little-endian: byte i = bits 8i..8i+7


def _fragment_scales(scales: torch.Tensor, groups: int) -> torch.Tensor:
    """[NB * BLOCK_N, tiles * groups] e8m0 bytes -> [NB, tiles, BLOCK_N * groups], memory row order (h, w, g)."""
    blocks = scales.shape[0] // BLOCK_N
    tiles = scales.shape[1] // groups
    s = scales.reshape(blocks, BLOCK_N // 16, 2, 8, tiles, groups).permute(0, 4, 2, 1, 3, 5)
    return s.reshape(blocks, tiles, -1)


def pack_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> Mxfp4Weights:
    """Re-lay checkpoint MXFP4 `blocks [E, N, K/32, 16]`, `scales [E, N, K/32]`, `bias [E, N]` for the
    kernel (the fragment-ordered layout of `_weight_tile`), on their device, one expert at a time."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("MXFP4 blocks and scales must be uint8")
    experts, n, groups, half = blocks.shape
    if half != MXFP4_BLOCK // 2 or tuple(scales.shape) != (experts, n, groups) or tuple(bias.shape) != (experts, n):
        raise ValueError(f"blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}, bias {tuple(bias.shape)}")
    k = groups * MXFP4_BLOCK
    n_pad = triton.cdiv(n, BLOCK_N) * BLOCK_N
    full = k // BLOCK_K * BLOCK_K
    tail_groups = (k - full) // MXFP4_BLOCK
    values = torch.empty(experts, n_pad // BLOCK_N, BLOCK_N * k // 2, dtype=torch.uint8, device=blocks.device)
    packed_scales = torch.empty(experts, n_pad // BLOCK_N, BLOCK_N * groups, dtype=torch.uint8, device=blocks.device)
    for e in range(experts):
        raw = blocks[e].reshape(n, k // 2)
        codes = torch.zeros(n_pad, k, dtype=torch.uint8, device=blocks.device)
        codes[:n, 0::2] = raw & 0xF  # the low nibble is the earlier value
        codes[:n, 1::2] = raw >> 4
        s = torch.full((n_pad, groups), 127, dtype=torch.uint8, device=blocks.device)
        s[:n] = scales[e]
        parts = [_fragment_tile(codes[:, :full], 4).flatten(1)] if full else []
        scale_parts = [_fragment_scales(s[:, : full // MXFP4_BLOCK], 4).flatten(1)] if full else []
        if tail_groups:
            parts.append(_fragment_tile(codes[:, full:], tail_groups).flatten(1))
            scale_parts.append(_fragment_scales(s[:, full // MXFP4_BLOCK :], tail_groups).flatten(1))
        values[e] = torch.cat(parts, dim=1)
        packed_scales[e] = torch.cat(scale_parts, dim=1)
    wide = bool((scales > 128).any())
    return Mxfp4Weights(values, packed_scales, bias.to(torch.float32).contiguous(), n, k, wide)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeConfig:
    """Launch shape: `subtiles` 16-token MMA tiles per CTA (rows per routing tile = 16 * subtiles)."""

    subtiles: int
    num_warps: int = 4
    num_stages: int = 3

    @property
    def block_m(self) -> int:
        return MMA_TOKENS * self.subtiles


# Keyed on the token count only; every entry issues the same wgmma m64n16k16 per weight tile and K step.
_CONFIGS: list[tuple[int, MoeConfig]] = [
    (64, MoeConfig(subtiles=1)),  # decode: 16-token tiles, the most CTAs for a few experts
    # Beyond: two sub-tiles share each dequantised weight tile (four spill on sm_90 with triton 3.9).
    (1 << 62, MoeConfig(subtiles=2)),
]


def pick_config(num_tokens: int) -> MoeConfig:
    """Launch shape for `num_tokens` (the table is keyed on the token count only)."""
    for max_tokens, config in _CONFIGS:
        if num_tokens <= max_tokens:
            return config
    return _CONFIGS[-1][1]


def split_k_for(k: int, n: int, top_k: int) -> int:
    """K splits of a matmul without SwiGLU: enough that top_k experts x N tiles x splits reach TARGET_CTAS
    at batch 1, never below 4 K tiles per split. A function of the model's shapes only (never the batch)."""
    k_tiles = triton.cdiv(k, BLOCK_K)
    ctas = top_k * triton.cdiv(n, BLOCK_N)
    return max(1, min(triton.cdiv(TARGET_CTAS, ctas), k_tiles // 4))


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w1: Mxfp4Weights,
    w2: Mxfp4Weights,
    top_k: int,
    swiglu_limit: float = 7.0,
    swiglu_alpha: float = 1.702,
    config: MoeConfig | None = None,
    split_k: int | None = None,
    expert_start: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The gpt-oss MoE block in Triton; same contract as `kernels.reference.moe_reference` with the experts
    packed by `pack_mxfp4` (w1: gate/up interleaved `[E, 2I, H]`, w2: `[E, H, I]`).

    x: `[T, H]` (bf16, fp16 or fp32); router_logits: `[T, E]`. Returns `[T, H]` in `out_dtype` (default x's
    dtype), bit-identical for a token alone or in any batch. `config` and `split_k` override the launch table
    and `split_k_for` (tests).

    Expert parallel: w1/w2 may hold only experts `expert_start .. expert_start + E' - 1`. Routing runs over all
    E experts as usual; then the other experts' tiles are dropped (tile_expert -1: their programs exit), the
    local ones renumbered, and the combine sees the other slots with weight 0 (their partials stay 0): the
    result is this shard's part of the sum over the k slots, with no change to the kernels.
    """
    if x.dim() != 2 or router_logits.dim() != 2 or router_logits.shape[0] != x.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and router_logits {tuple(router_logits.shape)} must be [T, H], [T, E]")
    num_tokens, hidden = x.shape
    num_experts = router_logits.shape[1]
    local_experts = w1.num_experts
    intermediate = w1.n // 2
    if w1.k != hidden or w2.n != hidden or w2.k != intermediate or w1.n != 2 * intermediate:
        raise ValueError(f"w1 [{w1.n}, {w1.k}] and w2 [{w2.n}, {w2.k}] do not fit hidden {hidden}")
    if w2.num_experts != local_experts or not (expert_start >= 0 and expert_start + local_experts <= num_experts):
        raise ValueError(
            f"weights of experts {expert_start}..{expert_start + local_experts - 1} (w2: {w2.num_experts}) "
            f"not among the router's {num_experts}"
        )
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be in 1..{num_experts}")
    if not x.is_cuda and not interpreting():
        raise RuntimeError("fused_moe needs CUDA tensors (or TRITON_INTERPRET=1); use moe_reference on CPU")
    out_dtype = out_dtype or x.dtype
    if num_tokens == 0:
        return x.new_empty(0, hidden, dtype=out_dtype)

    matmul_kernel, combine_kernel, _, _ = _kernels()
    fp32_math = interpreting()
    config = config or pick_config(num_tokens)
    routing = moe_route(router_logits, top_k, config.block_m)
    num_pairs = num_tokens * top_k
    num_slots = routing.tile_expert.numel()
    tiles = (routing.sorted_pairs, routing.tile_expert, routing.tile_row_start, routing.expert_offsets)
    expert_ids, expert_weights = routing.expert_ids, routing.expert_weights
    expert_parallel = local_experts != num_experts
    if expert_parallel:
        end = expert_start + local_experts
        tile_expert = routing.tile_expert
        mine = (tile_expert >= expert_start) & (tile_expert < end)
        # The matmul reads offsets[local + 1] as the end of local expert `local`'s rows: a view from the start.
        tiles = (
            routing.sorted_pairs,
            torch.where(mine, tile_expert - expert_start, -1).to(torch.int32),
            routing.tile_row_start,
            routing.expert_offsets[expert_start:],
        )
        local = (expert_ids >= expert_start) & (expert_ids < end)
        expert_ids = torch.where(local, expert_ids - expert_start, 0).to(torch.int32)
        expert_weights = torch.where(local, expert_weights, 0.0)
    launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    constants = {
        "TOP_K": top_k,
        "FP32_MATH": fp32_math,
        "ASM_DECODE": ASM_DECODE and not fp32_math,
        "SUBTILES": config.subtiles,
        "BLOCK_N": BLOCK_N,
        "BLOCK_K": BLOCK_K,
    }
    # bf16 activations between the matmuls on GPU (the MMA rounds them to bf16 anyway); fp32 in the interpreter.
    act = torch.empty(num_pairs, intermediate, dtype=torch.float32 if fp32_math else torch.bfloat16, device=x.device)
    matmul_kernel[(triton.cdiv(w1.n, BLOCK_N), num_slots, 1)](
        x,
        x.stride(0),
        x.stride(1),
        w1.values,
        w1.values.stride(0),
        w1.values.stride(1),
        w1.scales,
        w1.scales.stride(0),
        w1.scales.stride(1),
        w1.bias,
        w1.bias.stride(0),
        act,
        0,
        act.stride(0),
        act.stride(1),
        *tiles,
        w1.n,
        float(swiglu_limit),
        float(swiglu_alpha),
        K=hidden,
        GATHER_A=True,
        SWIGLU=True,
        WIDE_SCALES=w1.wide_scales,
        SPLIT_K=1,
        **constants,
        **launch,
    )

    split_k = split_k or split_k_for(intermediate, hidden, top_k)
    # Expert parallel: the partials of slots routed to other ranks are never written and must read as 0.
    alloc = torch.zeros if expert_parallel else torch.empty
    partials = alloc(split_k, num_pairs, hidden, dtype=torch.float32, device=x.device)
    matmul_kernel[(triton.cdiv(hidden, BLOCK_N), num_slots, split_k)](
        act,
        act.stride(0),
        act.stride(1),
        w2.values,
        w2.values.stride(0),
        w2.values.stride(1),
        w2.scales,
        w2.scales.stride(0),
        w2.scales.stride(1),
        w2.bias,
        w2.bias.stride(0),
        partials,
        partials.stride(0),
        partials.stride(1),
        partials.stride(2),
        *tiles,
        hidden,
        float(swiglu_limit),
        float(swiglu_alpha),
        K=intermediate,
        GATHER_A=False,
        SWIGLU=False,
        WIDE_SCALES=w2.wide_scales,
        SPLIT_K=split_k,
        **constants,
        **launch,
    )

    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=x.device)
    block_t = 16 if fp32_math else COMBINE_BLOCK_T  # the interpreter pays per program: bigger tiles there
    block_h = min(1024 // block_t, triton.next_power_of_2(hidden)) if not fp32_math else triton.next_power_of_2(hidden)
    combine_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))](
        partials,
        partials.stride(0),
        partials.stride(1),
        expert_ids,
        expert_weights,
        w2.bias,
        w2.bias.stride(0),
        out,
        out.stride(0),
        num_tokens,
        hidden,
        TOP_K=top_k,
        SPLIT_K=split_k,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return out


def moe_launches(num_tokens: int) -> int:
    """Kernel launches of one `fused_moe` call (routing, two matmuls, combine): for the launch budget."""
    return route_launches(num_tokens) + 3


# ----------------------------------------------------------------------------------------------------------
# Launch specs (benchmarks/static_report.py)
# ----------------------------------------------------------------------------------------------------------


def launch_specs(model, scenario) -> list:
    """The MoE's launches per layer in `scenario` (kernels.launch_spec types), at the batch's expected
    expert spread: d = E (1 - (1 - k/E)^T) distinct experts, max(d, P / block_m) row tiles."""
    from gptoss.kernels.launch_spec import LaunchSpec

    _kernels()  # binds the helper names for compilation
    tokens, layers = scenario.tokens, model.layers
    hidden, inter, experts, top_k = model.hidden, model.intermediate, model.experts, model.top_k
    config = pick_config(tokens)
    pairs = tokens * top_k
    distinct = experts * (1 - (1 - top_k / experts) ** tokens)
    tiles = max(round(distinct), triton.cdiv(pairs, config.block_m))
    block_e = triton.next_power_of_2(experts)
    index = {"tile_expert_ptr": "*i32", "tile_row_start_ptr": "*i32", "expert_offsets_ptr": "*i32"}
    route_ptrs = {
        "logits_ptr": "*bf16",
        "expert_ids_ptr": "*i32",
        "expert_weights_ptr": "*fp32",
        "hist_ptr": "*i32",
        "sorted_pairs_ptr": "*i32",
        "scratch_ptr": "*i32",
        **index,
    }
    num_blocks = triton.cdiv(tokens, ROUTE_BLOCK_T)
    block_p = triton.next_power_of_2(ROUTE_BLOCK_T * top_k)
    specs = [
        LaunchSpec(
            name="moe.route_topk" + (" (+group)" if num_blocks == 1 else ""),
            kernel=_JITTED[False][2],
            pointers=route_ptrs,
            constants={"E": experts, "TOP_K": top_k, "BLOCK_M": config.block_m, "BLOCK_T": ROUTE_BLOCK_T,
                       "BLOCK_E": block_e, "BLOCK_KK": triton.next_power_of_2(top_k), "BLOCK_P": block_p,
                       "GROUP": num_blocks == 1},
            num_warps=ROUTE_NUM_WARPS, num_stages=1, ctas=num_blocks, bytes_per_cta=ROUTE_BLOCK_T * experts * 2,
            total_bytes=tokens * experts * 2, launches_per_step=layers, aligned=("stride_lt",),
        )
    ]  # fmt: skip
    if num_blocks > 1:
        specs.append(
            LaunchSpec(
                name="moe.route_group",
                kernel=_JITTED[False][3],
                pointers={k: v for k, v in route_ptrs.items() if k not in ("logits_ptr", "expert_weights_ptr")},
                constants={"E": experts, "BLOCK_M": config.block_m, "BLOCK_E": block_e,
                           "PAIRS": ROUTE_BLOCK_T * top_k, "BLOCK_P": block_p},
                num_warps=ROUTE_NUM_WARPS, num_stages=1, ctas=num_blocks, bytes_per_cta=num_blocks * block_e * 4,
                total_bytes=num_blocks * num_blocks * block_e * 4, launches_per_step=layers,
            )
        )  # fmt: skip
    matmul_ptrs = {
        "w_ptr": "*u8", "s_ptr": "*u8", "bias_ptr": "*fp32", "sorted_pair_ptr": "*i32", **index,
        "swiglu_limit": "fp32", "swiglu_alpha": "fp32",
    }  # fmt: skip
    aligned = ("stride_am", "stride_we", "stride_wt", "stride_se", "stride_st", "stride_be", "stride_os", "stride_om")
    # stride_ak: the activations are contiguous along K, and Triton specialises an int argument equal to 1
    common = {"TOP_K": top_k, "FP32_MATH": False, "ASM_DECODE": ASM_DECODE, "stride_ak": 1, "WIDE_SCALES": False,
              "SUBTILES": config.subtiles,
              "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}  # fmt: skip
    loop_bytes = (BLOCK_N * BLOCK_K // 2 + BLOCK_N * BLOCK_K // 32) * LOOP_UNROLL.value
    matmuls = (("moe.matmul1 (gate_up+SwiGLU)", 2 * inter, hidden, True), ("moe.matmul2 (down)", hidden, inter, False))
    for name, n, k, swiglu in matmuls:
        split = 1 if swiglu else split_k_for(k, n, top_k)
        weight_bytes_per_expert = n * k // 2 + n * k // 32
        act_bytes = config.block_m * k * 2
        out_bytes = pairs * n * (2 if swiglu else 4 * split)
        specs.append(
            LaunchSpec(
                name=name,
                kernel=_JITTED[False][0],
                pointers={**matmul_ptrs, "a_ptr": "*bf16", "out_ptr": "*bf16" if swiglu else "*fp32"},
                constants={**common, "K": k, "GATHER_A": swiglu, "SWIGLU": swiglu, "SPLIT_K": split},
                num_warps=config.num_warps, num_stages=config.num_stages,
                ctas=triton.cdiv(n, BLOCK_N) * tiles * split,
                bytes_per_cta=(BLOCK_N * k // 2 + BLOCK_N * k // 32 + act_bytes) / split,
                total_bytes=distinct * weight_bytes_per_expert + pairs * k * 2 + out_bytes,
                launches_per_step=layers, aligned=aligned,
                loop_weight_bytes=loop_bytes, loop_weight_elements=BLOCK_N * BLOCK_K * LOOP_UNROLL.value,
            )
        )  # fmt: skip
    specs.append(
        LaunchSpec(
            name="moe.combine",
            kernel=_JITTED[False][1],
            pointers={"part_ptr": "*fp32", "expert_ids_ptr": "*i32", "expert_weights_ptr": "*fp32",
                      "bias_ptr": "*fp32", "out_ptr": "*bf16"},
            constants={"TOP_K": top_k, "SPLIT_K": split_k_for(inter, hidden, top_k), "BLOCK_T": COMBINE_BLOCK_T,
                       "BLOCK_H": 1024 // COMBINE_BLOCK_T},
            num_warps=4, num_stages=1,
            ctas=triton.cdiv(tokens, COMBINE_BLOCK_T) * triton.cdiv(hidden, 1024 // COMBINE_BLOCK_T),
            bytes_per_cta=COMBINE_BLOCK_T * top_k * 2 * (1024 // COMBINE_BLOCK_T) * 4,
            total_bytes=pairs * hidden * 4 * split_k_for(inter, hidden, top_k) + tokens * hidden * 2,
            launches_per_step=layers, aligned=("stride_ps", "stride_pm", "stride_be", "stride_om", "H"),
        )
    )  # fmt: skip
    return specs
