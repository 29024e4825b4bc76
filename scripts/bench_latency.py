"""`gptoss bench latency`: the engine alone (no server), prefill and decode speed against the memory roofline.

    gptoss bench latency --model CKPT --batch-sizes 1,8,32 --input-lens 128,1024 --output-lens 64
    gptoss bench latency --random-weights --preset gpt-oss-120b ...   # no checkpoint: random weights on the device
    gptoss bench latency ...                                          # no --model: the tiny random checkpoint

For each batch size B x input length I x output length O, with B random prompts of I tokens (prefix caching
off, EOS ignored), the median over `--iters` runs of
- prefill: a generate with `max_tokens=1` (the prompts plus one sampled token): `B * I / t_prefill` tokens/s;
- decode: a generate with `max_tokens=O` minus the prefill run: `(t_full - t_prefill) / (O - 1)` per step,
  `B * (O - 1) / (t_full - t_prefill)` tokens/s;
- roofline: the bytes one decode step of B sequences at context `I + O/2` reads (engine/model/roofline.py, with
  the loaded model's weight and KV element sizes) over the device's measured bandwidth (a big on-device copy,
  read + write bytes per second), so `% roofline` says how close the measured step is to the memory limit;
- device / host split of a decode step: `device ms/step` is the time the kernels of a step take (the sum of
  GPU kernel durations from torch.profiler's CUDA activity, graph replays included; on CPU the time inside
  torch ops), from one profiled prefill run and one profiled full run (their difference over O - 1 steps);
  `host ms/step` is the rest of the step's wall time (`decode ms/step - device ms/step`): scheduling, input
  preparation, launches, sampling and the waits between them, i.e. what a faster kernel cannot win back.
`--profile` adds a torch.profiler table (ops by self time) of one more full run of the first configuration.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from gptoss.scripts.generate import make_llm

COLUMNS = [
    "batch",
    "input",
    "output",
    "prefill ms",
    "prefill tok/s",
    "decode ms/step",
    "decode tok/s",
    "roofline ms/step",
    "roofline tok/s",
    "% roofline",
    "device ms/step",
    "host ms/step",
]


def parse_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def random_prompts(num: int, length: int, vocab_size: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(num)]


def timed_generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds for `llm.generate` of `prompts` to `max_tokens` tokens each (device synchronised)."""
    from gptoss.benchmarks.common import synchronize
    from gptoss.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    device = llm.engine.runner.device
    synchronize(device)
    start = time.perf_counter()
    llm.generate(prompts, params)
    synchronize(device)
    return time.perf_counter() - start


def measure(
    llm: Any, batch: int, input_len: int, output_len: int, iters: int, warmup: int, seed: int
) -> tuple[float, float]:
    """Median (prefill seconds, full-generation seconds) over `iters` runs, fresh random prompts each time."""
    rng = random.Random(seed)
    vocab = llm.engine.vocab_size
    prefill, full = [], []
    for i in range(warmup + iters):
        t_prefill = timed_generate(llm, random_prompts(batch, input_len, vocab, rng), 1)
        t_full = timed_generate(llm, random_prompts(batch, input_len, vocab, rng), output_len)
        if i >= warmup:
            prefill.append(t_prefill)
            full.append(t_full)
    return statistics.median(prefill), statistics.median(full)


