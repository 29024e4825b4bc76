"""The engine's command-line flags, shared by `gptoss serve`, `generate`, `score` and `bench latency`.

`--model PATH` is a Hugging Face checkpoint folder. Without it: with `--random-weights`, a `--preset`'s full-size
weights drawn on the device (no file); otherwise the tiny random checkpoint, made once in the cache folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from gptoss.engine.engine_args import DTYPE_NAMES, KERNEL_BACKENDS, EngineArgs
from gptoss.engine.model.config import PRESETS
from gptoss.scripts.errors import UsageError

# Threads torch uses on the CPU when --num-threads is not given, at most: small decode steps gain little from
# more, and every further thread competes with the engine loop, the server and other processes.
MAX_DEFAULT_THREADS = 4


def dtype_name(text: str) -> str:
    """An argparse type: a dtype name this engine runs (`auto`, bfloat16, float16, float32 or an alias)."""
    if text != "auto" and text not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is not supported; choose auto, bfloat16, float16 or float32")
    return text


def device_name(text: str) -> str:
    """An argparse type: `auto`, `cpu`, `cuda` or `cuda:N` (whether that device exists is checked later)."""
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu") or (kind == "cuda" and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = EngineArgs(model="")
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model",
        default=None,
        help="Hugging Face checkpoint folder (config.json, tokenizer.json, *.safetensors); "
        "default: a tiny random checkpoint made once in ~/.cache/gptoss-engine",
    )
    group.add_argument(
        "--tokenizer", default=None, help="tokenizer.json (or its folder) to use instead of the checkpoint's"
    )
    group.add_argument(
        "--random-weights",
        action="store_true",
        help="draw random weights on the device instead of loading them (benchmarks); with --preset",
    )
    group.add_argument(
        "--preset", default="gpt-oss-120b", choices=sorted(PRESETS), help="model shape for --random-weights"
    )
    group.add_argument(
        "--dtype",
        type=dtype_name,
        default=defaults.dtype,
        help="weights and activations: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32",
    )
    group.add_argument(
        "--kv-cache-dtype",
        type=dtype_name,
        default=defaults.kv_cache_dtype,
        help="KV cache elements: auto (the model's dtype), bfloat16, float16, float32",
    )
    group.add_argument("--device", type=device_name, default=defaults.device, help="auto, cuda, cuda:N or cpu")
    group.add_argument(
        "--num-threads",
        type=positive_int,
        default=None,
        help=f"torch threads on the CPU; default: free cores (cores minus the load average), at most "
        f"{MAX_DEFAULT_THREADS} and at least 1, or $OMP_NUM_THREADS when set",
    )
    group.add_argument("--block-size", type=positive_int, default=defaults.block_size, help="tokens per KV block")
    group.add_argument(
        "--num-blocks", type=positive_int, default=None, help="KV blocks per pool (default: sized from memory)"
    )
    group.add_argument(
        "--kv-cache-gb",
        type=float,
        default=None,
        help="KV cache size in GiB (default: the GPU's free memory, see --gpu-memory-utilization; 1 on CPU)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=defaults.gpu_memory_utilization,
        help="fraction of the GPU's memory for weights + KV cache",
    )
    group.add_argument(
        "--cpu-expert-cache-gb",
        type=float,
        default=defaults.cpu_expert_cache_gb,
        help="on CPU, GiB of dequantised MXFP4 experts kept between steps (0: dequantise every step)",
    )
    group.add_argument("--max-num-seqs", type=positive_int, default=defaults.max_num_seqs, help="sequences per step")
    group.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=defaults.max_num_batched_tokens,
        help="tokens per step (prompt chunks + decodes)",
    )
    group.add_argument(
        "--max-model-len",
        type=positive_int,
        default=None,
        help="longest prompt + output in tokens (default: the model's max_position_embeddings)",
    )
    group.add_argument(
        "--max-num-waiting",
        type=positive_int,
        default=defaults.max_num_waiting,
        help="requests queued beyond the running batch before new ones are refused",
    )
    group.add_argument(
        "--no-prefix-caching", dest="enable_prefix_caching", action="store_false", help="disable prefix reuse"
    )
    group.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=defaults.batch_invariant,
        help="bit-identical results whatever the batch, on one GPU or one CPU thread (default on)",
    )
    group.add_argument(
        "--kernel-backend",
        default=defaults.kernel_backend,
        choices=KERNEL_BACKENDS,
        help="auto: Triton kernels on CUDA, torch references on CPU; triton: Triton everywhere (on CPU through "
        "the Triton interpreter, slow: for checking the kernels); torch: the references everywhere",
    )
    group.add_argument("--seed", type=int, default=defaults.seed, help="generator of unseeded sampling")
    group.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    group.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=defaults.tensor_parallel_size,
        help="GPUs one replica is split over (worker processes are started here; under torchrun, the world size)",
    )
    group.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=defaults.data_parallel_size,
        help="engine replicas behind the server (gptoss serve), each a process on its own tensor-parallel-size GPUs",
    )
    group.add_argument(
        "--skip-weight-check",
        dest="check_weights",
        action="store_false",
        help="do not check the loaded weights for NaN/infinity (saves one pass over them)",
    )
    return parser


def resolve_model_path(args: argparse.Namespace) -> str:
    """The checkpoint folder the flags name, making the tiny default or a config-only folder as needed.

    A named folder or tokenizer that does not exist is a `UsageError` (before anything is written)."""
    from gptoss.engine.model.random_checkpoint import ensure_default_checkpoint, ensure_preset_config_dir

    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer:
        check_tokenizer_path(tokenizer, "--tokenizer")
    if args.model:
        return str(check_model_dir(args.model))
    if args.random_weights:
        return str(ensure_preset_config_dir(args.preset, tokenizer))
    return str(ensure_default_checkpoint())


def check_model_dir(model: str | Path) -> Path:
    """`--model`'s folder, or a UsageError saying what is wrong with it."""
    path = Path(model).expanduser()
    hint = "--model takes a Hugging Face checkpoint folder (config.json, tokenizer.json, *.safetensors)"
    if not path.exists():
        raise UsageError(f"--model {model}: no such folder; {hint}, or leave --model out for a tiny random one")
    if not path.is_dir():
        raise UsageError(f"--model {model}: not a folder; {hint}")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {model}: no config.json in it; {hint}")
    return path


