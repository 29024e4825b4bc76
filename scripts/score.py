"""`gptoss score`: log-probabilities of given continuations after given contexts (multiple-choice evaluation).

    gptoss score items.jsonl scores.jsonl --model CKPT [--max-num-seqs 64]

Each input line: `{"id": ..., "context": "...", "continuations": ["...", "..."]}`; a context or a
continuation may also be a list of token ids. Texts are raw (no harmony rendering; special tokens written in
them are recognised). Text is split into tokens as lm-evaluation-harness does: trailing whitespace of the
context moves to the front of the continuation, then the continuation's tokens are those of
`context + continuation` after the context's own tokens, so a merge across the boundary is scored as the
model would see it. An empty context scores after `<|startoftext|>`.

Each output line: `{"id", "logprobs": [sum per continuation], "token_logprobs": [[per token], ...],
"is_greedy": [bool, ...], "num_tokens": [int, ...]}` (`is_greedy`: every continuation token is the argmax
at its position, ties counting as greedy), in input order. Nothing is generated: every (context,
continuation) pair is one pass of the model over its tokens, many pairs at once. Bad lines are reported with their
line number and skipped; resuming works as for `gptoss generate` (whole lines, ids already written are
skipped).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss.scripts.generate import (
    BadLine,
    Job,
    ResultsFile,
    check_input_output,
    in_flight_limit,
    make_llm,
    make_progress,
    read_jobs,
    report_bad_line,
    run_engine,
)

SCORE_KEYS = frozenset({"id", "context", "continuations", "metadata"})


def _ids_or_text(value: Any, field_name: str, line_no: int, vocab_size: int) -> str | list[int]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        bad = [t for t in value if not 0 <= t < vocab_size]
        if bad:
            raise BadLine(line_no, f"{field_name}: token ids outside 0..{vocab_size - 1}: {bad[:5]}")
        return list(value)
    raise BadLine(line_no, f"{field_name}: must be a string or a list of token ids")


def split_tokens(
    tokenizer: Any, context: str | list[int], continuation: str | list[int], start_id: int | None
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them (see the module docstring)."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids if text else []

    if isinstance(context, str) and isinstance(continuation, str):
        stripped = context.rstrip()
        if stripped != context:
            continuation = context[len(stripped) :] + continuation
            context = stripped
        context_ids = encode(context)
        whole = encode(context + continuation)
        continuation_ids = (
            whole[len(context_ids) :] if whole[: len(context_ids)] == context_ids else encode(continuation)
        )
    else:
        context_ids = encode(context) if isinstance(context, str) else list(context)
        continuation_ids = encode(continuation) if isinstance(continuation, str) else list(continuation)
    if not context_ids and start_id is not None:
        context_ids = [start_id]
    return context_ids, continuation_ids


@dataclass
class ScoreLine:
    """One input line's continuations (their jobs finish in any order; the line is written when all have)."""

    id: str
    num_continuations: int
    extra: dict[str, Any]
    results: dict[int, tuple[float, list[float], bool]]


def build_score_jobs(
    obj: dict[str, Any], line_no: int, request_id: str, tokenizer: Any, vocab_size: int, start_id: int | None
) -> list[Job]:
    """One `Job` per continuation (prompt = context + continuation ids; only prompt logprobs computed)."""
    from gptoss.engine.sampling_params import SamplingParams

    unknown = sorted(set(obj) - SCORE_KEYS)
    if unknown:
        raise BadLine(line_no, f"unknown field(s) {', '.join(unknown)}")
    if "context" not in obj:
        raise BadLine(line_no, "context: required")
    context = _ids_or_text(obj["context"], "context", line_no, vocab_size)
    continuations = obj.get("continuations")
    if not isinstance(continuations, list) or not continuations:
        raise BadLine(line_no, "continuations: must be a non-empty list")
    params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=1)
    jobs = []
    for j, raw in enumerate(continuations):
        continuation = _ids_or_text(raw, f"continuations[{j}]", line_no, vocab_size)
        context_ids, continuation_ids = split_tokens(tokenizer, context, continuation, start_id)
        if not context_ids:
            raise BadLine(line_no, "context: empty, and the tokenizer has no <|startoftext|> to stand for it")
        if not continuation_ids:
            raise BadLine(line_no, f"continuations[{j}]: no tokens")
        extra = {"continuation_index": j, "context_len": len(context_ids)}
        jobs.append(Job(0, line_no, request_id, context_ids + continuation_ids, params, harmony=False, extra=extra))
    return jobs


def continuation_score(prompt_logprobs: list[Any], context_len: int) -> tuple[float, list[float], bool]:
    """(sum, per-token logprobs, is_greedy) of the prompt tokens after the first `context_len`."""
    entries = prompt_logprobs[context_len:]
    values = [entry.logprob for entry in entries]
    greedy = all(entry.top_logprobs and entry.logprob >= max(entry.top_logprobs.values()) for entry in entries)
    return sum(values), values, greedy


