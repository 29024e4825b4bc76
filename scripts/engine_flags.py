"""The engine's command-line flags, shared by `gptoss serve`, `generate`, `score` and `bench latency`.

`--model PATH` is a Hugging Face checkpoint folder. Without it: with `--random-weights`, a `--preset`'s full-size
weights drawn on the device (no file); otherwise the tiny random checkpoint, made once in the cache folder.
"""

from __future__ import annotations

import argparse
import dataclasses

from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.model.config import PRESETS


def add_engine_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = EngineArgs(model="")
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--model",
        default=None,
        help="Hugging Face checkpoint folder (config.json, tokenizer.json, *.safetensors); "
        "default: a tiny random checkpoint made once in ~/.cache/gptoss-engine",
    )
    group.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's")
    group.add_argument(
        "--random-weights",
        action="store_true",
        help="draw random weights on the device instead of loading them (benchmarks); with --preset",
    )
    group.add_argument(
        "--preset", default="gpt-oss-120b", choices=sorted(PRESETS), help="model shape for --random-weights"
    )
    group.add_argument("--dtype", default=defaults.dtype, help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    group.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype)
    group.add_argument("--device", default=defaults.device, help="auto, cuda, cuda:1, cpu")
    group.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV block")
    group.add_argument("--num-blocks", type=int, default=None, help="KV blocks per pool (overrides sizing)")
    group.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size (CPU default 1 GB)")
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=defaults.gpu_memory_utilization,
        help="fraction of the GPU's memory for weights + KV cache",
    )
    group.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, help="sequences per step")
    group.add_argument(
        "--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens, help="tokens per step"
    )
    group.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (tokens)")
    group.add_argument("--max-num-waiting", type=int, default=defaults.max_num_waiting)
    group.add_argument(
        "--no-prefix-caching", dest="enable_prefix_caching", action="store_false", help="disable prefix reuse"
    )
    group.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=defaults.batch_invariant,
        help="bit-identical results whatever the batch (default on)",
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
        help="engine replicas behind the server, one GPU each (gptoss serve); requests go to the least loaded",
    )
    return parser


def resolve_model_path(args: argparse.Namespace) -> str:
    """The checkpoint folder the flags name, making the tiny default or a config-only folder as needed."""
    from gptoss.engine.model.random_checkpoint import ensure_default_checkpoint, ensure_preset_config_dir

    if args.model:
        return str(args.model)
    if args.random_weights:
        return str(ensure_preset_config_dir(args.preset, args.tokenizer))
    return str(ensure_default_checkpoint())


def engine_args_from_cli(args: argparse.Namespace, **overrides: object) -> EngineArgs:
    """`EngineArgs` from parsed flags (every EngineArgs field present on `args`), with the model path resolved."""
    names = {field.name for field in dataclasses.fields(EngineArgs)}
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    kwargs["model"] = resolve_model_path(args)
    kwargs.update(overrides)
    return EngineArgs(**kwargs)
