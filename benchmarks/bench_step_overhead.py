"""Host overhead of one engine step, by phase, with the model stubbed out.

`LLMEngine` runs on a tiny random checkpoint whose vocabulary is widened to gpt-oss's (201,088 by default), and
the model's `forward` / `compute_logits` are replaced by stubs that return a preallocated hidden state / logits
buffer at once: what is left of a step is the engine's own host work (the part a CUDA-graph decode step cannot
hide unless it is overlapped). For each batch size, that many requests with `--prompt-len`-token prompts are
prefilled (not timed), then `--steps` pure-decode steps are timed phase by phase:

- schedule:        `Scheduler.schedule` (the plan, block allocation)
- prepare_inputs:  `ModelRunner.prepare_inputs` (token ids, positions, block tables, slot mapping)
- sample_host:     `ModelRunner._sample` minus the sampler's tensor work (sampling metadata, device->host copy,
                   per-row results); with penalties it also holds the [N, V] count/mask tensors' fill, device
                   work on CUDA but CPU compute here
- sampler_compute: the `Sampler` call itself: [N, V] tensor work, device work on CUDA but CPU compute here
- mark_computed:   `Scheduler.mark_computed`
- output:          `LLMEngine._process` (append token, stop checks, detokenize, RequestOutput deltas)
- step_total:      the whole `LLMEngine.step`; `host_total` = step_total - sampler_compute - stubs

    python -m benchmarks.bench_step_overhead [--batch-sizes 1,16,64,256] [--prompt-len 1024] [--steps 30]
        [--vocab-size 201088] [--sampling greedy|random|penalties] [--json out.json] [--profile out.prof]

Uses shared/vocab/o200k_harmony.tokenizer.json when present (real detokenization costs; `--tokenizer` to choose),
else the tiny tokenizer (ids beyond its vocabulary decode to nothing). Prefix caching is off and the KV pools are
sized to hold every sequence, so no step preempts.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.llm_engine import LLMEngine
from gptoss.engine.model.config import preset
from gptoss.engine.model.random_checkpoint import make_random_checkpoint
from gptoss.engine.sampling_params import SamplingParams

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "o200k_harmony.tokenizer.json"
PHASES = ("schedule", "prepare_inputs", "sample_host", "sampler_compute", "mark_computed", "output")

SAMPLING = {
    "greedy": SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True),
    "random": SamplingParams(max_tokens=1 << 20, temperature=0.8, top_p=0.95, top_k=50, ignore_eos=True),
    "penalties": SamplingParams(
        max_tokens=1 << 20, temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.5, ignore_eos=True
    ),
}


class PhaseTimer:
    """Wraps bound methods so that each call's duration is added to the current step's phase total."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - start

        return timed

    def take(self) -> dict[str, float]:
        step, self.current = dict(self.current), defaultdict(float)
        return step