def kernel_seconds(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(seconds in kernels, wall seconds) of one profiled generate: GPU kernel time on CUDA (profiler CUDA
    activity), time inside torch ops on CPU (the sum of their self times)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = llm.engine.runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        wall = timed_generate(llm, prompts, max_tokens)
    events = prof.key_averages()
    if on_cuda:
        return sum(e.self_device_time_total for e in events) / 1e6, wall
    return sum(e.self_cpu_time_total for e in events) / 1e6, wall


def decode_device_seconds(llm: Any, batch: int, input_len: int, output_len: int, seed: int, decode_s: float) -> float:
    """Kernel seconds of one decode step, from a profiled prefill run and a profiled full run. On CUDA the
    kernel durations themselves (the profiler does not slow the GPU); on CPU, where the profiler slows the ops
    it times, their share of the profiled step's wall time applied to the unprofiled `decode_s`."""
    rng = random.Random(seed + 11)
    vocab = llm.engine.vocab_size
    steps = max(output_len - 1, 1)
    prefill_kernels, prefill_wall = kernel_seconds(llm, random_prompts(batch, input_len, vocab, rng), 1)
    full_kernels, full_wall = kernel_seconds(llm, random_prompts(batch, input_len, vocab, rng), output_len)
    kernels = max(full_kernels - prefill_kernels, 0.0) / steps
    if llm.engine.runner.device.type == "cuda":
        return min(kernels, decode_s)
    wall = max(full_wall - prefill_wall, 1e-9) / steps
    return decode_s * min(1.0, kernels / wall)


def element_size(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def step_bytes(llm: Any, batch: int, context_len: int) -> Any:
    """The roofline's `DecodeStepBytes` for the loaded model's dtypes (experts stay MXFP4 on every device)."""
    from gptoss.engine.model.roofline import decode_step_bytes

    runner = llm.engine.runner
    return decode_step_bytes(
        llm.engine.config, batch, context_len, element_size(runner.dtype), runner.kv_caches[0][0].element_size()
    )


def bench_rows(llm: Any, args: argparse.Namespace, bandwidth: float) -> list[dict[str, Any]]:
    """One table row per (batch, input, output) configuration."""
    from gptoss.engine.model.roofline import decode_ceiling

    rows = []
    for batch in args.batch_sizes:
        for input_len in args.input_lens:
            for output_len in args.output_lens:
                t_prefill, t_full = measure(llm, batch, input_len, output_len, args.iters, args.warmup, args.seed)
                steps = max(output_len - 1, 1)
                decode_s = max(t_full - t_prefill, 1e-9) / steps
                step = step_bytes(llm, batch, input_len + output_len // 2)
                ceiling = decode_ceiling(step, bandwidth)
                device_s = decode_device_seconds(llm, batch, input_len, output_len, args.seed, decode_s)
                rows.append(
                    {
                        "batch": batch,
                        "input": input_len,
                        "output": output_len,
                        "prefill ms": t_prefill * 1e3,
                        "prefill tok/s": batch * input_len / t_prefill,
                        "decode ms/step": decode_s * 1e3,
                        "decode tok/s": batch / decode_s,
                        "roofline ms/step": ceiling.seconds * 1e3,
                        "roofline tok/s": ceiling.tokens_per_s,
                        "% roofline": 100 * ceiling.seconds / decode_s,
                        "device ms/step": device_s * 1e3,
                        "host ms/step": (decode_s - device_s) * 1e3,
                        "step GB": step.total / 1e9,
                    }
                )
                if not args.quiet:
                    print(
                        f"batch {batch} input {input_len} output {output_len}: prefill {rows[-1]['prefill ms']:.1f}"
                        f" ms, decode {rows[-1]['decode ms/step']:.2f} ms/step (device {device_s * 1e3:.2f}, host "
                        f"{(decode_s - device_s) * 1e3:.2f})",
                        file=sys.stderr,
                    )
    return rows


def tensor_parallel_report(llm: Any) -> dict[str, Any]:
    """This run's rank: its weight bytes and KV tokens (measured); and per-rank weights, KV capacity and batch-1
    tokens/s predicted on H100s (NVLink 450 GB/s per direction) at each world size 1/2/4/8 the model splits over."""
    from gptoss.engine.model.config import FULL
    from gptoss.engine.model.roofline import format_tensor_parallel, splits_over, tensor_parallel_estimate

    runner = llm.engine.runner
    config = llm.engine.config
    weight_bytes = sum(p.nbytes for p in runner.model.parameters())
    pool = FULL if FULL in runner.num_blocks else next(iter(runner.num_blocks))
    kv_tokens = runner.num_blocks[pool] * runner.block_size
    estimates = [tensor_parallel_estimate(config, n) for n in (1, 2, 4, 8) if splits_over(config, n)]
    text = (
        f"tensor parallel {runner.parallel.world_size}: {weight_bytes / 1e9:.3f} GB of weights per rank, "
        f"KV cache of {kv_tokens:,d} tokens per rank (measured)\n"
        "predicted on H100 SXM (3.35 TB/s, NVLink 450 GB/s per direction, 10 us per collective):\n"
        + format_tensor_parallel(estimates)
    )
    return {
        "world_size": runner.parallel.world_size,
        "weight_bytes_per_rank": weight_bytes,
        "kv_tokens_per_rank": kv_tokens,
        "predicted_h100": [vars(e) | {"tokens_per_s": e.tokens_per_s} for e in estimates],
        "text": text,
    }


def profile_table(llm: Any, batch: int, input_len: int, output_len: int, seed: int, row_limit: int = 25) -> str:
    """torch.profiler's per-op table (sorted by self time) of one generate, with the step count to divide by."""
    from torch.profiler import ProfilerActivity, profile

    device = llm.engine.runner.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prompts = random_prompts(batch, input_len, llm.engine.vocab_size, random.Random(seed + 7))
    with profile(activities=activities) as prof:
        timed_generate(llm, prompts, output_len)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    header = f"profile: batch {batch}, input {input_len}, {output_len} steps (one prefill, {output_len - 1} decode)"
    return header + "\n" + prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)


def run_bench_latency(args: argparse.Namespace) -> int:
    import torch
    from gptoss.benchmarks.common import device_name, format_table, measure_copy_bandwidth
    from gptoss.engine.model.roofline import format_breakdown
    from gptoss.scripts.engine_flags import resolve_model_path

    model_path = resolve_model_path(args)
    overrides: dict[str, Any] = {
        "model": model_path,
        "enable_prefix_caching": False,  # every run must really prefill
        "max_num_seqs": max(args.max_num_seqs, max(args.batch_sizes)),
        # A whole batch's prompts in one step, so the prefill time is one step's.
        "max_num_batched_tokens": max(args.max_num_batched_tokens, max(args.batch_sizes) * max(args.input_lens)),
    }
    start = time.perf_counter()
    llm = make_llm(args, **overrides)
    load_s = time.perf_counter() - start
    device = llm.engine.runner.device
    # One throw-away run, so the first configuration does not pay for lazy initialisation (kernels, caches).
    timed_generate(llm, random_prompts(1, min(args.input_lens), llm.engine.vocab_size, random.Random(args.seed)), 2)
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measure_copy_bandwidth(device)
    print(
        f"{device_name(device)}: loaded in {load_s:.1f} s; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"({'given' if args.bandwidth_gbs else 'measured'})",
        file=sys.stderr,
    )
    rows = bench_rows(llm, args, bandwidth)
    print(format_table(rows, COLUMNS))
    runner = llm.engine.runner
    breakdown = step_bytes(llm, rows[0]["batch"], rows[0]["input"] + rows[0]["output"] // 2)
    print(format_breakdown(breakdown, bandwidth))
    tensor_parallel = tensor_parallel_report(llm)
    print(tensor_parallel["text"])
    report: dict[str, Any] = {
        "device": device_name(device),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "cpu_threads": torch.get_num_threads(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "bandwidth_measured": not args.bandwidth_gbs,
        "model": f"preset:{args.preset} (random weights)" if args.random_weights and not args.model else model_path,
        "config": llm.engine.config.to_hf_dict(),
        "rows": rows,
        "roofline_first_row": breakdown.as_dict(),
        "tensor_parallel": {k: v for k, v in tensor_parallel.items() if k != "text"},
    }
    if args.profile:
        table = profile_table(llm, rows[0]["batch"], rows[0]["input"], rows[0]["output"], args.seed)
        print(table)
        report["profile"] = table
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_json).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.result_json}", file=sys.stderr)
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add `latency` under `gptoss bench` (pass the `bench` command's subparsers)."""
    from gptoss.scripts.engine_flags import add_engine_arguments

    parser = bench_subparsers.add_parser(
        "latency",
        help="engine-only prefill / decode speed per batch size, against the memory-bandwidth roofline",
        description=__doc__,
    )
    add_engine_arguments(parser)  # --model, or --random-weights --preset NAME; --seed also seeds the prompts
    parser.add_argument("--batch-sizes", type=parse_ints, default=[1, 4, 16], help="comma-separated")
    parser.add_argument("--input-lens", type=parse_ints, default=[128], help="prompt tokens, comma-separated")
    parser.add_argument("--output-lens", type=parse_ints, default=[32], help="new tokens, comma-separated")
    parser.add_argument("--iters", type=int, default=3, help="timed runs per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each row")
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="use this memory bandwidth (GB/s) for the roofline instead of measuring it",
    )
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one run")
    parser.add_argument("--result-json", default=None, help="also write the rows and the setup to this file")
    parser.add_argument("--quiet", action="store_true", help="less output")
    parser.set_defaults(handler=run_bench_latency)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss bench")
    register(parser.add_subparsers(dest="bench_command", required=True))
    args = parser.parse_args(["latency", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
