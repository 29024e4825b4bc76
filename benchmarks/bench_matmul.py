"""Benchmark the batch-invariant Triton linear (kernels/matmul.py) against torch (cuBLAS) at gpt-oss-120b's
dense layer shapes.

    python -m benchmarks.bench_matmul                   # GPU: q/k/v/o_proj, router, lm_head at M in 1..1024
    python -m benchmarks.bench_matmul --tiny            # CPU interpreter, tiny shapes (also the CI smoke test)

For each layer and row count M: median time of `kernels.matmul.linear` and of `F.linear`, the bytes a call
must move (weight + bias + x + out, each once), achieved GB/s against the measured copy bandwidth, TFLOP/s
against the measured bf16 matmul rate, % of the roofline max(bytes / bandwidth, flops / matmul rate), and
the Triton/torch time ratio. On GPU each timed sample replays a CUDA graph of many calls (as the engine's
decode steps do; --no-graphs times eager launches), and the calls cycle through copies of the weight that
together overflow L2, as a model step's layers do. At decode sizes the weight dominates the bytes, so GB/s
is the number to watch.
Writes `bench_matmul.json` and `bench_matmul.png` (% roofline per layer) under --out.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from gptoss.benchmarks.common import (
    format_table,
    measure_ceilings,
    median_time,
    pick_device,
    plot_series,
    roofline,
    write_json,
)

# (layer, N, K, bias, output dtype): the dense layers of gpt-oss-120b (k_proj and v_proj share a shape).
REAL_LAYERS = [
    ("q_proj", 4096, 2880, True, "bf16"),
    ("kv_proj", 512, 2880, True, "bf16"),
    ("o_proj", 2880, 4096, True, "bf16"),
    ("router", 128, 2880, True, "bf16"),
    ("lm_head", 201088, 2880, False, "fp32"),
]
TINY_LAYERS = [("q_proj", 96, 64, True, "bf16"), ("lm_head", 160, 64, False, "fp32")]
REAL_ROWS = [1, 8, 64, 256, 1024]
TINY_ROWS = [1, 8]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
L2_FLUSH_BYTES = 256 << 20


def call_bytes(rows: int, n: int, k: int, bias: bool, dtype: torch.dtype, out_dtype: torch.dtype) -> int:
    """Bytes one call must read and write at least: weight, bias, x and the output once each."""
    size, out_size = torch.empty((), dtype=dtype).element_size(), torch.empty((), dtype=out_dtype).element_size()
    return (n * k + (n if bias else 0) + rows * k) * size + rows * n * out_size


def make_calls(
    triton_linear: Callable,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> dict[str, Callable[[], torch.Tensor]]:
    """One call of each implementation, each call on the next weight copy."""
    cycle = itertools.cycle(weights)
    return {
        "triton": lambda: triton_linear(x, next(cycle), bias, out_dtype=out_dtype),
        # The engine's non-invariant path: cuBLAS, then a cast for the fp32 logits.
        "torch": lambda: torch.nn.functional.linear(x, next(cycle), bias).to(out_dtype),
    }


def batched(fn: Callable[[], object], reps: int, device: torch.device, graphs: bool) -> tuple[Callable, int]:
    """`fn` run `reps` times as one callable, and `reps`. On GPU (unless `graphs` is off) the calls are captured
    in one CUDA graph, as the engine runs its decode steps, so Python launch overhead (tens of microseconds for
    a Triton launch, more than a small layer's kernel time) is not what gets measured."""
    if device.type != "cuda" or not graphs:
        return fn, 1
    fn()  # compile / pick the cuBLAS algorithm outside the capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph.replay, reps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in the Triton interpreter (auto on CPU)")
    parser.add_argument("--rows", type=int, nargs="+", help="row counts M (default: 1 8 64 256 1024, tiny: 1 8)")
    parser.add_argument("--layers", nargs="+", help="subset of layer names (default: all)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per point (default 50, tiny 1)")
    parser.add_argument("--no-graphs", action="store_true", help="time eager launches instead of CUDA graphs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)

    device = pick_device()
    tiny = args.tiny or device.type != "cuda"
    if tiny and device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # read by kernels.matmul at launch time
    from gptoss.kernels.matmul import linear, pick_config

    layers = [spec for spec in (TINY_LAYERS if tiny else REAL_LAYERS) if not args.layers or spec[0] in args.layers]
    rows_list = args.rows or (TINY_ROWS if tiny else REAL_ROWS)
    iters = args.iters or (1 if tiny else 50)
    warmup = 0 if tiny else 5
    dtype = torch.bfloat16

    ceilings = measure_ceilings(device)
    rows_out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for layer, n, k, has_bias, out_name in layers:
        out_dtype = DTYPES[out_name]
        # Enough copies of the weight to overflow L2 (50 MB on H100) when cycled through: in a real step each
        # layer's weight comes from DRAM, so a benchmark that re-reads one L2-resident copy would flatter it.
        copies = 1 if tiny else max(1, -(-L2_FLUSH_BYTES // (n * k * dtype.itemsize)))
        weights = [(torch.randn(n, k, generator=gen, device=device) / k**0.5).to(dtype) for _ in range(copies)]
        bias = torch.randn(n, generator=gen, device=device).to(dtype) if has_bias else None
        for rows in rows_list:
            x = torch.randn(rows, k, generator=gen, device=device).to(dtype)
            num_bytes = call_bytes(rows, n, k, has_bias, dtype, out_dtype)
            flops = 2 * rows * n * k
            times = {}
            for impl, call in make_calls(linear, x, weights, bias, out_dtype).items():
                fn, reps = batched(call, min(max(copies, 8), 512), device, graphs=not args.no_graphs)
                times[impl] = median_time(fn, device, warmup=warmup, iters=iters) / reps
                del fn
                row = dict(
                    layer=layer,
                    N=n,
                    K=k,
                    rows=rows,
                    impl=impl,
                    ms=times[impl] * 1e3,
                    **roofline(times[impl], num_bytes, flops, ceilings),
                )
                if impl == "triton":
                    config = pick_config(rows, n, dtype)
                    row["tile"] = f"{config.block_m}x{config.block_n}x{config.block_k}/{config.num_warps}w"
                rows_out.append(row)
            rows_out[-2]["vs torch"] = times["triton"] / times["torch"]
        del weights
        if device.type == "cuda":
            torch.cuda.empty_cache()

    columns = [
        "layer",
        "N",
        "K",
        "rows",
        "impl",
        "tile",
        "ms",
        "GB/s",
        "% copy bw",
        "TFLOP/s",
        "% matmul",
        "% roofline",
        "vs torch",
    ]
    print(
        f"device: {ceilings.device}; copy {ceilings.copy_bytes_per_s / 1e9:.1f} GB/s; "
        f"{ceilings.matmul_dtype} matmul {ceilings.matmul_flops_per_s / 1e12:.3g} TFLOP/s"
        + ("  [tiny: Triton interpreter, timings are not meaningful]" if tiny else "")
    )
    print(format_table(rows_out, columns))
    results = {"ceilings": ceilings.as_dict(), "tiny": tiny, "dtype": str(dtype), "rows": rows_out}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_matmul.json", results)
    series = {}
    for layer, *_ in layers:
        for impl in ("triton", "torch"):
            points = [(r["rows"], r["% roofline"]) for r in rows_out if r["layer"] == layer and r["impl"] == impl]
            series[f"{layer} {impl}"] = ([p[0] for p in points], [p[1] for p in points])
    plot_series(
        args.out / "bench_matmul.png",
        series,
        xlabel="rows (M)",
        ylabel="% of roofline",
        title=f"dense linear, bf16 ({ceilings.device})",
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
