"""`gptoss make-checkpoint`: random gpt-oss weights in exactly the Hugging Face layout.

The folder holds `config.json`, `generation_config.json`, `tokenizer.json`, `model.safetensors.index.json` and
the shards, with MXFP4 experts as `*_blocks` / `*_scales` uint8 tensors. transformers loads it as it loads
`openai/gpt-oss-120b`, which is what makes it a fair oracle in tests. Tensors are drawn and written shard by
shard, so even a full-size preset never sits in memory whole.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from gptoss.engine.model.checkpoint_layout import checkpoint_tensor_specs, random_tensor
from gptoss.engine.model.config import ModelConfig, preset
from gptoss.engine.model.loader import INDEX_FILE
from gptoss.engine.tokenizer import build_tiny_tokenizer, load_tokenizer, special_token_id
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 4 << 30
# Bump when the tiny preset or the random draw changes, so stale cached checkpoints are not reused.
DEFAULT_CHECKPOINT_VERSION = 1


def make_random_checkpoint(
    out_dir: str | Path,
    config: ModelConfig,
    seed: int = 0,
    tokenizer_path: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    write_weights: bool = True,
    progress: bool = False,
) -> Path:
    """Write a random checkpoint of `config` to `out_dir`; returns the folder.

    With `write_weights=False` only the config, generation config and tokenizer are written: what
    `--random-weights` needs to build a full-size model directly on the GPU.

    The tokenizer is the tiny byte-level BPE unless `tokenizer_path` names a `tokenizer.json` (e.g. the real
    o200k_harmony one). The config's vocabulary grows to the tokenizer's size if it is smaller, and its eos/pad
    ids are looked up by name. `progress`: a tqdm bar of the bytes written (on stderr).
    """
    out_dir = Path(out_dir)
    # The tokenizer is read before anything is written: a bad path leaves no folder behind.
    tokenizer = build_tiny_tokenizer() if tokenizer_path is None else load_tokenizer(tokenizer_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is None:
        tokenizer.save(str(out_dir / "tokenizer.json"))
    else:
        source = Path(tokenizer_path)
        shutil.copyfile(source / "tokenizer.json" if source.is_dir() else source, out_dir / "tokenizer.json")
    vocab = tokenizer.get_vocab_size()
    return_id = special_token_id(tokenizer, "<|return|>")
    call_id = special_token_id(tokenizer, "<|call|>")
    pad_id = special_token_id(tokenizer, "<|endoftext|>")
    config = config.replace(vocab_size=max(config.vocab_size, vocab), eos_token_id=return_id, pad_token_id=pad_id)
    with open(out_dir / "config.json", "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
    with open(out_dir / "generation_config.json", "w") as f:
        json.dump(
            {
                "bos_token_id": special_token_id(tokenizer, "<|startoftext|>"),
                "eos_token_id": [return_id, pad_id, call_id],
                "pad_token_id": pad_id,
                "do_sample": True,
            },
            f,
            indent=2,
        )
    if write_weights:
        _write_shards(out_dir, config, seed, max_shard_bytes, progress)
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_shards(out_dir: Path, config: ModelConfig, seed: int, max_shard_bytes: int, progress: bool) -> None:
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    specs = checkpoint_tensor_specs(config)
    # Group tensors into shards first so each file's name can carry the final shard count.
    groups: list[list] = [[]]
    group_bytes = 0
    for spec in specs:
        if groups[-1] and group_bytes + spec.num_bytes > max_shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(spec)
        group_bytes += spec.num_bytes
    weight_map: dict[str, str] = {}
    total_size = sum(spec.num_bytes for spec in specs)
    file_mode = 0o666 & ~_umask()  # as any file the user writes (safetensors creates them 0600)
    with tqdm(
        total=total_size, unit="B", unit_scale=True, desc="writing weights", disable=not progress, file=sys.stderr
    ) as bar:
        for number, group in enumerate(groups, start=1):
            file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            tensors = {spec.name: random_tensor(spec, generator) for spec in group}
            save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
            os.chmod(out_dir / file_name, file_mode)
            weight_map.update(dict.fromkeys(tensors, file_name))
            bar.update(sum(spec.num_bytes for spec in group))
            del tensors
    with open(out_dir / INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)


def default_checkpoint_dir() -> Path:
    """Where `gptoss serve` with no `--model` keeps its tiny random checkpoint."""
    cache_root = os.environ.get("GPTOSS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptoss-engine"
    )
    return Path(cache_root) / f"tiny-random-v{DEFAULT_CHECKPOINT_VERSION}"


def ensure_default_checkpoint() -> Path:
    """Make the tiny random checkpoint once (atomically: a half-written folder is never used) and return it."""
    target = default_checkpoint_dir()
    if (target / INDEX_FILE).is_file():
        return target
    return _make_atomically(target, lambda staging: make_random_checkpoint(staging, preset("tiny"), seed=0))


def ensure_preset_config_dir(preset_name: str, tokenizer_path: str | Path | None = None) -> Path:
    """A folder with a preset's config.json and a tokenizer but no weights, for `--random-weights`."""
    tokenizer_tag = "tiny-tokenizer" if tokenizer_path is None else Path(tokenizer_path).stem
    target = default_checkpoint_dir().parent / f"config-only-{preset_name}-{tokenizer_tag}"
    if (target / "config.json").is_file():
        return target
    return _make_atomically(
        target,
        lambda staging: make_random_checkpoint(
            staging, preset(preset_name), tokenizer_path=tokenizer_path, write_weights=False
        ),
    )


def _make_atomically(target: Path, make: Callable[[Path], object]) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + "-", dir=target.parent))
    make(staging)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's folder is private (0700)
    try:
        staging.rename(target)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
