"""Plain-torch reference ops for gpt-oss: the oracle every Triton kernel is tested against, and the CPU path.

Each function is a small function of tensors, written for clarity rather than speed, and matches Hugging Face
transformers' `gpt_oss` modeling code (checked by tests/test_model.py against `GptOssForCausalLM`).

Paged KV cache layout (shared with kernels/attention.py): one `k_cache` and one `v_cache` per layer, each
`[num_blocks, num_kv_heads, block_size, head_dim]`. A token's slot is `block_id * block_size + offset`; the
slot mapping of a batch gives each new token's slot, -1 for tokens that write nothing (padding).
"""

from __future__ import annotations

import functools
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


def route_topk(
    router_logits: torch.Tensor, top_k: int, id_dtype: torch.dtype = torch.int32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts by logit and their weights (softmax over those k logits only).

    router_logits: `[T, E]`. Returns expert ids `[T, k]` (`id_dtype`) and weights `[T, k]` fp32.
    """
    top_values, top_ids = torch.topk(router_logits, top_k, dim=-1)
    weights = torch.softmax(top_values.to(torch.float32), dim=-1)
    return top_ids.to(id_dtype), weights


def swiglu(gate_up: torch.Tensor, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved `[N, 2I]` (gate = even columns, up = odd) -> `[N, I]`."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(alpha * gate))


def expert_mlp(
    rows: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    limit: float,
    alpha: float,
) -> torch.Tensor:
    """One expert on `[M, H]` fp32 rows: `swiglu(rows @ w1.T + b1) @ w2.T + b2` -> `[M, H]`."""
    h = torch.nn.functional.linear(rows, w1, b1)
    return torch.nn.functional.linear(swiglu(h, limit, alpha), w2, b2)


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
    Experts are dequantised one at a time (only those some token chose), math in fp32, each expert's rows in
    fixed-shape tiles (batch-invariant, see `map_row_tiles`).
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
        b1, b2 = w1_bias[local].to(torch.float32), w2_bias[local].to(torch.float32)
        mlp = functools.partial(expert_mlp, w1=w1, b1=b1, w2=w2, b2=b2, limit=swiglu_limit, alpha=swiglu_alpha)
        y = map_row_tiles(mlp, x32[token_idx])
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
) -> torch.Tensor:
    """RoPE on the q and k heads of a fused projection `[T, (Hq + 2 Hkv) * D]` at `positions` `[T]` (tables
    `[max_positions, D/2]`, cast to qkv's dtype first as transformers does); keys and values stored at
    `slot_mapping`. Returns the rotated queries `[T, Hq, D]`."""
    num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    heads = qkv.view(qkv.shape[0], num_q_heads + 2 * num_kv_heads, head_dim)
    cos, sin = cos_table[positions].to(qkv.dtype), sin_table[positions].to(qkv.dtype)
    query = apply_rope(heads[:, :num_q_heads], cos, sin)
    key = apply_rope(heads[:, num_q_heads : num_q_heads + num_kv_heads], cos, sin)
    write_kv_reference(key, heads[:, num_q_heads + num_kv_heads :], k_cache, v_cache, slot_mapping)
    return query


# The CPU path computes every matmul in tiles of one fixed shape (padded with zeros). A CPU BLAS picks its code
# path, and with it each output element's summation order, from the whole call's shapes (one row runs a gemv
# kernel, a few rows another blocking than many rows, a batched matmul splits threads by batch count), so a
# row's bits would depend on how many rows share its call: on the batch. With one shape per call a row's result
# depends only on its own values (tests/test_reference.py checks the ops, tests/test_generate.py whole runs).
# Elementwise ops run on those tiles too where torch's vectorised and scalar paths differ (sigmoid). The
# tiles also bound memory: attention holds one tile of scores at a time, however long the prompt.
ROW_TILE = 16  # rows per matmul in linear layers and experts
ATTENTION_QUERY_TILE = 16  # query positions per tile
ATTENTION_KEY_TILE = 256  # keys per tile, rounded up to whole cache blocks


def map_row_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn` applied to `x` `[T, K]` in tiles of exactly `ROW_TILE` rows (the last padded with zeros), the
    results concatenated: `[T, N]`. `fn` must treat rows independently."""
    num_rows = x.shape[0]
    tiles = max(1, math.ceil(num_rows / ROW_TILE))
    if num_rows == tiles * ROW_TILE:
        padded = x  # whole tiles already: no copy (each tile's values, and so its bits, are the same)
    else:
        padded = x.new_zeros(tiles * ROW_TILE, x.shape[1])
        padded[:num_rows] = x
    if tiles == 1:
        return fn(padded)[:num_rows]
    return torch.cat([fn(tile) for tile in padded.split(ROW_TILE)])[:num_rows]


def linear_fixed_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x` `[T, K]` @ `weight` `[N, K]`^T (+ `bias`) -> `[T, N]`, each row's bits independent of the others."""
    return map_row_tiles(lambda tile: torch.nn.functional.linear(tile, weight, bias), x)


def gather_kv_tile(
    cache: torch.Tensor, block_table: torch.Tensor, first_key: int, num_keys: int, live: range
) -> torch.Tensor:
    """Keys (or values) `first_key .. first_key + num_keys - 1` of one sequence from a paged cache, as
    `[num_keys, Hkv, D]` fp32; `first_key` is a multiple of the block size. Positions outside `live` read as
    zeros without touching the cache: blocks there may be freed, slots past the sequence hold anything."""
    _, num_kv_heads, block_size, head_dim = cache.shape
    tile = torch.zeros(num_keys, num_kv_heads, head_dim, dtype=torch.float32, device=cache.device)
    lo, hi = max(first_key, live.start), min(first_key + num_keys, live.stop)
    if lo < hi:
        blocks = cache[block_table[lo // block_size : math.ceil(hi / block_size)].long()]  # [n, Hkv, bs, D]
        keys = blocks.permute(0, 2, 1, 3).flatten(0, 1)  # [n * bs, Hkv, D] from key lo // bs * bs on
        skip = lo % block_size
        tile[lo - first_key : hi - first_key] = keys[skip : skip + hi - lo]
    return tile


def attention_with_sinks(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    sinks: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    fixed_key_tile: bool = True,
) -> torch.Tensor:
    """Causal GQA attention of one sequence's queries `[Tq, Hq, D]` at ascending `query_positions` `[Tq]` over
    its first `seq_len` keys/values in the paged caches, with per-head sink logits `[Hq]` joining the softmax
    denominator. Returns `[Tq, Hq, D]` in the query's dtype.

    Tiled over queries and keys with an online softmax in fp32: memory holds one tile of scores whatever the
    length. The running maximum starts at the sink logit (the sink is the one column every row sees), which
    makes a key tile wholly masked for a row an exact no-op for it: which tiles a query tile visits (it depends
    on its neighbours) changes no bit. Every matmul has one shape, so each query's output is batch-invariant.
    Windowed layers read no block before the earliest query's window (those may be freed).
    `fixed_key_tile=False` ends the last key tile at the block of the last key (a short prompt's tile is then
    smaller than ATTENTION_KEY_TILE): faster, but the bits then depend on how the prompt was chunked.
    """
    num_queries, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    q_tile = ATTENTION_QUERY_TILE
    rows = group * q_tile
    blocks_per_tile = max(1, ATTENTION_KEY_TILE // block_size)
    key_tile = blocks_per_tile * block_size
    num_q_tiles = math.ceil(num_queries / q_tile)
    # Queries padded to whole tiles (pad rows repeat the last position; their outputs are dropped), laid out per
    # KV head: [tiles, Hkv, rows, D] with row = head_in_group * q_tile + query_in_tile.
    padded = query.new_zeros(num_q_tiles * q_tile, num_q_heads, head_dim)
    padded[:num_queries] = query
    positions = query_positions.new_empty(num_q_tiles * q_tile)
    positions[:num_queries] = query_positions
    positions[num_queries:] = query_positions[-1]
    q = padded.to(torch.float32).view(num_q_tiles, q_tile, num_kv_heads, group, head_dim)
    q = q.permute(0, 2, 3, 1, 4).reshape(num_q_tiles, num_kv_heads, rows, head_dim)
    row_positions = positions.view(num_q_tiles, 1, 1, q_tile, 1).expand(-1, 1, group, -1, -1)
    row_positions = row_positions.reshape(num_q_tiles, 1, rows, 1)
    first_pos = positions.view(num_q_tiles, q_tile)[:, 0].tolist()
    last_pos = positions.view(num_q_tiles, q_tile)[:, -1].tolist()
    first_key = [0 if sliding_window is None else max(0, p - sliding_window + 1) for p in first_pos]
    live = range(first_key[0], seq_len)

    sink_logits = sinks.to(torch.float32).view(num_kv_heads, group, 1).expand(-1, -1, q_tile)
    running_max = sink_logits.reshape(1, num_kv_heads, rows, 1).repeat(num_q_tiles, 1, 1, 1)
    denominator = torch.ones_like(running_max)
    acc = torch.zeros_like(q)
    for k0 in range(first_key[0] // key_tile * key_tile, last_pos[-1] + 1, key_tile):
        k1 = k0 + key_tile  # keys k0 .. k1 - 1
        users = [i for i in range(num_q_tiles) if first_key[i] < k1 and last_pos[i] >= k0]
        if not users:
            continue
        if not fixed_key_tile:
            k1 = min(k1, math.ceil((last_pos[-1] + 1) / block_size) * block_size)
        key = gather_kv_tile(k_cache, block_table, k0, k1 - k0, live).permute(1, 2, 0)
        value = gather_kv_tile(v_cache, block_table, k0, k1 - k0, live).transpose(0, 1)
        key, value = key.contiguous(), value.contiguous()  # [Hkv, D, kt], [Hkv, kt, D]
        key_positions = torch.arange(k0, k1, device=query.device)
        for i in users:
            scores = torch.matmul(q[i], key).mul_(scale)  # [Hkv, rows, kt]
            all_visible = k1 - 1 <= first_pos[i] and (sliding_window is None or k0 > last_pos[i] - sliding_window)
            if not all_visible:
                visible = key_positions <= row_positions[i]
                if sliding_window is not None:
                    visible &= key_positions > row_positions[i] - sliding_window
                scores.masked_fill_(~visible, float("-inf"))
            new_max = torch.maximum(running_max[i], scores.amax(dim=-1, keepdim=True))
            rescale = torch.exp(running_max[i] - new_max)
            probs = scores.sub_(new_max).exp_()
            denominator[i] = denominator[i] * rescale + probs.sum(dim=-1, keepdim=True)
            acc[i] = acc[i] * rescale + torch.matmul(probs, value)
            running_max[i] = new_max
    out = (acc / denominator).view(num_q_tiles, num_kv_heads, group, q_tile, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_q_tiles * q_tile, num_q_heads, head_dim)[:num_queries].to(query.dtype)


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
    fixed_key_tile: bool = True,
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
        positions = torch.arange(seq_len - (q_end - q_begin), seq_len, device=query.device)
        out[q_begin:q_end] = attention_with_sinks(
            query[q_begin:q_end],
            positions,
            k_cache,
            v_cache,
            block_tables[s],
            seq_len,
            sinks,
            scale,
            sliding_window,
            fixed_key_tile,
        )
    return out
