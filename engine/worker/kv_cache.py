"""Allocation of the paged KV cache tensors and their size arithmetic.

Layout per layer (see kernels/reference.py): `k_cache`, `v_cache` each `[num_blocks, num_kv_heads, block_size,
head_dim]`. Layers of one type share a block pool (same block ids), so `num_blocks` is given per layer type.
"""

from __future__ import annotations

import torch
from gptoss.engine.model.config import ModelConfig
from gptoss.engine.model.parallel_layers import kv_heads_per_rank

KVCache = tuple[torch.Tensor, torch.Tensor]


def kv_bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype, world_size: int = 1, layer_type: str | None = None
) -> int:
    """Bytes one block id costs across all layers (of `layer_type`, or all layers), K and V, on one rank."""
    num_layers = sum(1 for t in config.layer_types if layer_type is None or t == layer_type)
    per_layer = 2 * kv_heads_per_rank(config, world_size) * block_size * config.head_dim
    return num_layers * per_layer * torch.empty((), dtype=dtype).element_size()


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int | dict[str, int],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    world_size: int = 1,
) -> list[KVCache]:
    """One zeroed (k_cache, v_cache) pair per layer for one rank's KV heads; `num_blocks` per layer type or one
    number for all."""
    kv_heads = kv_heads_per_rank(config, world_size)
    caches: list[KVCache] = []
    for layer_type in config.layer_types:
        blocks = num_blocks[layer_type] if isinstance(num_blocks, dict) else num_blocks
        shape = (blocks, kv_heads, block_size, config.head_dim)
        caches.append((torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)))
    return caches
