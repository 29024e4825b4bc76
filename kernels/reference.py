"""Plain-torch reference ops for gpt-oss: the oracle every Triton kernel is tested against, and the CPU path.

Each function is a small function of tensors, written for clarity rather than speed, and matches Hugging Face
transformers' `gpt_oss` modeling code (checked by tests/test_model.py against `GptOssForCausalLM`).

Paged KV cache layout (shared with kernels/attention.py): one `k_cache` and one `v_cache` per layer, each
`[num_blocks, num_kv_heads, block_size, head_dim]`. A token's slot is `block_id * block_size + offset`; the
slot mapping of a batch gives each new token's slot, -1 for tokens that write nothing (padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# e2m1 (fp4) values by nibble: 0, 0.5, 1, 1.5, 2, 3, 4, 6, then the same negated.
FP4_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip
MXFP4_BLOCK = 32  # values per e8m0 scale
E8M0_BIAS = 127


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack MXFP4 weights.

    blocks: `[..., rows, cols/32, 16]` uint8, two fp4 values per byte, the low nibble the earlier element.
    scales: `[..., rows, cols/32]` uint8 e8m0 exponents (value = fp4 * 2^(scale - 127)).
    Returns `[..., rows, cols]` in `dtype`.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(f"blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low = lut[(blocks & 0x0F).long()]
    high = lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., rows, cols/32, 32]
    exponent = scales.to(torch.int32) - E8M0_BIAS
    values = torch.ldexp(values, exponent.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`[..., hidden]` normalised in fp32, scaled by `weight`, cast back to x's dtype (as transformers does)."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(torch.float32) * x32).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of kernels.norm.add_rms_norm (and the torch path): the add in x's dtype, then `rms_norm`."""
    summed = x if residual is None else x + residual
    return rms_norm(summed, weight, eps), summed


