"""Loading a Hugging Face gpt-oss checkpoint folder into a `GptOssModel`, or filling it with random weights.

Shards are found through `model.safetensors.index.json` (or a single `model.safetensors`). All headers are
checked first, so a bad checkpoint fails at once with one error naming every missing, unexpected or
mis-shaped tensor. Then tensors stream one at a time from disk to the device: host memory holds one tensor,
never the whole checkpoint (65 GB for 120b). MXFP4 expert tensors are copied as the uint8 bytes they are.
With tensor parallelism each layer's `weight_loader` reads only its rank's slice (`safe_open(...).get_slice`),
so a rank's host memory never holds a whole sharded tensor either.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from gptoss.engine.model.checkpoint_layout import TensorSpec, checkpoint_tensor_specs, random_tensor
from gptoss.engine.model.gpt_oss import GptOssModel
from gptoss.engine.model.parallel_layers import load_parameter
from safetensors import safe_open
from tqdm import tqdm

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: every problem is listed in the message."""


def checkpoint_shards(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Map each tensor name to the shard file that holds it."""
    checkpoint_dir = Path(checkpoint_dir)
    index_path = checkpoint_dir / INDEX_FILE
    if index_path.is_file():
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: not a safetensors index (JSON with a weight_map)") from None
        shards = {name: checkpoint_dir / file for name, file in weight_map.items()}
        missing_files = sorted({str(p.name) for p in shards.values() if not p.is_file()})
        if missing_files:
            raise CheckpointError(f"{index_path} names shard files that do not exist: {missing_files}")
        return shards
    files = [checkpoint_dir / SINGLE_FILE] if (checkpoint_dir / SINGLE_FILE).is_file() else []
    files = files or sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no {INDEX_FILE} or *.safetensors in {checkpoint_dir}")
    shards = {}
    for file in files:
        check_shard_file(file)
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shards[name] = file
    return shards


def check_shard_file(file: Path) -> None:
    """CheckpointError naming `file` when it is not a whole safetensors file: its header must parse and the file
    must be as long as the header's last tensor ends (a download cut short fails here, before loading)."""
    hint = "re-download it (or re-run make-checkpoint)"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise CheckpointError(f"{file}: truncated ({size} bytes, header cut off); {hint}")
            header = json.loads(f.read(header_len))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: not a safetensors file (unreadable header); {hint}") from None
    try:
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):
        raise CheckpointError(f"{file}: not a safetensors file (malformed header); {hint}") from None
    expected = 8 + header_len + data_end
    if size < expected:
        raise CheckpointError(f"{file}: truncated ({size} bytes, its header needs {expected}); {hint}")


def _stored_shapes(shards: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype string of every tensor, from the shard headers only (no tensor data read)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in shards.items():
        by_file.setdefault(file, []).append(name)
    stored = {}
    for file, names in by_file.items():
        check_shard_file(file)
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                tensor_slice = f.get_slice(name)
                stored[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
    return stored


def validate_checkpoint(shards: dict[str, Path], specs: list[TensorSpec]) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped or mis-typed tensor."""
    stored = _stored_shapes(shards)
    expected = {spec.name: spec for spec in specs}
    problems = []
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    for name in sorted(set(expected) & set(stored)):
        shape, dtype = stored[name]
        spec = expected[name]
        if shape != spec.shape:
            problems.append(f"{name}: shape {list(shape)}, expected {list(spec.shape)}")
        packed = spec.dtype == torch.uint8
        if packed and dtype != "U8":
            problems.append(f"{name}: dtype {dtype}, expected U8 (packed MXFP4)")
        if not packed and dtype not in ("BF16", "F16", "F32"):
            problems.append(f"{name}: dtype {dtype}, expected a float type")
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(problems))


def _iter_checkpoint(shards: dict[str, Path]) -> Iterator[tuple[str, Any]]:
    """(name, safetensors slice) of every tensor, shard file by shard file; nothing is read until sliced."""
    by_file: dict[Path, list[str]] = {}
    for name, file in shards.items():
        by_file.setdefault(file, []).append(name)
    for file in sorted(by_file):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in by_file[file]:
                yield name, f.get_slice(name)


# An e8m0 scale byte of 0xFF is NaN (OCP MX spec); dequantised as an exponent it would be 2^128 = inf.
E8M0_NAN = 0xFF


def _count_non_finite(name: str, param: torch.Tensor) -> torch.Tensor:
    """How many of a loaded parameter's values are NaN or infinite (a 0-dim tensor on the parameter's device):
    float tensors directly, MXFP4 scales by their NaN byte. Packed fp4 blocks are always finite."""
    if param.dtype.is_floating_point:
        return (~torch.isfinite(param)).sum()
    if name.endswith("_scales"):
        return (param == E8M0_NAN).sum()
    return torch.zeros((), dtype=torch.int64, device=param.device)


def load_weights(
    model: GptOssModel, checkpoint_dir: str | Path, progress: bool = True, check_finite: bool = True
) -> None:
    """Copy every checkpoint tensor (this rank's share of it) into the model's parameter of the same name.

    With `check_finite`, every value is checked as it lands (on the device, read back once at the end): a NaN
    or infinity in a weight would make every request fail later, so it fails the load here, naming the
    tensors. Skipping the check saves one pass over the weights.
    """
    shards = checkpoint_shards(checkpoint_dir)
    specs = checkpoint_tensor_specs(model.config)
    validate_checkpoint(shards, specs)
    params = dict(model.named_parameters())
    non_finite: dict[str, torch.Tensor] = {}
    with tqdm(
        total=sum(p.nbytes for p in model.parameters()),  # this rank's share
        unit="B",
        unit_scale=True,
        desc="loading weights",
        disable=not progress,
        leave=False,
    ) as bar:
        for name, tensor_slice in _iter_checkpoint(shards):
            load_parameter(model, name, tensor_slice)
            if check_finite:
                non_finite[name] = _count_non_finite(name, params[name])
            bar.update(params[name].nbytes)
    if non_finite:
        counts = dict(zip(non_finite, torch.stack(list(non_finite.values())).tolist(), strict=True))
        bad = [f"{name}: {count} of {params[name].numel()}" for name, count in sorted(counts.items()) if count]
        if bad:
            raise CheckpointError(
                f"non-finite values (NaN or infinity) in {len(bad)} tensors of {checkpoint_dir} "
                "(a corrupt or mis-converted checkpoint):\n  " + "\n  ".join(bad)
            )
    model.finish_loading()  # fused q/k/v weight; MoE weights in the Triton kernel's layout when it runs


def randomize_weights(model: GptOssModel, seed: int = 0) -> None:
    """Fill the model with random weights as the checkpoint maker draws them, directly on its device
    (no file, no host copy): how full-size benchmarks run without a checkpoint."""
    device = model.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for spec in checkpoint_tensor_specs(model.config):
        # Every rank draws the full tensor from the same seed and keeps its share: all ranks agree.
        load_parameter(model, spec.name, random_tensor(spec, generator, device))
    model.finish_loading()  # fused q/k/v weight; MoE weights in the Triton kernel's layout when it runs
