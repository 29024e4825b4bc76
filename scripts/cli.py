"""`gptoss`: the command line. Each subcommand parses its flags here and hands off to the module that does it.

gptoss serve [--model PATH]          the HTTP server (no --model: a tiny random checkpoint, made once)
gptoss make-checkpoint OUT           random weights in the Hugging Face layout
gptoss generate IN.jsonl OUT.jsonl   offline batch generation (resumable)
gptoss score IN.jsonl OUT.jsonl      log-probabilities of continuations (multiple-choice evaluation)
gptoss bench serve | latency         load-test a server; the engine alone against its roofline
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gptoss.engine.model.config import PRESETS, preset
from gptoss.scripts import bench_latency, bench_serve, generate, score
from gptoss.scripts.engine_flags import add_engine_arguments, engine_args_from_cli, progress_enabled
from gptoss.scripts.errors import USAGE, describe

# Nothing here imports torch: `gptoss --help` stays fast. Each command imports what it runs.

Handler = Callable[[argparse.Namespace], int]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every flag's default after its help, unless there is none to show (None, a
    switch that is off) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help_text:
            return help_text
        return super()._get_help_string(action) or help_text


class Parser(argparse.ArgumentParser):
    """`argparse` with the formatter above, and usage mistakes reported in one line (exit status 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _make_checkpoint(args: argparse.Namespace) -> int:
    from gptoss.engine.model.loader import INDEX_FILE
    from gptoss.scripts.engine_flags import check_tokenizer_path
    from gptoss.scripts.errors import UsageError

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: is a file; give a folder to write the checkpoint into")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(f"{out}: folder exists and is not empty; choose another or add --overwrite")
        # The new index must not sit beside shards of an older checkpoint.
        for stale in [*out.glob("*.safetensors"), out / INDEX_FILE]:
            stale.unlink(missing_ok=True)
    if args.tokenizer is not None:
        check_tokenizer_path(args.tokenizer, "--tokenizer")
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
    try:
        config = config.replace(**overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = make_random_checkpoint(
        args.out,
        config,
        seed=args.seed,
        tokenizer_path=args.tokenizer,
        max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
        progress=progress_enabled(args),
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
    parser.add_argument("out", type=Path, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (also off when not a terminal)")
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
    from gptoss.engine.worker.tp_worker import is_torchrun_worker, run_worker_from_env
    from gptoss.scripts.errors import UsageError
    from gptoss.server.flags import port_problem

    if is_torchrun_worker():  # ranks > 0 of a torchrun launch execute rank 0's step plans; rank 0 serves
        run_worker_from_env(engine_args_from_cli(args))
        return 0
    problem = port_problem(args.host, args.port)  # before minutes of loading, not after
    if problem is not None:
        raise UsageError(f"--host/--port: {problem}; stop what uses it or choose another --port")
    model_given = bool(args.model)
    engine_args = engine_args_from_cli(args)
    args.model = engine_args.model  # the server reads the tokenizer from the resolved folder
    from gptoss.engine.async_engine import AsyncEngine
    from gptoss.engine.data_parallel import DataParallelEngine
    from gptoss.server.app import run_server

    engine = DataParallelEngine(engine_args) if engine_args.data_parallel_size > 1 else AsyncEngine(engine_args)
    for llm_engine in getattr(engine, "engines", None) or [engine.engine]:
        llm_engine.add_fatal_listener(lambda reason, e=llm_engine: _exit_soon(e, reason))
    print(serve_banner(args, engine, model_given), file=sys.stderr, flush=True)
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


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 / 100 else f"{num_bytes / 2**20:.1f} MiB"


def serve_banner(args: argparse.Namespace, engine: Any, model_given: bool) -> str:
    """What `gptoss serve` is about to serve: model, device, dtype, memory, batch, URL (per rank and replica:
    the first replica's rank 0)."""
    engines = getattr(engine, "engines", None) or [engine.engine]
    llm_engine = engines[0]
    runner = llm_engine.runner
    if args.random_weights and not model_given:
        source = f"preset {args.preset}, random weights drawn on the device (no checkpoint)"
    elif model_given:
        source = f"checkpoint {args.model}"
    else:
        source = f"tiny random checkpoint {args.model} (answers are noise; --model PATH serves a real one)"
    config = llm_engine.config
    kv_dtype = str(runner.kv_caches[0][0].dtype).removeprefix("torch.") if runner.kv_caches else "-"
    host = args.host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{args.port}"
    where = " (every interface)" if host in ("0.0.0.0", "::") else ""
    return "\n".join(
        [
            f"gptoss serve: {source}",
            f"  model      {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_local_experts} experts (top {config.num_experts_per_tok}), vocab {config.vocab_size}",
            f"  device     {runner.device}, dtype {str(runner.dtype).removeprefix('torch.')}"
            + (f", tensor parallel {runner.parallel.world_size}" if runner.parallel.world_size > 1 else "")
            + (f", {len(engines)} data-parallel replicas" if len(engines) > 1 else ""),
            f"  memory     weights {_gib(runner.weight_bytes)}, KV cache {_gib(runner.kv_cache_bytes)} ({kv_dtype})",
            f"  batch      max {llm_engine.args.max_num_seqs} sequences, max {llm_engine.max_model_len} tokens each",
            f"  listening  {url}{where} as model {args.served_model_name!r}; "
            f"API key {'required' if args.api_key else 'not required'}",
        ]
    )


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    from gptoss.server.flags import add_serve_arguments

    parser = subparsers.add_parser(
        "serve",
        help="the HTTP server: OpenAI Chat Completions, Responses, Workers AI run",
        description="Serve a checkpoint over HTTP. With no --model, a tiny random checkpoint (made once).",
    )
    add_engine_arguments(parser)
    add_serve_arguments(parser)
    parser.add_argument(
        "--no-progress", action="store_true", help="no loading progress bar (also off when not a terminal)"
    )
    parser.set_defaults(handler=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gptoss", description="Local inference engine for gpt-oss-120b / 20b.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    _add_make_checkpoint(subparsers)
    generate.register(subparsers)
    score.register(subparsers)
    bench = subparsers.add_parser("bench", help="benchmarks: serve (load-test a server), latency (the engine alone)")
    bench_subparsers = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve.register(bench_subparsers)
    bench_latency.register(bench_subparsers)
    _add_debug_flag(parser, top=True)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """`--debug` on every (sub)command: before or after the command name."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,  # a subcommand's must not reset the top-level one
        help="show the full traceback of an error instead of one line",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in dict.fromkeys(action.choices.values()):
                _add_debug_flag(subparser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or os.environ.get("GPTOSS_DEBUG"):
            raise
        message, code = describe(exc)
        command = " ".join(part for part in ("gptoss", args.command, getattr(args, "bench_command", None)) if part)
        print(f"{command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