def check_tokenizer_path(tokenizer: str | Path, flag: str) -> Path:
    """A tokenizer.json file, or a folder holding one, or a UsageError."""
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{flag} {tokenizer}: no such file; give a tokenizer.json or the folder that holds it")
    return path


def check_device(device: str) -> None:
    """A UsageError when `device` names a CUDA device this torch cannot use."""
    if not device.startswith("cuda"):
        return
    import torch

    if torch.version.cuda is None and not torch.cuda.is_available():
        why = f"this torch ({torch.__version__}) is a CPU-only build"
        raise UsageError(f"--device {device}: {why}; use --device cpu, or install a CUDA build of torch")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is visible; use --device cpu")
    _, _, index = device.partition(":")
    if index and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"--device {device}: there are {count} CUDA device(s); use cuda:0 to cuda:{count - 1}")


def default_num_threads() -> tuple[int, str]:
    """(threads, why): $OMP_NUM_THREADS when set; else the cores not busy (cores this process may use minus
    the 1-minute load average), at most MAX_DEFAULT_THREADS, at least 1. torch's own default (one thread per
    core) oversubscribes a shared machine: each step then waits for its slowest thread."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), "from $OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = int(cores - load)
    threads = max(1, min(MAX_DEFAULT_THREADS, free))
    return threads, f"{cores} cores, load {load:.1f}"


def configure_threads(args: argparse.Namespace) -> int:
    """Set torch's CPU thread count from --num-threads (or the default) and say which, on stderr."""
    import torch

    requested = getattr(args, "num_threads", None)
    threads, why = (requested, "--num-threads") if requested else default_num_threads()
    torch.set_num_threads(threads)
    if not requested:
        why += "; --num-threads N to change"
    print(f"cpu threads: {threads} ({why})", file=sys.stderr)
    return threads


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars: on unless --no-progress, or stderr is not a terminal (a log file gets no bar lines)."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def engine_args_from_cli(args: argparse.Namespace, **overrides: object) -> EngineArgs:
    """`EngineArgs` from parsed flags (every EngineArgs field present on `args`), with the model path resolved,
    the device checked and torch's thread count set. Bad values are UsageErrors naming the flag."""
    names = {field.name for field in dataclasses.fields(EngineArgs)}
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    kwargs["model"] = resolve_model_path(args)
    kwargs["load_progress"] = progress_enabled(args)
    kwargs.update(overrides)
    try:
        engine_args = EngineArgs(**kwargs)
    except ValueError as exc:
        message = str(exc)
        field_name = message.split(" ", 1)[0]
        if field_name in names:  # say it with the flag's spelling
            message = f"--{field_name.replace('_', '-')}{message[len(field_name) :]}"
        raise UsageError(message) from None
    check_device(engine_args.device)
    configure_threads(args)
    return engine_args
