"""Per-step cost of structured outputs: computing the grammar bitmasks of a batch and applying them to logits.

Each request replays a realistic reply (an analysis paragraph, then the final JSON answer, tokenized whole as a
model writes it) under its schema's grammar; when it ends it starts over. Per decoding step we time:
- fill (serial): every row's bitmask computed one after the other on the calling thread;
- fill (parallel): the same with llguidance's thread pool (what `BitmaskWorker` runs, off the main thread;
  a single row takes the serial path);
- accept: feeding every row its sampled token;
- apply: host-to-device copy + unpacking + masking the `[B, V]` logits (on CUDA when available, else CPU).
Also the one-off costs: building the compiler (tokenizer import), compiling a new schema, a cache hit.

    python -m benchmarks.bench_structured_output [--steps 200] [--tokenizer PATH]

Uses shared/vocab/o200k_harmony.tokenizer.json (201,088-token vocabulary) when present, else the tiny tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from gptoss.engine.structured_output.grammar import (
    StructuredOutputCompiler,
    StructuredOutputState,
    allocate_token_bitmask,
    allowed_token_mask_for_batch,
    fill_token_bitmasks,
)
from gptoss.engine.structured_output.spec import StructuredOutputSpec
from gptoss.engine.tokenizer import build_tiny_tokenizer, load_tokenizer

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "vocab" / "o200k_harmony.tokenizer.json"
REAL_VOCAB_SIZE = 201088

ANALYSIS = (
    "The user asks for a structured answer. I should look at the question carefully, pick the relevant facts, "
    "and fill every required field with a sensible value. Numbers must be integers where the schema says so."
)
# (schema, an answer that satisfies it)
CASES: list[tuple[dict, dict]] = [
    (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 0},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["name", "age", "tags"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36, "tags": ["mathematician", "writer", "analyst"]},
    ),
    (
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "forecast": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "day": {"type": "string", "format": "date"},
                            "high": {"type": "number"},
                            "sky": {"enum": ["sunny", "cloudy", "rain"]},
                        },
                        "required": ["day", "high", "sky"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["city", "forecast"],
            "additionalProperties": False,
        },
        {
            "city": "Paris",
            "forecast": [
                {"day": "2026-11-26", "high": 9.5, "sky": "rain"},
                {"day": "2026-11-27", "high": 11, "sky": "cloudy"},
            ],
        },
    ),
    (
        {
            "anyOf": [
                {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
                {
                    "type": "object",
                    "properties": {"error": {"type": "string", "pattern": "^E[0-9]{3}$"}},
                    "required": ["error"],
                },
            ]
        },
        {"answer": "The capital of France is Paris, which is also its largest city."},
    ),
]


class Replayer:
    """One request: a state and the reply it replays, over and over."""

    def __init__(self, state: StructuredOutputState, token_ids: list[int]) -> None:
        self.state = state
        self.token_ids = token_ids
        self.position = 0

    def next_token(self) -> int:
        if self.position == len(self.token_ids):
            self.state.reset()
            self.position = 0
        token_id = self.token_ids[self.position]
        self.position += 1
        return token_id


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"{1e3 * statistics.mean(samples):7.3f} / {1e3 * p90:7.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokenizer", type=Path, default=REAL_TOKENIZER if REAL_TOKENIZER.is_file() else None)
    parser.add_argument(
        "--threads",
        type=int,
        default=max(2, min(16, (os.cpu_count() or 1) // 2)),
        help="llguidance pool size for the parallel fill (default: half the CPUs, 2..16)",
    )
    args = parser.parse_args()

    if args.tokenizer is not None:
        tokenizer, vocab_size, label = load_tokenizer(args.tokenizer), REAL_VOCAB_SIZE, args.tokenizer.name
    else:
        tokenizer = build_tiny_tokenizer()
        vocab_size, label = tokenizer.get_vocab_size(), "tiny"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # [B, V] elementwise ops: threads only contend on a small shared machine

    start = time.perf_counter()
    compiler = StructuredOutputCompiler(tokenizer, vocab_size)
    build_s = time.perf_counter() - start
    specs, replies = [], []
    compile_ms = []
    for schema, answer in CASES:
        spec = StructuredOutputSpec.from_request(
            {"type": "json_schema", "json_schema": {"schema": schema, "strict": True}}
        )
        assert spec is not None
        start = time.perf_counter()
        compiler.compile(spec)
        compile_ms.append(1e3 * (time.perf_counter() - start))
        text = (
            f"<|channel|>analysis<|message|>{ANALYSIS}<|end|><|start|>assistant"
            f"<|channel|>final<|message|>{json.dumps(answer)}<|return|>"
        )
        token_ids = tokenizer.encode(text, add_special_tokens=False).ids
        check = compiler.new_state(spec)
        assert check.accept_tokens(token_ids) and check.is_terminated(), "reply does not match its schema"
        specs.append(spec)
        replies.append(token_ids)
    start = time.perf_counter()
    for _ in range(100):
        compiler.new_state(specs[0])
    hit_us = 1e4 * (time.perf_counter() - start)

    print(
        f"tokenizer {label}, vocab {vocab_size}, logits on {device}, torch threads {torch.get_num_threads()}, "
        f"llguidance pool {args.threads} threads, {os.cpu_count()} CPUs"
    )
    print(
        f"compiler build {build_s:.2f} s; schema compile {', '.join(f'{t:.1f}' for t in compile_ms)} ms; "
        f"new_state on a cache hit {hit_us:.0f} us"
    )
    print(
        f"reply lengths {[len(r) for r in replies]} tokens; {args.steps} steps per batch size; mean / p90 ms per step"
    )
    print(f"{'batch':>5} | {'fill serial':>17} | {'fill parallel':>17} | {'accept':>17} | {'apply':>17}")

    import llguidance

    executor = llguidance.LLExecutor(args.threads)
    for batch_size in args.batch_sizes:
        timings: dict[str, list[float]] = {"serial": [], "parallel": [], "accept": [], "apply": []}
        # One pass per fill mode, each from fresh states (llguidance caches a state's mask until the next token).
        for mode in ("serial", "parallel"):
            rows = [
                Replayer(compiler.new_state(specs[i % len(specs)]), replies[i % len(specs)]) for i in range(batch_size)
            ]
            for i, row in enumerate(rows):  # stagger the rows so the batch mixes analysis and JSON positions
                for _ in range((i * 17) % len(row.token_ids)):
                    row.state.accept_token(row.next_token())
            states = [row.state for row in rows]
            bitmask = allocate_token_bitmask(batch_size, vocab_size, pin_memory=device.type == "cuda")
            logits = torch.randn(batch_size, vocab_size, device=device)
            row_ids = torch.arange(batch_size, device=device)
            for _ in range(args.steps):
                start = time.perf_counter()
                fill_token_bitmasks(states, bitmask, executor if mode == "parallel" else None)
                timings[mode].append(time.perf_counter() - start)
                if mode == "parallel":
                    start = time.perf_counter()
                    # What the model runner and the sampler do with a step's bitmask.
                    allowed = allowed_token_mask_for_batch(
                        bitmask.to(device, non_blocking=True), row_ids, batch_size, vocab_size
                    )
                    logits.masked_fill_(~allowed, float("-inf"))
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    timings["apply"].append(time.perf_counter() - start)
                start = time.perf_counter()
                for row in rows:
                    assert row.state.accept_token(row.next_token())
                timings["accept"].append(time.perf_counter() - start)
        print(
            f"{batch_size:>5} | {_ms(timings['serial'])} | {_ms(timings['parallel'])} | "
            f"{_ms(timings['accept'])} | {_ms(timings['apply'])}"
        )


if __name__ == "__main__":
    main()
