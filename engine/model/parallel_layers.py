"""Layers that hold one rank's share of a weight and load exactly that share (nano-vllm style).

Each layer takes its `rank` and `world_size` and has a `weight_loader(param, loaded)` that copies its slice of
the checkpoint tensor `loaded` into `param`. `loaded` is anything sliceable like a tensor: a safetensors slice
(`safe_open(...).get_slice(name)`, which reads only the bytes of the slice asked for, so no rank holds a full
tensor in host memory) or a tensor (random weights drawn on the device). Parameters without a layer loader
are replicated and copied whole (`load_parameter`).

Splits (N = world size):
- attention: q heads split evenly (column-parallel q_proj, the sinks with them); KV heads split evenly, or,
  when N exceeds their count, each rank keeps the one KV head its query heads read (replicated over
  N / num_kv_heads ranks); o_proj row-parallel (input columns split), its partial sums reduced once;
- vocabulary: embedding and unembedding rows split in N equal parts, the last padded with zero rows;
- experts: `num_local_experts / N` whole experts per rank (the MXFP4 width, 90 blocks of 32 at 120b, does
  not split over 4 or 8 ranks; whole experts do).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from gptoss.engine.distributed.collectives import gather_last_dim, reduce_sum
from gptoss.engine.model import ops
from gptoss.engine.model.config import ModelConfig
from torch import nn


def even_shard(size: int, rank: int, world_size: int, what: str) -> tuple[int, int]:
    """(start, length) of rank's equal share of `size` items; raises if they do not split evenly."""
    if size % world_size:
        raise ValueError(f"{size} {what} do not split over {world_size} ranks")
    length = size // world_size
    return rank * length, length


def kv_heads_per_rank(config: ModelConfig, world_size: int) -> int:
    """KV heads each rank holds (and caches): an equal share, or one replicated head when there are fewer
    KV heads than ranks."""
    kv = config.num_key_value_heads
    if kv % world_size and world_size % kv:
        raise ValueError(f"{kv} KV heads neither split over nor replicate onto {world_size} ranks")
    return max(1, kv // world_size)


def attention_heads(config: ModelConfig, rank: int, world_size: int) -> tuple[int, int, int, int]:
    """(first q head, q heads, first KV head, KV heads) of `rank`.

    Query head j reads KV head j // (Hq / Hkv). With N <= Hkv each rank's q heads read exactly its KV heads;
    with N > Hkv (N a multiple of Hkv) rank r's q heads all read KV head r * Hkv // N, which it holds alone.
    """
    q_start, q_heads = even_shard(config.num_attention_heads, rank, world_size, "attention heads")
    kv_heads = kv_heads_per_rank(config, world_size)
    kv_start = rank * config.num_key_value_heads // world_size
    return q_start, q_heads, kv_start, kv_heads


def load_parameter(model: nn.Module, name: str, loaded: Any) -> None:
    """Copy checkpoint tensor `name` (a safetensors slice or a tensor) into `model`: through the owning
    layer's `weight_loader` when it has one (its shard), whole otherwise (a replicated parameter)."""
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = getattr(module, param_name)
    loader = getattr(module, "weight_loader", None)
    if loader is None:
        param.copy_(loaded[:])
    else:
        loader(param, loaded)


class ColumnParallelLinear(nn.Linear):
    """Output rows `[start, start + out_features)` of a `[full_out, in]` weight and its bias."""

    def __init__(self, in_features: int, out_features: int, start: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.requires_grad_(False)
        self.start = start

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        param.copy_(loaded[self.start : self.start + param.shape[0]])


class RowParallelLinear(nn.Linear):
    """Input columns `[start, start + in_features)` of a `[out, full_in]` weight; the whole bias, added once to
    the sum over ranks. `forward` returns that sum (the layer's one reduction)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        start: int,
        dtype: torch.dtype,
        world_size: int,
        group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__(in_features, out_features, bias=True, dtype=dtype)
        self.requires_grad_(False)
        self.start = start
        self.world_size = world_size
        self.group = group

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        if param is self.weight:
            param.copy_(loaded[:, self.start : self.start + param.shape[1]])
        else:
            param.copy_(loaded[:])

    def forward(self, x: torch.Tensor, batch_invariant: bool = True, backend: str = "auto") -> torch.Tensor:
        """`x` `[T, in]` (this rank's columns) -> `[T, out]`, the full product on every rank."""
        if self.world_size == 1:
            return ops.linear(x, self.weight, self.bias, batch_invariant, backend=backend)
        # Partials stay fp32 through the reduction, so the result is rounded once, as on one GPU.
        partial = ops.linear(x, self.weight, None, batch_invariant, out_dtype=torch.float32, backend=backend)
        total = reduce_sum(partial, self.world_size, self.group, fixed_order=batch_invariant)
        return (total + self.bias.to(torch.float32)).to(x.dtype)


def vocab_shard(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first token id, rows per rank): ceil(V / N) rows each; the last rank's tail rows are padding."""
    rows = -(-vocab_size // world_size)
    return rank * rows, rows


def _load_vocab_rows(param: nn.Parameter, loaded: Any, start: int) -> None:
    """Rows `[start, start + len(param))` of a `[V, H]` tensor; rows past V (padding) are zeroed."""
    vocab_size = loaded.get_shape()[0] if hasattr(loaded, "get_shape") else loaded.shape[0]
    end = min(start + param.shape[0], vocab_size)
    param[: end - start].copy_(loaded[start:end])
    param[end - start :].zero_()


class _VocabRows(nn.Module):
    """Rows `[start, start + ceil(V / N))` of a `[V, H]` vocabulary matrix (the last rank's tail zero-padded)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup | None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.start, rows = vocab_shard(vocab_size, rank, world_size)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype), requires_grad=False)
        self.world_size = world_size
        self.group = group

    def weight_loader(self, param: nn.Parameter, loaded: Any) -> None:
        _load_vocab_rows(param, loaded, self.start)


class VocabParallelEmbedding(_VocabRows):
    """Token embeddings, rows split over ranks; each rank embeds the ids it holds, zeros elsewhere, and one sum
    over ranks assembles the rows. That sum adds exact zeros to one value, so its order cannot matter."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[T]` token ids -> `[T, H]`."""
        if self.world_size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        x = nn.functional.embedding(torch.where(mine, local, 0), self.weight)
        x = x * mine.unsqueeze(-1).to(x.dtype)
        return reduce_sum(x, self.world_size, self.group, fixed_order=False)


class ParallelLMHead(_VocabRows):
    """The unembedding, vocabulary rows split over ranks; `forward` gathers every rank's logits."""

    def forward(self, hidden: torch.Tensor, batch_invariant: bool = True, backend: str = "auto") -> torch.Tensor:
        """`[N, H]` -> `[N, V]` fp32 logits, on every rank (each column computed by one rank: no sum)."""
        logits = ops.linear(hidden, self.weight, None, batch_invariant, out_dtype=torch.float32, backend=backend)
        if self.world_size == 1:
            return logits
        logits = gather_last_dim(logits, self.world_size, self.group)
        return logits if logits.shape[1] == self.vocab_size else logits[:, : self.vocab_size].contiguous()
