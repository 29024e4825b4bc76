"""The CPU path against `transformers` on the same checkpoint, side by side in one process.

Both generate greedily from the same random prompts, `--output-len` new tokens each (EOS ignored), in fp32 on
the CPU with the same torch thread count (`--num-threads`, 1 by default: steady numbers on a shared machine).
The engine runs `LLM.generate` (continuous batching, paged KV cache, prefix caching off); `transformers` runs
`GptOssForCausalLM.generate` with the MXFP4 experts dequantised at load (`Mxfp4Config(dequantize=True)`, what
it does on a CPU). Each row is the fastest of `--iters` timed runs after one warm-up run of each, the two
alternating (so a load change on a shared machine hits both alike); `--clock cpu` times the process's CPU
time instead of the wall clock (with one thread the same on an idle machine, far steadier on a busy one):

    output tokens/s = batch * output_len / seconds (prefill included, as a user waits for it)

and `ratio` = engine / transformers (above 1: the engine is faster). `same tokens` is the fraction of greedy
tokens both produced identically (random weights make near-ties, so a few may differ after a first divergence).

    python -m gptoss.benchmarks.bench_cpu_vs_transformers [--checkpoint DIR] [--batch-sizes 1,16]
        [--prompt-len 32] [--output-len 32] [--iters 3] [--num-threads 1] [--json out.json]

Without `--checkpoint` a random checkpoint of `--preset` (default tiny) is written to a temporary folder;
`--hidden-size`, `--intermediate-size`, `--num-hidden-layers`, `--num-local-experts` override its sizes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def parse_ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def random_prompts(batch: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(batch)]


def engine_generate(llm: Any, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    from gptoss.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    return [list(out.token_ids) for out in llm.generate(prompts, params)]


def hf_generate(model: Any, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    input_ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, input_ids.shape[1] :].tolist()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_seconds(fns: dict[str, Any], iters: int, clock: str = "wall") -> tuple[dict[str, float], dict[str, Any]]:
    """The fastest of `iters` timed runs of each function, after one warm-up run of each (whose result is
    returned). Runs alternate between the functions, so a load change on a shared machine hits both alike.
    `clock`: "wall", or "cpu" (this process's CPU time: with one thread, the wall time of an idle machine, and
    much steadier on a loaded one)."""
    now = CLOCKS[clock]
    results = {name: fn() for name, fn in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(iters):
        for name, fn in fns.items():
            start = now()
            fn()
            best[name] = min(best[name], now() - start)
    return best, results


def same_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def make_checkpoint(args: argparse.Namespace, folder: Path) -> Path:
    from gptoss.engine.model.config import preset
    from gptoss.engine.model.random_checkpoint import make_random_checkpoint

    overrides = {
        name: getattr(args, name)
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts")
        if getattr(args, name) is not None
    }
    return make_random_checkpoint(folder, preset(args.preset).replace(**overrides), seed=0)


def run(args: argparse.Namespace, checkpoint: Path) -> list[dict[str, Any]]:
    import transformers
    from gptoss.engine.llm import LLM

    torch.set_num_threads(args.num_threads)
    max_batch = max(args.batch_sizes)
    llm = LLM(
        str(checkpoint),
        device="cpu",
        dtype="float32",
        max_num_seqs=max_batch,
        max_num_batched_tokens=max(8192, max_batch * args.prompt_len),
        enable_prefix_caching=False,
    )
    hf = transformers.GptOssForCausalLM.from_pretrained(
        str(checkpoint), quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    vocab = llm.engine.config.vocab_size
    rows = []
    for batch in args.batch_sizes:
        prompts = random_prompts(batch, args.prompt_len, vocab, seed=batch)
        seconds, tokens_out = best_seconds(
            {
                "engine": lambda p=prompts: engine_generate(llm, p, args.output_len),
                "transformers": lambda p=prompts: hf_generate(hf, p, args.output_len),
            },
            args.iters,
            args.clock,
        )
        ours_s, hf_s = seconds["engine"], seconds["transformers"]
        ours, theirs = tokens_out["engine"], tokens_out["transformers"]
        tokens = batch * args.output_len
        rows.append(
            {
                "batch": batch,
                "engine tok/s": tokens / ours_s,
                "transformers tok/s": tokens / hf_s,
                "ratio": hf_s / ours_s,
                "same tokens": same_fraction(ours, theirs),
            }
        )
        row = rows[-1]
        print(
            f"batch {batch:3d}: engine {row['engine tok/s']:8.1f} tok/s   transformers "
            f"{row['transformers tok/s']:8.1f} tok/s   ratio {row['ratio']:.2f}x   same tokens "
            f"{row['same tokens']:.0%}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="HF checkpoint folder (default: a random one)")
    parser.add_argument("--preset", default="tiny", help="shape of the random checkpoint")
    for name in ("hidden-size", "intermediate-size", "num-hidden-layers", "num-local-experts"):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the preset's value")
    parser.add_argument("--batch-sizes", type=parse_ints, default=[1, 16], help="comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence")
    parser.add_argument("--output-len", type=int, default=32, help="new tokens per sequence")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per row and side (the fastest counts)")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads for both")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (steadier on a busy machine)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if importlib_missing("transformers"):
        print("transformers is not installed: pip install transformers", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_checkpoint(args, Path(tmp) / "ckpt")
        print(f"checkpoint {checkpoint}, fp32, cpu, {args.num_threads} torch thread(s), {args.clock} clock", flush=True)
        rows = run(args, checkpoint)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


if __name__ == "__main__":
    sys.exit(main())
