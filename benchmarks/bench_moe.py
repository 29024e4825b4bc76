"""Benchmark the Triton MXFP4 MoE (kernels/moe.py) at gpt-oss-120b shapes, timed so it cannot flatter itself.

    python -m benchmarks.bench_moe                      # GPU: H=I=2880, 128 experts, top-4, T in 1..16384
    python -m benchmarks.bench_moe --tiny               # CPU interpreter, tiny shapes (also the CI smoke test)

- CUDA-graph timing (`triton.testing.do_bench_cudagraph`, median): no launch or Python overhead in the number.
- `--copies` (default 4) full copies of the layer's experts, each call in a timed graph on the next copy: the
  4 experts a decode token touches (53 MB at 120b) fit the ~50 MB L2, so one copy would time L2, not HBM.
- Bytes = the packed bytes of the distinct experts hit (values + scales + biases) + activations in and out;
  GB/s against the device's measured copy bandwidth (`% copy bw`: the target is >= 70% at 1-64 tokens).
Writes `bench_moe.json` and `bench_moe.png` under --out. In --tiny mode (interpreter) the times mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from gptoss.benchmarks.common import (
    format_table,
    graph_time,
    measure_ceilings,
    pick_device,
    plot_series,
    roofline,
    write_json,
)

REAL_SHAPE = {"hidden": 2880, "intermediate": 2880, "experts": 128, "top_k": 4}
TINY_SHAPE = {"hidden": 64, "intermediate": 96, "experts": 8, "top_k": 2}
REAL_TOKENS = [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096, 16384]
TINY_TOKENS = [1, 4, 16]


def make_experts(experts: int, hidden: int, intermediate: int, device: torch.device, seed: int = 0) -> dict:
    """Random MXFP4 expert weights in the checkpoint layout, scales near 2^0 (values matter only for
    finiteness)."""
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
        "w1_bias": torch.randn(experts, 2 * intermediate, **bias) * 0.1,
        "w2_blocks": w2_blocks,
        "w2_scales": w2_scales,
        "w2_bias": torch.randn(experts, hidden, **bias) * 0.1,
    }


def expert_bytes(weights: dict) -> int:
    """Bytes one expert's weights occupy (what a kernel must read for each expert it touches)."""
    return sum(t[0].numel() * t.element_size() for t in weights.values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in the Triton interpreter (auto on CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default: 1..16384, tiny: 1 4 16)")
    parser.add_argument("--copies", type=int, default=4, help="rotating weight copies (>= 4 keeps L2 cold)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)

    device = pick_device()
    tiny = args.tiny or device.type != "cuda"
    if tiny and device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # read by kernels.moe at launch time
    from gptoss.kernels.moe import fused_moe, moe_route, pack_mxfp4

    shape = TINY_SHAPE if tiny else REAL_SHAPE
    tokens_list = args.tokens or (TINY_TOKENS if tiny else REAL_TOKENS)
    hidden, intermediate, experts, top_k = (shape[k] for k in ("hidden", "intermediate", "experts", "top_k"))
    copies = 1 if tiny else max(1, args.copies)

    ceilings = measure_ceilings(device)
    packed = []
    for copy in range(copies):
        w = make_experts(experts, hidden, intermediate, device, seed=copy)
        packed.append(
            (
                pack_mxfp4(w["w1_blocks"], w["w1_scales"], w["w1_bias"]),
                pack_mxfp4(w["w2_blocks"], w["w2_scales"], w["w2_bias"]),
            )
        )
        per_expert = expert_bytes(w)
        del w
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for tokens in tokens_list:
        x = torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16)
        logits = torch.randn(tokens, experts, generator=gen, device=device)
        hit = int(torch.unique(moe_route(logits, top_k, 16).expert_ids).numel())
        weight_bytes = hit * per_expert
        io_bytes = tokens * hidden * 2 * 2 + tokens * experts * 4
        flops = 2 * tokens * top_k * (hidden * 2 * intermediate + intermediate * hidden)

        def run_all_copies(x=x, logits=logits) -> None:
            for w1, w2 in packed:
                fused_moe(x, logits, w1, w2, top_k)

        seconds = graph_time(run_all_copies, device, warmup=0 if tiny else 3, iters=1 if tiny else 20) / copies
        rows.append(
            dict(
                impl="triton",
                tokens=tokens,
                experts_hit=hit,
                weight_MB=weight_bytes / 1e6,
                us=seconds * 1e6,
                **roofline(seconds, weight_bytes + io_bytes, flops, ceilings),
            )
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()

    columns = ["impl", "tokens", "experts_hit", "weight_MB", "us", "GB/s", "% copy bw", "TFLOP/s", "% roofline"]
    print(
        f"device: {ceilings.device}; copy {ceilings.copy_bytes_per_s / 1e9:.1f} GB/s; "
        f"{ceilings.matmul_dtype} matmul {ceilings.matmul_flops_per_s / 1e12:.3g} TFLOP/s; shape {shape}; "
        f"{copies} rotating weight copies; "
        + ("[tiny: Triton interpreter, timings are not meaningful]" if tiny else "CUDA-graph timing")
    )
    print(format_table(rows, columns))
    results = {"ceilings": ceilings.as_dict(), "shape": shape, "tiny": tiny, "copies": copies, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "bench_moe.json", results)
    plot_series(
        args.out / "bench_moe.png",
        {"triton": ([r["tokens"] for r in rows], [r["% copy bw"] for r in rows])},
        xlabel="tokens",
        ylabel="% of measured copy bandwidth",
        title=f"MXFP4 MoE, H={hidden} I={intermediate} E={experts} top-{top_k} ({ceilings.device})",
    )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
