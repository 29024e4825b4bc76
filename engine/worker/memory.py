"""Memory sizing: how many KV blocks each pool gets, from the engine settings and the device.

The KV cache is sized, in order of precedence, from `num_blocks` (block ids per group), `kv_cache_gb`, or on
CUDA from free GPU memory after the weights are loaded (`gpu_memory_utilization` of the card's total, minus
what is already used and an activation reserve, which includes the decode CUDA graphs' memory pool unless
`enforce_eager`). On CPU without either, `DEFAULT_CPU_KV_CACHE_GB`.

With sliding-window layers the memory is split between two block pools: the sliding pool gets what every
running sequence needs for its window plus a prefill chunk (at most a quarter of the memory, at least a tenth,
whose surplus keeps prefix-cache entries), the full-attention pool the rest. `num_blocks` gives both pools that
many blocks.

With tensor parallelism every rank sizes its own cache the same way, from its own memory and for the KV
heads it holds (`kv_cache_gb` is per rank); the ranks then take the smallest block count of them all.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.model.config import FULL, SLIDING, ModelConfig

if TYPE_CHECKING:
    import torch

DEFAULT_CPU_KV_CACHE_GB = 1.0
# Memory kept free for activations, logits and sampler temporaries on top of an estimate from the sizes.
MIN_ACTIVATION_RESERVE_BYTES = 2 << 30


def block_groups(config: ModelConfig) -> dict[str, int | None]:
    """Block group name -> sliding window (None: full attention), for the layer types the model has."""
    groups: dict[str, int | None] = {}
    if FULL in config.layer_types:
        groups[FULL] = None
    if SLIDING in config.layer_types:
        groups[SLIDING] = config.sliding_window
    return groups


def sliding_blocks_needed(args: EngineArgs, window: int) -> int:
    """Sliding-pool blocks for every running sequence's window plus one full prefill chunk."""
    per_seq = math.ceil((window - 1) / args.block_size) + 2
    return args.max_num_seqs * per_seq + math.ceil(args.max_num_batched_tokens / args.block_size) + 1


def split_kv_budget(args: EngineArgs, config: ModelConfig, budget_bytes: int, kv_dtype: torch.dtype) -> dict[str, int]:
    """Block ids per group that fit in `budget_bytes` of KV memory."""
    from gptoss.engine.worker.kv_cache import kv_bytes_per_block

    groups = block_groups(config)
    bytes_per = {
        g: kv_bytes_per_block(config, args.block_size, kv_dtype, args.tensor_parallel_size, layer_type=g)
        for g in groups
    }
    equal = budget_bytes // sum(bytes_per.values())
    if SLIDING not in groups or FULL not in groups:
        return {g: int(equal) for g in groups}
    window = groups[SLIDING] or 1
    # In sliding blocks: what all running sequences' windows need, but at most a quarter of the memory (the
    # scheduler preempts if it runs short) and at least a tenth (a surplus keeps prefix-cache entries).
    all_sliding = budget_bytes // bytes_per[SLIDING]
    sliding = max(min(sliding_blocks_needed(args, window), all_sliding // 4), all_sliding // 10)
    sliding = max(sliding, math.ceil((window - 1) / args.block_size) + 2)  # one sequence can always run
    sliding = min(sliding, equal)
    full = (budget_bytes - sliding * bytes_per[SLIDING]) // bytes_per[FULL]
    return {FULL: int(full), SLIDING: int(sliding)}


def activation_reserve_bytes(args: EngineArgs, config: ModelConfig, dtype: torch.dtype) -> int:
    """A rough upper bound of one step's temporaries: hidden states, attention, MoE and sampler buffers."""
    import torch

    elem = torch.empty((), dtype=dtype).element_size()
    tokens = args.max_num_batched_tokens
    per_token = (8 * config.hidden_size + 4 * config.q_size + 4 * config.intermediate_size) * elem
    logits = 4 * args.max_num_seqs * config.vocab_size * 4
    reserve = max(MIN_ACTIVATION_RESERVE_BYTES, tokens * per_token + logits)
    if not args.enforce_eager:
        reserve += cuda_graph_pool_bytes(args, config)
    if args.tensor_parallel_size > 1:
        # A fixed-order reduction all-gathers every rank's fp32 partial of the step's hidden states.
        reserve += args.tensor_parallel_size * tokens * config.hidden_size * 4
    return reserve


def cuda_graph_pool_bytes(args: EngineArgs, config: ModelConfig) -> int:
    """A rough upper bound of what the decode CUDA graphs keep reserved (their pool is not shared with eager
    steps), from the largest bucket: the attention decode partials at the most splits a captured graph launches
    (64 per sequence and query head, see kernels/attention.py), and the MoE and hidden-state temporaries."""
    rows = args.cuda_graph_max_batch
    decode_partials = rows * config.num_attention_heads * 64 * (config.head_dim + 2) * 4
    per_row = (16 * config.hidden_size + 4 * config.q_size + 8 * config.intermediate_size) * 4
    return decode_partials + rows * per_row


def num_kv_blocks(
    args: EngineArgs, config: ModelConfig, device: torch.device, model_dtype: torch.dtype
) -> dict[str, int]:
    """Block ids per group for this device (call after the weights are on it)."""
    import torch

    groups = block_groups(config)
    if args.num_blocks is not None:
        return dict.fromkeys(groups, args.num_blocks)
    kv_dtype = args.resolve_kv_dtype(model_dtype)
    if args.kv_cache_gb is not None:
        budget = int(args.kv_cache_gb * (1 << 30))
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * args.gpu_memory_utilization) - used - activation_reserve_bytes(args, config, model_dtype)
        if budget <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {used / 2**30:.1f} GiB used of {total / 2**30:.1f} GiB "
                f"with gpu_memory_utilization={args.gpu_memory_utilization}"
            )
    else:
        budget = int(DEFAULT_CPU_KV_CACHE_GB * (1 << 30))
    blocks = split_kv_budget(args, config, budget, kv_dtype)
    # Never more than every sequence at full length could use.
    max_len = args.max_model_len or config.max_position_embeddings
    useful = args.max_num_seqs * math.ceil(max_len / args.block_size) + 1
    blocks = {g: min(n, useful) for g, n in blocks.items()}
    if min(blocks.values()) <= 0:
        raise RuntimeError(f"the KV cache budget of {budget} bytes holds no block")
    return blocks
