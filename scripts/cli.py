"""`gptoss`: the command line. Each subcommand parses its flags here and hands off to the module that does it.

gptoss serve [--model PATH]          the HTTP server (no --model: a tiny random checkpoint, made once)
gptoss make-checkpoint OUT           random weights in the Hugging Face layout
gptoss generate IN.jsonl OUT.jsonl   offline batch generation (resumable)
gptoss score IN.jsonl OUT.jsonl      log-probabilities of continuations (multiple-choice evaluation)
gptoss bench serve | latency         load-test a server; the engine alone against its roofline
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gptoss.engine.model.config import PRESETS, preset
from gptoss.scripts import bench_latency, bench_serve, generate, score
from gptoss.scripts.engine_flags import add_engine_arguments, engine_args_from_cli

Handler = Callable[[argparse.Namespace], int]


def _make_checkpoint(args: argparse.Namespace) -> int:
    from gptoss.engine.model.random_checkpoint import make_random_checkpoint

    config = preset(args.preset)
    overrides = {
        name: getattr(args, name)
        for name in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "num_local_experts",
            "num_experts_per_tok",
            "vocab_size",
            "sliding_window",
        )
        if getattr(args, name) is not None
    }
    config = config.replace(**overrides)
    out = make_random_checkpoint(
        args.out,
        config,
        seed=args.seed,
        tokenizer_path=args.tokenizer,
        max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
    )
    print(f"wrote a random {args.preset} checkpoint to {out}")
    return 0


def _add_make_checkpoint(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-checkpoint",
        help="write a random gpt-oss checkpoint in the Hugging Face layout (MXFP4 experts)",
        description="Random weights in exactly the HF layout: config.json, index + shards, "
        "generation_config.json, tokenizer.json. Any preset, or custom sizes.",
    )
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="copy this tokenizer.json (e.g. the real o200k_harmony one) instead of the tiny BPE",
    )
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="largest shard file, in GiB")
    for name in (
        "num-hidden-layers",
        "hidden-size",
        "intermediate-size",
        "num-attention-heads",
        "num-key-value-heads",
        "head-dim",
        "num-local-experts",
        "num-experts-per-tok",
        "vocab-size",
        "sliding-window",
    ):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the preset's value")
    parser.set_defaults(handler=_make_checkpoint)


def _serve(args: argparse.Namespace) -> int:
    from gptoss.engine.async_engine import AsyncEngine
    from gptoss.engine.data_parallel import DataParallelEngine
    from gptoss.engine.worker.tp_worker import is_torchrun_worker, run_worker_from_env
    from gptoss.server.app import run_server

    engine_args = engine_args_from_cli(args, load_progress=True)
    if is_torchrun_worker():  # ranks > 0 of a torchrun launch execute rank 0's step plans; rank 0 serves
        run_worker_from_env(engine_args)
        return 0
    args.model = engine_args.model  # the server reads the tokenizer from the resolved folder
    engine = DataParallelEngine(engine_args) if engine_args.data_parallel_size > 1 else AsyncEngine(engine_args)
    for llm_engine in getattr(engine, "engines", None) or [engine.engine]:
        llm_engine.add_fatal_listener(lambda reason, e=llm_engine: _exit_soon(e, reason))
    run_server(args, engine=engine)
    return 0


# After a fatal engine error the in-flight requests have already been failed; their error responses get this
# long to go out before the process ends.
FATAL_EXIT_GRACE_S = 2.0


def _exit_soon(llm_engine: object, reason: str) -> None:
    """A tensor-parallel worker died or hung: stop the other workers and exit non-zero (a supervisor restarts
    the server). Not through uvicorn's shutdown: it re-raises SIGTERM, and a hung collective may never end."""
    import os
    import threading

    print(f"gptoss serve: {reason}; exiting with status 1 in {FATAL_EXIT_GRACE_S:.0f} s", file=sys.stderr)

    def exit_now() -> None:
        workers = getattr(llm_engine, "workers", None)
        if workers is not None:
            workers.kill()
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(FATAL_EXIT_GRACE_S, exit_now)
    timer.daemon = True
    timer.start()


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    from gptoss.server.app import add_serve_arguments

    parser = subparsers.add_parser(
        "serve",
        help="the HTTP server: OpenAI Chat Completions, Responses, Workers AI run",
        description="Serve a checkpoint over HTTP. With no --model, a tiny random checkpoint (made once).",
    )
    add_engine_arguments(parser)
    add_serve_arguments(parser)
    parser.set_defaults(handler=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss", description="Local inference engine for gpt-oss-120b / 20b.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    _add_make_checkpoint(subparsers)
    generate.register(subparsers)
    score.register(subparsers)
    bench = subparsers.add_parser("bench", help="benchmarks: serve (load-test a server), latency (the engine alone)")
    bench_subparsers = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve.register(bench_subparsers)
    bench_latency.register(bench_subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
