"""Benchmark the Triton paged attention (kernels/attention.py) at gpt-oss-120b shapes against torch SDPA.

    python -m benchmarks.bench_attention            # GPU: 64 query / 8 KV heads, head dim 64, bf16, block 16
    python -m benchmarks.bench_attention --tiny     # CPU interpreter, tiny sizes (also the CI smoke test)

Decode: batch {1, 8, 64, 256} x context {1k, 8k, 32k, 128k}, on full layers and on sliding-window layers
(window 128; only the blocks inside the window are allocated, earlier block-table entries are -1, as the
engine frees them). Combos whose cache does not fit in free GPU memory are skipped, and the baseline where its
gathered copy does not fit beside the cache. Prefill: one fresh sequence of {512, 4k, 32k} tokens, full and windowed.

Timing: CUDA-graph replays (`triton.testing.do_bench_cudagraph`, median), so host launch overhead is not
counted, as in the engine's decode graphs. Decode calls walk through several copies of the KV cache (enough
for 4x the L2 size, at least 4 when one copy fits in L2; the `copies` column), so a call never reads what
an earlier call left in L2.

For each point: median time, KV bytes read (each needed key and value once) as GB/s against the measured copy
bandwidth, attention FLOPs (QK and PV, causal/windowed key counts) as TFLOP/s against the measured bf16
matmul rate, and % of the roofline. The baseline is `torch.nn.functional.scaled_dot_product_attention` on
an already gathered contiguous cache (gather not timed); it has NO sinks (SDPA cannot add a sink column to
the denominator), and its windowed prefill uses an explicit boolean mask (skipped above 8k tokens).
Writes `bench_attention.json`, `bench_attention_decode.png` and `bench_attention_prefill.png` under --out.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from gptoss.benchmarks.common import (
    format_table,
    graph_time,
    measure_ceilings,
    pick_device,
    plot_series,
    roofline,
    rotation_copies,
    write_json,
)

REAL_SHAPE = {"num_q_heads": 64, "num_kv_heads": 8, "head_dim": 64, "window": 128, "block_size": 16}
# Tiny keeps gpt-oss's head structure (GQA 8) with a small window so windowed runs free blocks.
TINY_SHAPE = {"num_q_heads": 16, "num_kv_heads": 2, "head_dim": 64, "window": 24, "block_size": 16}
REAL_SIZES = {"batches": [1, 8, 64, 256], "contexts": [1024, 8192, 32768, 131072], "prefill": [512, 4096, 32768]}
TINY_SIZES = {"batches": [1, 2], "contexts": [40, 300], "prefill": [16, 40]}
MASKED_BASELINE_MAX_TOKENS = 8192


def _import_attention(interpret: bool):
    """gptoss.kernels.attention decorated for the interpreter or the GPU (Triton decides at import time)."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import gptoss.kernels.attention as attention

    if attention._is_interpreted(attention._prefill_kernel) != interpret:
        attention = importlib.reload(attention)
    return attention


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.85)
    return 1 << 30


def make_paged_cache(
    seq_lens: list[int], first_keys: list[int], shape: dict, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches holding, for each sequence, the blocks from `first_keys[s]`'s block to its end, at
    shuffled block ids; earlier block-table entries are -1. Returns (k_cache, v_cache, block_tables)."""
    bs = shape["block_size"]
    first_blocks = [f // bs for f in first_keys]
    last_blocks = [-(-n // bs) for n in seq_lens]
    num_blocks = sum(last - first for first, last in zip(first_blocks, last_blocks, strict=True))
    gen = torch.Generator(device=device).manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    table = torch.full((len(seq_lens), max(last_blocks)), -1, dtype=torch.int32, device=device)
    used = 0
    for s, (first, last) in enumerate(zip(first_blocks, last_blocks, strict=True)):
        table[s, first:last] = perm[used : used + last - first]
        used += last - first
    cache_shape = (num_blocks, shape["num_kv_heads"], bs, shape["head_dim"])
    k_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=device, dtype=dtype)
    return k_cache, v_cache, table


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kwargs) -> torch.Tensor:
    """SDPA with GQA ([B, H, T, D] layouts, fewer KV heads)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kwargs)