@dataclass
class ScoreSummary:
    num_lines: int
    num_bad_lines: int
    num_already_done: int
    num_run: int  # lines left to score when the run started
    num_finished: int = 0  # of those, scored
    interrupted: bool = False


def score_jsonl(
    input_path: str | Path,
    output_path: str | Path,
    llm: Any,
    *,
    max_in_flight: int,
    progress: bool = False,
    report: Callable[[BadLine], None] = report_bad_line,
) -> ScoreSummary:
    """The whole of `gptoss score`; `llm` is an `LLM` or a callable making one (see `generate_jsonl`)."""
    from gptoss.engine.tokenizer import load_tokenizer

    if callable(llm) and not hasattr(llm, "engine"):
        llm = llm()
    tokenizer = llm.tokenizer if hasattr(llm, "tokenizer") else load_tokenizer(llm.engine.args.model)
    vocab_size = llm.engine.vocab_size
    start_id = tokenizer.token_to_id("<|startoftext|>")
    bad_lines: list[BadLine] = []
    lines: dict[str, ScoreLine] = {}
    all_jobs: list[Job] = []

    def on_bad(bad: BadLine) -> None:
        bad_lines.append(bad)
        report(bad)

    def build(obj: dict[str, Any], line_no: int, request_id: str) -> Job:
        jobs = build_score_jobs(obj, line_no, request_id, tokenizer, vocab_size, start_id)
        extra = {"metadata": obj["metadata"]} if "metadata" in obj else {}
        lines[request_id] = ScoreLine(request_id, len(jobs), extra, {})
        all_jobs.extend(jobs)
        return jobs[0]  # read_jobs keeps one entry per line: the input order of ids

    ordered = read_jobs(input_path, build, on_bad)
    results = ResultsFile(output_path).open()
    pending = [job for job in all_jobs if job.id not in results.done_ids]
    for index, job in enumerate(pending):
        job.index = index  # unique engine request ids
    summary = ScoreSummary(
        len(ordered),
        len(bad_lines),
        sum(1 for j in ordered if j.id in results.done_ids),
        len({job.id for job in pending}),
    )

    def on_finished(job: Job, out: Any) -> None:
        line = lines[job.id]
        if out.error or out.prompt_logprobs is None:
            line.results[job.extra["continuation_index"]] = (float("nan"), [], False)
            line.extra["error"] = out.error or "no prompt logprobs returned"
        else:
            line.results[job.extra["continuation_index"]] = continuation_score(
                out.prompt_logprobs, job.extra["context_len"]
            )
        if len(line.results) == line.num_continuations:
            scores = [line.results[j] for j in range(line.num_continuations)]
            record = {
                "id": line.id,
                "logprobs": [s[0] for s in scores],
                "token_logprobs": [s[1] for s in scores],
                "is_greedy": [s[2] for s in scores],
                "num_tokens": [len(s[1]) for s in scores],
                **line.extra,
            }
            results.append(record)
            summary.num_finished += 1

    bar = make_progress(len(pending), progress, unit="seq")
    try:
        run_engine(
            llm.engine,
            pending,
            on_finished,
            max_in_flight=max_in_flight,
            progress=bar,
            count_tokens=lambda out: out.num_prompt_tokens if out.finished else 0,
        )
    except KeyboardInterrupt:
        results.close()
        summary.interrupted = True
        return summary
    finally:
        if bar is not None:
            bar.close()
    results.finalize([job.id for job in ordered])
    return summary


def run_score(args: argparse.Namespace) -> int:
    from gptoss.scripts.engine_flags import progress_enabled

    check_input_output(args.input, args.output, "items to score", "scores")
    summary = score_jsonl(
        args.input,
        args.output,
        lambda: make_llm(args),
        max_in_flight=in_flight_limit(args.max_num_seqs, args.max_num_waiting),
        progress=progress_enabled(args),
    )
    print(
        f"{summary.num_lines} lines ({summary.num_bad_lines} bad lines skipped): {summary.num_already_done} "
        f"were already in {args.output}, {summary.num_finished} of {summary.num_run} others scored",
        file=sys.stderr,
    )
    if summary.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 1 if summary.num_bad_lines and args.strict else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `gptoss score` to the `gptoss` command line."""
    from gptoss.scripts.engine_flags import add_engine_arguments

    parser = subparsers.add_parser(
        "score",
        help="log-probabilities of continuations given contexts (multiple-choice evaluation), JSONL in and out",
        description=__doc__,
    )
    parser.add_argument("input", type=Path, help='JSONL: {"id", "context", "continuations": [...]}')
    parser.add_argument("output", type=Path, help="JSONL of scores (appended to and resumed if it exists)")
    add_engine_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a terminal)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when any input line was bad")
    parser.set_defaults(handler=run_score)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
