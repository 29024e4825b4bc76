"""Benchmark the Triton MXFP4 MoE (kernels/moe.py) at gpt-oss-120b shapes against dequantise-then-matmul.

    python -m benchmarks.bench_moe                      # GPU: H=I=2880, 128 experts, top-4, T in 1..16384
    python -m benchmarks.bench_moe --tiny               # CPU interpreter, tiny shapes (also the CI smoke test)

For each token count: median time of `fused_moe` (batch-invariant and fast modes) and of the baseline
(dequantise each hit expert to bf16 with the reference, then torch.matmul), the weight bytes actually touched
(distinct experts hit x bytes per expert: packed blocks + scales + biases), achieved GB/s against the measured
copy bandwidth, TFLOP/s against the measured bf16 matmul rate, and % of the roofline
max(bytes / bandwidth, flops / matmul rate). Writes `bench_moe.json` and `bench_moe.png` under --out.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
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

REAL_SHAPE = {"hidden": 2880, "intermediate": 2880, "experts": 128, "top_k": 4}
TINY_SHAPE = {"hidden": 64, "intermediate": 96, "experts": 8, "top_k": 2}
REAL_TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
TINY_TOKENS = [1, 4, 16]


def make_experts(experts: int, hidden: int, intermediate: int, device: torch.device, seed: int = 0) -> dict:
    """Random MXFP4 expert weights with scales near 2^0 (the values matter only for finiteness)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def mxfp4(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=gen, device=device, dtype=torch.uint8)
        scales = torch.randint(118, 123, (experts, rows, cols // 32), generator=gen, device=device, dtype=torch.uint8)
        return blocks, scales

    w1_blocks, w1_scales = mxfp4(2 * intermediate, hidden)
    w2_blocks, w2_scales = mxfp4(hidden, intermediate)
    bias = {"generator": gen, "device": device}
    return {
        "w1_blocks": w1_blocks,
        "w1_scales": w1_scales,
        "w1_bias": (torch.randn(experts, 2 * intermediate, **bias) * 0.1).to(torch.bfloat16),
        "w2_blocks": w2_blocks,
        "w2_scales": w2_scales,
        "w2_bias": (torch.randn(experts, hidden, **bias) * 0.1).to(torch.bfloat16),
    }


def expert_bytes(weights: dict) -> int:
    """Bytes one expert's weights occupy (what a kernel must read for each expert it touches)."""
    return sum(t[0].numel() * t.element_size() for t in weights.values())


def dequant_matmul_baseline(
    x: torch.Tensor, router_logits: torch.Tensor, weights: dict, top_k: int, compute_dtype: torch.dtype
) -> torch.Tensor:
    """The naive path: dequantise each hit expert with the reference, then dense torch matmuls."""
    from gptoss.kernels.reference import mxfp4_dequantize, route_topk, swiglu

    expert_ids, expert_weights = route_topk(router_logits, top_k)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    xc = x.to(compute_dtype)
    for expert in torch.unique(expert_ids).tolist():
        token_idx, slot = torch.nonzero(expert_ids == expert, as_tuple=True)
        w1 = mxfp4_dequantize(weights["w1_blocks"][expert], weights["w1_scales"][expert], compute_dtype)
        w2 = mxfp4_dequantize(weights["w2_blocks"][expert], weights["w2_scales"][expert], compute_dtype)
        h = xc[token_idx] @ w1.T + weights["w1_bias"][expert].to(compute_dtype)
        y = swiglu(h, 7.0, 1.702) @ w2.T + weights["w2_bias"][expert].to(compute_dtype)
        out.index_add_(0, token_idx, y.float() * expert_weights[token_idx, slot, None])
    return out.to(x.dtype)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in the Triton interpreter (auto on CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: 1..16384, tiny: 1 4 16)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per point (default 20, tiny 1)")
    parser.add_argument("--no-baseline", action="store_true", help="skip dequantise-then-matmul")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)

    device = pick_device()
    tiny = args.tiny or device.type != "cuda"
    if tiny and device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # read by kernels.moe at launch time
    from gptoss.kernels.moe import fused_moe, moe_route

    shape = TINY_SHAPE if tiny else REAL_SHAPE
    tokens_list = args.tokens or (TINY_TOKENS if tiny else REAL_TOKENS)
    iters = args.iters or (1 if tiny else 20)
    warmup = 0 if tiny else 3
    hidden, intermediate, experts, top_k = (shape[k] for k in ("hidden", "intermediate", "experts", "top_k"))
    act_dtype = torch.bfloat16
    baseline_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    ceilings = measure_ceilings(device)
    weights = make_experts(experts, hidden, intermediate, device)
    per_expert = expert_bytes(weights)
    impls = {
        "triton_invariant": lambda x, logits: fused_moe(x, logits, **weights, top_k=top_k, batch_invariant=True),
        "triton_fast": lambda x, logits: fused_moe(x, logits, **weights, top_k=top_k, batch_invariant=False),
    }
    if not args.no_baseline:
        impls["torch_dequant_matmul"] = lambda x, logits: dequant_matmul_baseline(
            x, logits, weights, top_k, baseline_dtype
        )

    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, generator=gen, device=device).to(act_dtype)
        logits = torch.randn(tokens, experts, generator=gen, device=device)
        hit = int(torch.unique(moe_route(logits, top_k, 64).expert_ids).numel())
        weight_bytes = hit * per_expert
        flops = 2 * tokens * top_k * (hidden * 2 * intermediate + intermediate * hidden)
        for name, fn in impls.items():
            seconds = median_time(functools.partial(fn, x, logits), device, warmup=warmup, iters=iters)
            rows.append(
                dict(
                    impl=name,
                    tokens=tokens,
                    experts_hit=hit,
                    weight_MB=weight_bytes / 1e6,
                    ms=seconds * 1e3,
                    **roofline(seconds, weight_bytes, flops, ceilings),
                )
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()

    columns = [
        "impl",
        "tokens",
        "experts_hit",
        "weight_MB",
        "ms",
        "GB/s",
        "% copy bw",
        "TFLOP/s",
        "% matmul",
        "% roofline",
    ]
    print(
        f"device: {ceilings.device}; copy {ceilings.copy_bytes_per_s / 1e9:.1f} GB/s; "
        f"{ceilings.matmul_dtype} matmul {ceilings.matmul_flops_per_s / 1e12:.3g} TFLOP/s; shape {shape}"
        + ("  [tiny: Triton interpreter, timings are not meaningful]" if tiny else "")
    )
    print(format_table(rows, columns))
    results = {
        "ceilings": ceilings.as_dict(),
        "shape": shape,
        "tiny": tiny,
        "activation_dtype": str(act_dtype),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_moe.json", results)
    series = {}
    for name in impls:
        points = [(r["tokens"], r["% roofline"]) for r in rows if r["impl"] == name]
        series[name] = ([p[0] for p in points], [p[1] for p in points])
    plot_series(
        args.out / "bench_moe.png",
        series,
        xlabel="tokens",
        ylabel="% of roofline",
        title=f"MXFP4 MoE, H={hidden} I={intermediate} E={experts} top-{top_k} ({ceilings.device})",
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