def yarn_inv_freq(
    head_dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float,
    beta_slow: float,
    truncate: bool,
) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies `[head_dim/2]` fp32 and the attention factor that scales cos and sin."""
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if factor <= 1.0:
        return 1.0 / pos_freqs, 1.0

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation_weight
    attention_factor = 0.1 * math.log(factor) + 1.0
    return inv_freq, attention_factor


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[T, head_dim/2]` for `positions` `[T]`, both scaled by the YaRN attention factor."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    return (freqs.cos() * attention_factor).to(dtype), (freqs.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `[T, heads, head_dim]` by halves (non-interleaved: first half pairs with second half)."""
    first, second = torch.chunk(x, 2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def route_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts by logit and their weights (softmax over those k logits only).

    router_logits: `[T, E]`. Returns expert ids `[T, k]` int32 and weights `[T, k]` fp32.
    """
    top_values, top_ids = torch.topk(router_logits, top_k, dim=-1)
    weights = torch.softmax(top_values.to(torch.float32), dim=-1)
    return top_ids.to(torch.int32), weights


def swiglu(gate_up: torch.Tensor, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved `[N, 2I]` (gate = even columns, up = odd) -> `[N, I]`."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))


def moe_reference(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    w1_blocks: torch.Tensor,
    w1_scales: torch.Tensor,
    w1_bias: torch.Tensor,
    w2_blocks: torch.Tensor,
    w2_scales: torch.Tensor,
    w2_bias: torch.Tensor,
    top_k: int,
    swiglu_limit: float = 7.0,
    swiglu_alpha: float = 1.702,
    expert_start: int = 0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The gpt-oss MoE block on `x` `[T, H]` with MXFP4 experts; returns `[T, H]` in `out_dtype` (x's dtype
    by default).

    router_logits: `[T, E]`; w1: `[E', 2I, H/32, 16]` blocks, `[E', 2I, H/32]` scales, bias `[E', 2I]`
    (gate/up interleaved rows); w2: `[E', H, I/32, 16]` blocks, `[E', H, I/32]` scales, bias `[E', H]`.
    The weights hold experts `expert_start .. expert_start + E' - 1` (E' = E unless expert parallel): slots
    routed elsewhere contribute nothing, so the result is this shard's part of the sum over the k slots.
    Experts are dequantised one at a time (only those some token chose), math in fp32.
    """
    num_tokens, hidden = x.shape
    expert_ids, expert_weights = route_topk(router_logits, top_k)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    x32 = x.to(torch.float32)
    local_experts = range(expert_start, expert_start + w1_blocks.shape[0])
    for expert in torch.unique(expert_ids).tolist():
        if expert not in local_experts:
            continue
        token_idx, slot = torch.nonzero(expert_ids == expert, as_tuple=True)
        local = expert - expert_start
        w1 = mxfp4_dequantize(w1_blocks[local], w1_scales[local])
        w2 = mxfp4_dequantize(w2_blocks[local], w2_scales[local])
        h = x32[token_idx] @ w1.T + w1_bias[local].to(torch.float32)
        y = swiglu(h, swiglu_limit, swiglu_alpha) @ w2.T + w2_bias[local].to(torch.float32)
        out.index_add_(0, token_idx, y * expert_weights[token_idx, slot, None])
    return out.to(out_dtype or x.dtype)


def write_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values `[T, Hkv, D]` into the paged caches at `slot_mapping` `[T]` (negative: skip)."""
    block_size = k_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    # Advanced indexing on dims 0 and 2 puts the token dim first: [T', Hkv, D].
    k_cache[blocks, :, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value[keep].to(v_cache.dtype)


def rope_write_kv_reference(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    write: Callable[..., None] | None = None,
) -> torch.Tensor:
    """RoPE on the q and k heads of a fused projection `[T, (Hq + 2 Hkv) * D]` at `positions` `[T]` (tables
    `[max_positions, D/2]`, cast to qkv's dtype first as transformers does); keys and values stored at
    `slot_mapping` by `write` (default `write_kv_reference`; the CPU path passes its faster equivalent).
    Returns the rotated queries `[T, Hq, D]`."""
    num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    heads = qkv.view(qkv.shape[0], num_q_heads + 2 * num_kv_heads, head_dim)
    cos, sin = cos_table[positions].to(qkv.dtype), sin_table[positions].to(qkv.dtype)
    query = apply_rope(heads[:, :num_q_heads], cos, sin)
    key = apply_rope(heads[:, num_q_heads : num_q_heads + num_kv_heads], cos, sin)
    (write or write_kv_reference)(key, heads[:, num_q_heads + num_kv_heads :], k_cache, v_cache, slot_mapping)
    return query


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` positions of one sequence from a paged cache: `[seq_len, Hkv, D]`."""
    block_size = cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, Hkv, bs, D]
    return blocks.permute(0, 2, 1, 3).reshape(-1, cache.shape[1], cache.shape[3])[:seq_len]


def attention_with_sinks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal GQA attention of queries `[Tq, Hq, D]` at `query_positions` over keys/values `[Tk, Hkv, D]`
    at positions 0..Tk-1, with per-head sink logits `[Hq]` joining the softmax denominator."""
    num_q_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_q_heads // num_kv_heads
    q = query.to(torch.float32).transpose(0, 1)  # [Hq, Tq, D]
    k = key.to(torch.float32).repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Tk, D]
    v = value.to(torch.float32).repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [Hq, Tq, Tk]
    key_positions = torch.arange(key.shape[0], device=query.device)
    visible = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        visible &= key_positions[None, :] > query_positions[:, None] - sliding_window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    sink_column = sinks.to(torch.float32)[:, None, None].expand(-1, scores.shape[1], 1)
    logits = torch.cat((scores, sink_column), dim=-1)
    probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.matmul(probs, v).transpose(0, 1).to(query.dtype)  # [Tq, Hq, D]


def paged_attention_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attention for a flat batch of queries `[T, Hq, D]` from many sequences over the paged KV cache.

    Sequence s owns query rows `query_start_loc[s]:query_start_loc[s+1]`: the last positions of its context of
    `seq_lens[s]` tokens, whose keys were already written to the cache. `block_tables` `[S, max_blocks]`.
    Windowed layers only read the blocks inside the window (others may be freed).
    """
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q_begin, q_end = starts[s], starts[s + 1]
        if q_end == q_begin:
            continue
        q_len = q_end - q_begin
        positions = torch.arange(seq_len - q_len, seq_len, device=query.device)
        block_size = k_cache.shape[2]
        first_key = 0
        if sliding_window is not None:
            # Skip whole blocks before the earliest query's window: they may have been freed.
            first_key = max(0, seq_len - q_len - sliding_window + 1) // block_size * block_size
        table = block_tables[s][first_key // block_size :]
        key = gather_kv(k_cache, table, seq_len - first_key)
        value = gather_kv(v_cache, table, seq_len - first_key)
        out[q_begin:q_end] = attention_with_sinks(
            query[q_begin:q_end], key, value, positions - first_key, sinks, scale, sliding_window
        )
    return out