def build_engine(
    workdir: Path, vocab_size: int, max_batch: int, prompt_len: int, steps: int, tokenizer: Path | None
) -> LLMEngine:
    """An engine on a tiny random checkpoint of `vocab_size` tokens, KV pools large enough for every stream."""
    # Sequences whose prompt is done decode while later prompts are still prefilling: room for those tokens too.
    max_batched_tokens = max(8192, prompt_len)
    max_len = prompt_len + steps + 64 + -(-max_batch * prompt_len // max_batched_tokens)
    config = preset("tiny").replace(vocab_size=vocab_size, max_position_embeddings=max(2048, max_len))
    make_random_checkpoint(workdir, config, seed=0, tokenizer_path=tokenizer, write_weights=False)
    block_size = 16
    num_blocks = max_batch * (-(-max_len // block_size) + 2) + 16
    args = EngineArgs(
        model=str(workdir),
        device="cpu",
        random_weights=True,
        block_size=block_size,
        num_blocks=num_blocks,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max_batched_tokens,
        max_model_len=max_len,
        enable_prefix_caching=False,
    )
    return LLMEngine(args)


def stub_model(engine: LLMEngine, max_batch: int, max_tokens: int) -> PhaseTimer:
    """Replace the forward and the unembedding by buffer lookups and install the phase timers."""
    model = engine.runner.model
    hidden = torch.zeros(max_tokens, engine.config.hidden_size, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(max_batch, engine.config.vocab_size, generator=generator)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, batch: Any, kv_caches: Any) -> torch.Tensor:
        return hidden[: input_ids.shape[0]]

    def compute_logits(rows: torch.Tensor) -> torch.Tensor:
        return logits[: rows.shape[0]]

    timer = PhaseTimer()
    model.forward = timer.wrap("stubs", forward)
    model.compute_logits = timer.wrap("stubs", compute_logits)
    runner, scheduler = engine.runner, engine.scheduler
    scheduler.schedule = timer.wrap("schedule", scheduler.schedule)
    scheduler.mark_computed = timer.wrap("mark_computed", scheduler.mark_computed)
    runner.prepare_inputs = timer.wrap("prepare_inputs", runner.prepare_inputs)
    runner._sample = timer.wrap("sample", runner._sample)
    sampler = runner.sampler
    runner.sampler = timer.wrap("sampler_compute", sampler.__call__)  # type: ignore[assignment]
    engine._process = timer.wrap("output", engine._process)
    engine.step = timer.wrap("step_total", engine.step)
    return timer


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def run_batch(
    engine: LLMEngine, timer: PhaseTimer, batch: int, prompt_len: int, steps: int, params: SamplingParams, seed: int
) -> dict[str, Any]:
    """Prefill `batch` requests, time `steps` decode steps; per-phase median / p90 in microseconds."""
    generator = torch.Generator().manual_seed(seed)
    ids = [f"b{batch}-{i}" for i in range(batch)]
    for request_id in ids:
        prompt = torch.randint(0, min(engine.vocab_size, 200_000), (prompt_len,), generator=generator).tolist()
        engine.add_request(request_id, prompt, params)
    while any(seq.is_prefill or seq.num_computed_tokens == 0 for seq in engine.requests.values()):
        engine.step()
    engine.step()  # the first pure-decode step (warm-up)
    timer.take()
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        engine.step()
        step = timer.take()
        step["sample_host"] = step.get("sample", 0.0) - step.get("sampler_compute", 0.0)
        step["host_total"] = step["step_total"] - step.get("sampler_compute", 0.0) - step.get("stubs", 0.0)
        for name in (*PHASES, "host_total", "step_total"):
            samples[name].append(step.get(name, 0.0) * 1e6)
    if len(engine.requests) != batch:  # finished requests leave `engine.requests`
        raise RuntimeError(f"{batch - len(engine.requests)} of {batch} requests finished during the timed steps")
    for request_id in ids:
        engine.abort_request(request_id)
    row: dict[str, Any] = {"batch": batch}
    for name, values in samples.items():
        row[f"{name}_p50"] = statistics.median(values)
        row[f"{name}_p90"] = percentile(values, 0.9)
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    names = (*PHASES, "host_total", "step_total")
    header = f"{'phase (us)':<16}" + "".join(f"{'B=' + str(r['batch']) + ' p50/p90':>22}" for r in rows)
    lines = [header, "-" * len(header)]
    for name in names:
        cells = "".join(f"{r[name + '_p50']:>12.0f} /{r[name + '_p90']:>8.0f}" for r in rows)
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,16,64,256")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vocab-size", type=int, default=201088)
    parser.add_argument("--sampling", choices=sorted(SAMPLING), default="greedy")
    parser.add_argument(
        "--tokenizer",
        type=lambda text: Path(text) if text else None,
        default=REAL_TOKENIZER if REAL_TOKENIZER.is_file() else None,
        help='tokenizer.json (default: shared/vocab/o200k_harmony.tokenizer.json when present; "": the tiny one)',
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the sampler's tensor work)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the timed steps of the largest batch")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        engine = build_engine(
            Path(workdir), args.vocab_size, max(batch_sizes), args.prompt_len, args.steps, args.tokenizer
        )
        timer = stub_model(engine, max(batch_sizes), max(8192, args.prompt_len))
        tokenizer = args.tokenizer.name if args.tokenizer is not None else "tiny"
        print(
            f"vocab {engine.vocab_size}, tokenizer {tokenizer}, prompt {args.prompt_len} tokens, "
            f"{args.steps} decode steps, sampling {args.sampling}, torch threads {torch.get_num_threads()}"
        )
        rows = []
        for i, batch in enumerate(batch_sizes):
            profiler = cProfile.Profile() if args.profile and batch == max(batch_sizes) else None
            if profiler is not None:
                profiler.enable()
            rows.append(run_batch(engine, timer, batch, args.prompt_len, args.steps, SAMPLING[args.sampling], i))
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(str(args.profile))
        print(format_rows(rows))
        if args.json is not None:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}))


if __name__ == "__main__":
    main()