def _time_baseline(
    fn, point: dict, kv_bytes: int, flops: int, device: torch.device, ceilings, warmup: int, iters: int, calls: int = 1
) -> list[dict]:
    """Time the SDPA baseline (`fn` makes `calls` calls); [] (with a note) when the backend torch picks runs out
    of memory."""
    try:
        seconds = graph_time(fn, device, warmup=warmup, iters=iters) / calls
    except torch.cuda.OutOfMemoryError:
        print(f"baseline skipped (out of memory): {point}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return []
    return [{"impl": "torch_sdpa_nosink", **point, "ms": seconds * 1e3, **roofline(seconds, kv_bytes, flops, ceilings)}]


def bench_decode(
    attention,
    shape: dict,
    batch: int,
    context: int,
    windowed: bool,
    device: torch.device,
    dtype: torch.dtype,
    ceilings,
    warmup: int,
    iters: int,
    baseline: bool,
) -> list[dict]:
    hq, hkv, d, window = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"], shape["window"]
    keys = min(context, window) if windowed else context
    first_key = context - keys
    kv_bytes = 2 * batch * keys * hkv * d * dtype.itemsize
    allocated = (
        2
        * batch
        * (-(-context // shape["block_size"]) - first_key // shape["block_size"])
        * shape["block_size"]
        * hkv
        * d
        * dtype.itemsize
    )
    free = _free_bytes(device)
    layer = "sliding" if windowed else "full"
    point = {"layer": layer, "batch": batch, "context": context, "KV_MB": kv_bytes / 1e6}
    if allocated > free:
        print(
            f"skip decode {layer} batch {batch} context {context}: {allocated / 2**30:.1f} GiB of KV "
            f"> {free / 2**30:.1f} GiB free"
        )
        return []
    # Several copies of the cache (own block ids and tables), walked in turn by each timed call, so that the
    # KV read of a call never comes from L2 where an earlier call left it (H100/H200: 50 MB L2).
    copies = [
        make_paged_cache([context] * batch, [first_key] * batch, shape, dtype, device, seed=batch + context + i)
        for i in range(rotation_copies(allocated, device, free - allocated, tiny=device.type != "cuda"))
    ]
    point["copies"] = len(copies)
    gen = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(batch, hq, d, generator=gen, device=device, dtype=dtype)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    sinks = torch.randn(hq, generator=gen, device=device)
    scale = d**-0.5
    sw = window if windowed else None
    flops = 4 * batch * hq * keys * d
    rows = []
    for name, invariant in (("triton", True), ("triton_fast", False)):

        def run(invariant: bool = invariant) -> None:
            for k_cache, v_cache, table in copies:
                attention.paged_attention(query, k_cache, v_cache, table, qsl, seq_lens, sinks, scale, sw,
                                          invariant, max_query_len=1, max_seq_len=context)  # fmt: skip

        seconds = graph_time(run, device, warmup=warmup, iters=iters) / len(copies)
        rows.append(dict(impl=name, **point, ms=seconds * 1e3, **roofline(seconds, kv_bytes, flops, ceilings)))
    # The gathered copies (K and V) plus one reshape temporary must fit beside the caches.
    if baseline and (len(copies) + 1) * allocated + 2 * kv_bytes * len(copies) <= free:
        # Gather each sequence's keys into [B, Hkv, keys, D] (not timed): the best case for a dense kernel.
        skip = first_key % shape["block_size"]

        def gather(cache: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            blocks = table[:, first_key // shape["block_size"] :].long()
            return cache[blocks].transpose(1, 2).reshape(batch, hkv, -1, d)[:, :, skip : skip + keys]

        gathered = [(gather(k, t), gather(v, t)) for k, v, t in copies]
        q = query[:, :, None, :]

        def run_sdpa() -> None:
            for k, v in gathered:
                _sdpa(q, k, v, scale)

        rows += _time_baseline(run_sdpa, point, kv_bytes, flops, device, ceilings, warmup, iters, len(copies))
    return rows


def bench_prefill(
    attention,
    shape: dict,
    tokens: int,
    windowed: bool,
    device: torch.device,
    dtype: torch.dtype,
    ceilings,
    warmup: int,
    iters: int,
    baseline: bool,
) -> list[dict]:
    hq, hkv, d, window = shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"], shape["window"]
    k_cache, v_cache, table = make_paged_cache([tokens], [0], shape, dtype, device, seed=tokens)
    gen = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(tokens, hq, d, generator=gen, device=device, dtype=dtype)
    qsl = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([tokens], dtype=torch.int32, device=device)
    sinks = torch.randn(hq, generator=gen, device=device)
    scale = d**-0.5
    sw = window if windowed else None
    visible = [min(i + 1, window) if windowed else i + 1 for i in range(tokens)]
    flops = 4 * hq * d * sum(visible)
    kv_bytes = 2 * tokens * hkv * d * dtype.itemsize
    layer = "sliding" if windowed else "full"
    point = {"layer": layer, "batch": 1, "context": tokens, "KV_MB": kv_bytes / 1e6}
    rows = []

    def run() -> torch.Tensor:
        return attention.paged_attention(query, k_cache, v_cache, table, qsl, seq_lens, sinks, scale, sw,
                                         max_query_len=tokens, max_seq_len=tokens)  # fmt: skip

    seconds = graph_time(run, device, warmup=warmup, iters=iters)
    rows.append(dict(impl="triton", **point, ms=seconds * 1e3, **roofline(seconds, kv_bytes, flops, ceilings)))
    if baseline and (not windowed or tokens <= MASKED_BASELINE_MAX_TOKENS):
        blocks = table[0].long()
        k = k_cache[blocks].permute(1, 0, 2, 3).reshape(hkv, -1, d)[None, :, :tokens].contiguous()
        v = v_cache[blocks].permute(1, 0, 2, 3).reshape(hkv, -1, d)[None, :, :tokens].contiguous()
        q = query.transpose(0, 1)[None].contiguous()
        if windowed:
            pos = torch.arange(tokens, device=device)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
            fn = lambda: _sdpa(q, k, v, scale, attn_mask=mask)  # noqa: E731
        else:
            fn = lambda: _sdpa(q, k, v, scale, is_causal=True)  # noqa: E731
        rows += _time_baseline(fn, point, kv_bytes, flops, device, ceilings, warmup, iters)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes in the Triton interpreter (auto on CPU)")
    parser.add_argument("--batches", type=int, nargs="+", help="decode batch sizes")
    parser.add_argument("--contexts", type=int, nargs="+", help="decode context lengths")
    parser.add_argument("--prefill", type=int, nargs="+", help="prefill token counts")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per point (default 20, tiny 1)")
    parser.add_argument("--no-baseline", action="store_true", help="skip torch SDPA")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)

    device = pick_device()
    tiny = args.tiny or device.type != "cuda"
    attention = _import_attention(interpret=device.type != "cuda")
    shape = TINY_SHAPE if tiny else REAL_SHAPE
    sizes = TINY_SIZES if tiny else REAL_SIZES
    batches, contexts = args.batches or sizes["batches"], args.contexts or sizes["contexts"]
    prefill = args.prefill or sizes["prefill"]
    iters = args.iters or (1 if tiny else 20)
    warmup = 0 if tiny else 3
    dtype = torch.bfloat16
    ceilings = measure_ceilings(device)
    common = {
        "device": device,
        "dtype": dtype,
        "ceilings": ceilings,
        "warmup": warmup,
        "iters": iters,
        "baseline": not args.no_baseline,
    }

    decode_rows, prefill_rows = [], []
    for windowed in (False, True):
        for batch in batches:
            for context in contexts:
                decode_rows += bench_decode(attention, shape, batch, context, windowed, **common)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the next point may need one more very large cache
        for tokens in prefill:
            prefill_rows += bench_prefill(attention, shape, tokens, windowed, **common)

    columns = [
        "impl",
        "layer",
        "batch",
        "context",
        "KV_MB",
        "copies",
        "ms",
        "GB/s",
        "% copy bw",
        "TFLOP/s",
        "% matmul",
        "% roofline",
    ]
    print(
        f"device: {ceilings.device}; copy {ceilings.copy_bytes_per_s / 1e9:.1f} GB/s; "
        f"{ceilings.matmul_dtype} matmul {ceilings.matmul_flops_per_s / 1e12:.1f} TFLOP/s; shape {shape}"
        + ("  [tiny: Triton interpreter, timings are not meaningful]" if tiny else "")
    )
    print("decode (one query per sequence; torch_sdpa_nosink: contiguous cache, no sinks)")
    print(format_table(decode_rows, columns))
    print("prefill (one fresh sequence; 'context' = tokens)")
    print(format_table(prefill_rows, columns))
    results = {
        "ceilings": ceilings.as_dict(),
        "shape": shape,
        "tiny": tiny,
        "dtype": str(dtype),
        "decode": decode_rows,
        "prefill": prefill_rows,
        "baseline_note": "torch SDPA on a pre-gathered contiguous cache, no sinks",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_attention.json", results)
    series = {}
    for row in decode_rows:
        if row["impl"] in ("triton", "torch_sdpa_nosink") and row["layer"] == "full":
            xs, ys = series.setdefault(f"{row['impl']} batch {row['batch']}", ([], []))
            xs.append(row["context"])
            ys.append(row["GB/s"])
    if series:
        plot_series(args.out / "bench_attention_decode.png", series, xlabel="context (tokens)",
                    ylabel="KV read GB/s", title=f"paged decode, full layers ({ceilings.device}); "
                    f"copy {ceilings.copy_bytes_per_s / 1e9:.0f} GB/s")  # fmt: skip
    series = {}
    for row in prefill_rows:
        xs, ys = series.setdefault(f"{row['impl']} {row['layer']}", ([], []))
        xs.append(row["context"])
        ys.append(row["TFLOP/s"])
    if series:
        plot_series(args.out / "bench_attention_prefill.png", series, xlabel="prompt tokens", ylabel="TFLOP/s",
                    title=f"paged prefill ({ceilings.device}); matmul "
                    f"{ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s")  # fmt: skip
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
