"""Batch-invariant dense linear layer in Triton: `out = x @ weight.T + bias`, fp32 accumulation.

Why it exists: cuBLAS picks its algorithm (tile shape, split-K, stream-K) from M, so `F.linear` gives a row
different bits depending on how many other rows share the call. The engine promises that a sequence's logits
do not depend on the batch (EngineArgs.batch_invariant), so the dense layers (q/k/v/o projections, router,
lm_head) use this kernel in that mode.

Why the result of a row does not depend on M (the number of rows):
- Every output element is one fp32 accumulator that runs over K in a fixed, in-order loop of fixed BLOCK_K
  steps (no split-K, no atomics, no stream-K), starting from 0; the bias is added in fp32 after the loop,
  then the value is cast once. Rows beyond M are masked to zero and never mix with real rows: an MMA output
  element depends only on its own row of x and its own column of the weight.
- The tile table (`gpu_config`) is keyed on M, N and the dtype, but every entry of one layer (N, dtype)
  shares BLOCK_K and the MMA instruction each warp group issues (on Hopper `wgmma m64 nW k16` with
  W = `MatmulConfig.instr_n` fixed per N): bigger batches get bigger CTA tiles by adding warp groups along
  M or N, never by changing the instruction or the K steps. tests/test_matmul_kernel.py checks the
  instruction shape of every entry in the sm_90 TTGIR and, on a GPU, the bits across the table.
- M is not specialised on (`do_not_specialize`): M == 1 or M % 16 == 0 compile the same kernel.

Decode (M <= 256) is bandwidth-bound on the weight: the grid walks the N tiles with the (few) M tiles of one
N tile next to each other, so a weight tile is read from DRAM once and served from L2 to the other M tiles,
and BLOCK_N shrinks for small N so that enough CTAs stream the weight (q_proj N=4096 -> 128 tiles).

The kernel is a plain function turned into a Triton kernel lazily (as in kernels/moe.py) so that
`TRITON_INTERPRET` is read at launch time. In the interpreter bf16 arithmetic is broken, so the `FP32_MATH`
constexpr upcasts the operands there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from gptoss.kernels.moe import interpreting

# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------


def _linear_kernel(
    x_ptr,
    stride_xm,
    stride_xk,  # x [M, K]
    w_ptr,
    stride_wn,
    stride_wk,  # weight [N, K]
    bias_ptr,  # bias [N] (any float dtype); unused when not HAS_BIAS
    out_ptr,
    stride_om,
    stride_on,  # out [M, N]
    partial_ptr,  # SPLIT_CTAS: fp32 [SPLIT_K, M, N] workspace, one partial sum per K split
    counter_ptr,  # SPLIT_CTAS: int32 [tiles], zero between launches: splits of a tile done so far
    M,  # rows: not specialised on (see `_kernel`), so no M gets its own compiled variant
    N,
    K: tl.constexpr,  # a layer constant: the K loop has a known trip count, and no K mask when it divides
    HAS_BIAS: tl.constexpr,
    FP32_MATH: tl.constexpr,  # interpreter: bf16 arithmetic is broken there, so upcast the operands
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands (no TF32); ignored for 16-bit operands
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,  # K splits: a function of the layer (N, K, dtype) only, never of M
    K_PER_SPLIT: tl.constexpr,  # K elements per split, a multiple of BLOCK_K (the last split may be shorter)
    SPLIT_CTAS: tl.constexpr,  # one CTA per (tile, split) + last-CTA reduction, else the splits in one CTA
):
    # Tile order: groups of GROUP_M row tiles; inside a group the row tiles of one N tile are consecutive
    # programs, so they run together and share the weight tile through L2 (at decode, M <= GROUP_M * BLOCK_M,
    # the whole weight is read from DRAM once); over groups, x stays L2-resident for large M.
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    if SPLIT_CTAS:  # split-major grid: programs [s * tiles, (s + 1) * tiles) compute split s of every tile
        tiles = num_m * num_n
        first_split = pid // tiles
        pid = pid % tiles
        LOCAL_SPLITS: tl.constexpr = 1
    else:
        first_split = 0
        LOCAL_SPLITS: tl.constexpr = SPLIT_K
    tiles_per_group = GROUP_M * num_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # int64 row offsets: lm_head's weight has 201088 x 2880 = 5.8e8 elements, logits M x 201088 pass 2^31
    # at M > 10k.
    x_base = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_base = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]

    # The only reductions, both in a fixed order: inside a split one fp32 accumulator per element runs over
    # the split's K range in order, BLOCK_K at a time (the MMA chains its k16 steps into `acc`); the splits'
    # sums are then added in split order, p0 + p1 + ... (here, or by the last CTA below: the same fp32 adds
    # in the same order, so a row has the same bits whichever way its batch size picks). Masked lanes load 0
    # and add exact zeros.
    # Constant trip counts (and no tensor loop bounds, which triton 3.6's interpreter rejects): this program's
    # splits, then each split's BLOCK_K steps; K is masked only where the splits overrun it.
    total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for i in range(LOCAL_SPLITS):
        k_lo = (first_split + i) * K_PER_SPLIT
        x_ptrs = x_base + k_lo * stride_xk
        w_ptrs = w_base + k_lo * stride_wk
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for step in range(K_PER_SPLIT // BLOCK_K):
            if SPLIT_K * K_PER_SPLIT == K:
                a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
                b = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
            else:
                k_left = K - k_lo - step * BLOCK_K
                a = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(w_ptrs, mask=n_mask[None, :] & (offs_k[:, None] < k_left), other=0.0)
            if FP32_MATH:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
            else:
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        # The first split is taken as is (0.0 + -0.0 would flip a sign bit).
        total = acc if LOCAL_SPLITS == 1 else tl.where(i == 0, acc, total + acc)

    write = True
    if SPLIT_CTAS:
        # Each split CTA writes its partial; the last of a tile's splits to finish (a counter per tile, taken
        # with acq_rel after a CTA barrier: every thread's partial is stored before the release) sums all of
        # them in split order from L2 (.cg: another SM wrote them, this SM's L1 may hold an old launch's lines)
        # and writes the output. It then re-arms the counter, so CUDA-graph replays start from 0.
        mn_mask = m_mask[:, None] & n_mask[None, :]
        # int32 offsets: the launcher splits across CTAs only while SPLIT_K * M * N < 2^31.
        tile_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + first_split * M * N + tile_offs, total, mask=mn_mask)
        tl.debug_barrier()
        tile = pid_m * num_n + pid_n
        done = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
        write = done == SPLIT_K - 1
        if write:
            total = tl.load(partial_ptr + tile_offs, mask=mn_mask, other=0.0, cache_modifier=".cg")
            for split in range(1, SPLIT_K):
                total += tl.load(partial_ptr + split * M * N + tile_offs, mask=mn_mask, other=0.0, cache_modifier=".cg")
            tl.store(counter_ptr + tile, 0)

    if write:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
            total = total + bias.to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_JITTED: dict[bool, object] = {}


def _kernel() -> object:
    """The kernel for the current mode; `triton.jit` picks interpreter vs compiler from TRITON_INTERPRET."""
    mode = interpreting()
    if mode not in _JITTED:
        _JITTED[mode] = triton.jit(_linear_kernel, do_not_specialize=["M"])
    return _JITTED[mode]


# ----------------------------------------------------------------------------------------------------------
# Tile table
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulConfig:
    """One launch shape. `instr_n` is the N width of the MMA each Hopper warp group issues (wgmma
    m64 n<instr_n> k16): a CTA tile is (block_m / 64) x (block_n / instr_n) warp groups, so
    num_warps = 4 * (block_m / 64) * (block_n / instr_n). fp32 operands use FMA dots (no MMA), whose
    per-element order is the K loop whatever the tile."""

    block_m: int
    block_n: int
    block_k: int
    instr_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    # K splits (`split_k_for`: a function of the layer's N and dtype, the same in every row bucket) and
    # whether each split gets its own CTA (decode: more CTAs stream the weight) or one CTA runs them all in
    # turn (bigger batches: enough tiles already, no workspace). Both sum the splits in the same order.
    split_k: int = 1
    split_ctas: bool = False


# Shared memory budget for the operand stages of one CTA (H100: 227 KiB per block).
_SMEM_BUDGET = 200 * 1024


def instr_n_for(n: int) -> int:
    """The MMA width for a layer of N outputs: a function of N only, so one per layer. Narrow for small N so
    that a decode step (one row tile) still has ~100+ CTAs streaming the weight: lm_head (N = 201088) 128 ->
    1571 tiles; q_proj (4096) 32 -> 128; o_proj (2880) 32 -> 90; k/v_proj (512) 16 -> 32; router (128) 16 -> 8.
    """
    if n >= 16384:
        return 128
    if n >= 2048:
        return 32
    return 16


def split_k_for(n: int, block_n: int, target_ctas: int = 132) -> int:
    """K splits for a layer of N outputs whose decode tiles are `block_n` wide: enough that one row tile
    launches >= `target_ctas` CTAs (an H100 has 132 SMs). A function of the layer only, never of the batch:
    o_proj (N = 2880, 90 tiles) 2 -> 180 CTAs; router (128, 8 tiles) 17 (at K = 2880 and BLOCK_K = 256
    capped at the 12 K blocks, `k_per_split`: 96 CTAs); q/k/v (5120, 160 tiles) and lm_head 1."""
    return triton.cdiv(target_ctas, triton.cdiv(n, block_n))


def k_per_split(k: int, block_k: int, split_k: int) -> int:
    """K elements each split covers: whole BLOCK_K steps, so every split but the last runs unmasked. The
    splits actually launched are `cdiv(k, k_per_split(...))` (<= split_k: never an empty split)."""
    return triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k


def pick_config(num_rows: int, n: int, dtype: torch.dtype = torch.bfloat16) -> MatmulConfig:
    """Tile sizes for `num_rows` x `n` outputs: `gpu_config`, or one fixed config in the interpreter."""
    if not interpreting():
        return gpu_config(num_rows, n, dtype)
    # Splits even in the interpreter (fewer: few programs run fastest there), so CPU tests run that path.
    c = _INTERPRETER_CONFIG
    split = split_k_for(n, c.block_n, target_ctas=4)
    return replace(c, split_k=split, split_ctas=split > 1 and num_rows <= c.block_m)


def gpu_config(num_rows: int, n: int, dtype: torch.dtype = torch.bfloat16) -> MatmulConfig:
    """The GPU table. BLOCK_K and the MMA width depend on (N, dtype) only; the row
    count picks how many warp groups a CTA has: one for decode batches (M <= 64: the most CTAs), 64 x 128
    tiles up to 256 rows (x is re-read from L2 once per N tile, so wider N tiles cut that traffic 4x), then
    128 x 128 tiles for prefill (64-wide N for the 16-wide MMA, to stay at 32 warps)."""
    instr = instr_n_for(n)
    fp32 = dtype == torch.float32
    # K step: 256 B of each weight row per stage (512 B for the narrowest layers): k/v_proj and the
    # router have too few N tiles to fill the GPU, so each CTA needs more bytes in flight to stream fast.
    block_k = (64 if fp32 else 128) * (2 if instr == 16 else 1)
    split = split_k_for(n, instr)  # from the decode tile (block_n = instr), so the same in every bucket
    if num_rows <= 64:
        block_m, block_n = 64, instr
    # fp32 (tests, debugging): 128-row FMA tiles would spill; so would 128-row tiles of split layers, which
    # hold two accumulators (the splits' running sum and the current split's) in 64 registers a thread.
    elif num_rows <= 256 or fp32 or split > 1:
        block_m, block_n = 64, max(instr, min(128, 4 * instr))
    else:
        block_m, block_n = 128, max(instr, min(128, 4 * instr))
    warps = 4 * (block_m // 64) * (block_n // instr)
    stage_bytes = (block_m + block_n) * block_k * (4 if fp32 else 2)
    stages = max(2, min(4, _SMEM_BUDGET // stage_bytes))
    return MatmulConfig(
        block_m=block_m, block_n=block_n, block_k=block_k, instr_n=instr, num_warps=warps, num_stages=stages,
        split_k=split, split_ctas=split > 1 and num_rows <= 64,
    )  # fmt: skip


def invariant_configs(n: int, dtype: torch.dtype = torch.bfloat16) -> list[MatmulConfig]:
    """Every GPU config a layer of N outputs can get (one per row-count bucket): what must agree bit for bit."""
    return list(dict.fromkeys(gpu_config(rows, n, dtype) for rows in (1, 65, 257)))


def launch_specs(model, scenario) -> list:
    """The dense GEMMs of one step (kernels.launch_spec types), for benchmarks/static_report.py: per layer the
    fused q/k/v projection (N = (Hq + 2 Hkv) * D = 5120 at 120b), o_proj and the router; per step the lm_head
    (fp32 logits; the engine computes them for the sampled rows only, one per sequence at decode)."""
    from gptoss.kernels.launch_spec import LaunchSpec

    h, d = model.hidden, model.head_dim
    layers = [
        ("dense.qkv_proj", (model.q_heads + 2 * model.kv_heads) * d, h, True, model.layers),
        ("dense.o_proj", h, model.q_heads * d, True, model.layers),
        ("dense.router", model.experts, h, True, model.layers),
        ("dense.lm_head", model.vocab, h, False, 1),
    ]
    specs = []
    for name, n, k, bias, count in layers:
        rows = scenario.tokens if scenario.decode or name != "dense.lm_head" else 1
        c = gpu_config(rows, n)
        step = k_per_split(k, c.block_k, c.split_k)
        splits = triton.cdiv(k, step)
        split_ctas = c.split_ctas and splits > 1
        ctas = triton.cdiv(rows, c.block_m) * triton.cdiv(n, c.block_n) * (splits if split_ctas else 1)
        k_per_cta = step if split_ctas else k
        # Split across CTAs: each split's fp32 partials are written once and read back once (from L2).
        workspace = 2 * splits * rows * n * 4 if split_ctas else 0
        specs.append(
            LaunchSpec(
                name=name,
                kernel=_linear_kernel,
                pointers={**dict.fromkeys(("x_ptr", "w_ptr", "bias_ptr"), "*bf16"),
                          "out_ptr": "*bf16" if bias else "*fp32", "partial_ptr": "*fp32", "counter_ptr": "*i32"},
                # Unit strides of contiguous tensors are specialised to 1 at launch.
                constants={"stride_xk": 1, "stride_wk": 1, "stride_on": 1, "K": k, "HAS_BIAS": bias,
                           "FP32_MATH": False, "DOT_PRECISION": "tf32", "BLOCK_M": c.block_m, "BLOCK_N": c.block_n,
                           "BLOCK_K": c.block_k, "GROUP_M": c.group_m, "SPLIT_K": splits, "K_PER_SPLIT": step,
                           "SPLIT_CTAS": split_ctas},
                num_warps=c.num_warps, num_stages=c.num_stages, ctas=ctas,
                bytes_per_cta=(c.block_n + c.block_m) * k_per_cta * 2,
                total_bytes=n * k * 2 + rows * (k + n) * 2 + workspace,
                launches_per_step=count, aligned=("stride_xm", "stride_wn", "stride_om", "N"),
            )
        )  # fmt: skip
    return specs


# The interpreter runs one Python program per tile: few, big tiles are fastest there.
_INTERPRETER_CONFIG = MatmulConfig(block_m=32, block_n=64, block_k=32, instr_n=64, num_warps=4, num_stages=1)


# ----------------------------------------------------------------------------------------------------------
# Launcher and reference
# ----------------------------------------------------------------------------------------------------------

_MMA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: MatmulConfig | None = None,
) -> torch.Tensor:
    """`x @ weight.T + bias` with fp32 accumulation, bit-identical per row for any number of rows.

    x: `[M, K]`, weight: `[N, K]` (same dtype: bf16, fp16 or fp32), bias: `[N]` (any float dtype, added in
    fp32) or None. Returns `[M, N]` in `out_dtype` (default x.dtype), rounded once from fp32. fp32 operands
    use IEEE fp32 dots (no TF32). `config` overrides the tile table (tests, benchmarks).
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [M, K] and [N, K]")
    if x.dtype != weight.dtype or x.dtype not in _MMA_DTYPES:
        raise TypeError(f"x {x.dtype} and weight {weight.dtype} must share one of {_MMA_DTYPES}")
    num_rows, k = x.shape
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias {tuple(bias.shape)} {bias.dtype} must be a float [{n}]")
    if not x.is_cuda and not interpreting():
        raise RuntimeError(
            "gptoss.kernels.matmul.linear needs CUDA tensors (or TRITON_INTERPRET=1); use F.linear on CPU"
        )
    out_dtype = out_dtype or x.dtype
    out = torch.empty(num_rows, n, dtype=out_dtype, device=x.device)
    if num_rows == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.float().expand(num_rows, n) if bias is not None else torch.zeros_like(out))

    config = config or pick_config(num_rows, n, x.dtype)
    step = k_per_split(k, config.block_k, config.split_k)
    splits = triton.cdiv(k, step)
    tiles = triton.cdiv(num_rows, config.block_m) * triton.cdiv(n, config.block_n)
    # Across CTAs only where the kernel's int32 workspace offsets hold; in one CTA the bits are the same.
    split_ctas = config.split_ctas and splits > 1 and splits * num_rows * n < 2**31
    partial, counters = out, out  # unused unless split_ctas
    if split_ctas:
        partial = torch.empty(splits, num_rows, n, dtype=torch.float32, device=x.device)
        counters = split_counters(x.device, tiles)
    _kernel()[(tiles * splits if split_ctas else tiles,)](
        x, x.stride(0), x.stride(1),
        weight, weight.stride(0), weight.stride(1),
        bias if bias is not None else out,
        out, out.stride(0), out.stride(1),
        partial, counters,
        num_rows, n,
        K=k, HAS_BIAS=bias is not None, FP32_MATH=interpreting(),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        SPLIT_K=splits, K_PER_SPLIT=step, SPLIT_CTAS=split_ctas,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


# Per device, the counters of the last-CTA reductions (split-K tiles here, decode attention's splits in
# kernels/attention.py): zeroed once, re-armed to 0 by the CTA that takes the last ticket, so a launch (or a
# CUDA-graph replay) needs no memset. Launches on one stream use them in turn (the engine runs one a device).
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """At least `tiles` int32 counters on `device`, all 0 (the kernels leave them so)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < tiles:
        counters = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Plain-torch oracle of `linear`: fp32 math (`[M, K]` x `[N, K]`^T + `[N]`), cast to out_dtype (x.dtype)."""
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or x.dtype)
