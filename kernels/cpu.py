"""The CPU path: the references of `kernels/reference.py` rearranged for speed, equal to them up to rounding.

Where the references favour clarity, a CPU decode step paid for it in two places:
- the MoE dequantised every routed expert's MXFP4 weights on every step (about half of a tiny model's step).
  Here dequantised experts are kept in a least-recently-used cache bounded by a byte budget
  (`set_expert_cache_budget`, from `EngineArgs.cpu_expert_cache_gb`), w1's gate and up rows as two halves
  (a contiguous SwiGLU); tokens are grouped by expert with one sort, and each token's k expert outputs are
  combined by one weighted sum (no `index_add_` per expert);
- attention looped over sequences in Python, a dozen small ops each, and RoPE and the KV write recomputed their
  indices on every layer. Here sequences go through attention in groups (`paged_attention`): one gather of
  the keys/values they see and two batched matmuls per group, within a memory bound (else the tiled
  reference); with batch invariance a group holds one shape only and prompts take the tiled reference,
  without it all decoding sequences are one group and prompts share groups too, padded. RoPE rotates q and k
  heads together; what depends only on the step (cos/sin rows, cache rows, the grouping) is made by the first
  layer that needs it and reused by the others (`_StepMemo`).

Both stay batch-invariant as the references are (a token's result never depends on the rest of the step),
which the engine's default mode promises.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from gptoss.kernels.reference import (
    map_row_tiles,
    mxfp4_dequantize,
    paged_attention_reference,
    route_topk,
    write_kv_reference,
)

DEFAULT_EXPERT_CACHE_BYTES = 4 << 30


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.reference.add_rms_norm_reference` in two ops rather than nine: torch's own RMSNorm on the fp32
    sum (the same math; tests/test_cpu_kernels.py checks it against the reference)."""
    summed = x if residual is None else x + residual
    x32 = summed.to(torch.float32)
    normed = torch.nn.functional.rms_norm(x32, (x32.shape[-1],), weight.to(torch.float32), eps)
    return normed.to(x.dtype), summed


Expert = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # w1 (halves), its bias, w2, its bias


class ExpertCache:
    """Dequantised fp32 experts of MoE layers, least recently used first out once `budget_bytes` would be
    exceeded. One entry is one expert of one layer: w1 `[2I, H]` (gate rows, then up rows: a contiguous
    SwiGLU), its bias, w2 `[H, I]` (divided by the SwiGLU's alpha) and its bias.

    A layer is known by its packed tensors, by weak reference and version counter (`layer`, once per MoE call):
    its entries serve only those very tensors (a new model's weights at a freed model's address never get a
    freed model's experts), and only while nothing was written into them in place (a reload). A layer's
    entries go when it changes or its tensors are freed. Inference-mode tensors keep no version counter.
    """

    def __init__(self, budget_bytes: int = DEFAULT_EXPERT_CACHE_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._layers: dict[int, tuple[tuple[weakref.ref, ...], int]] = {}  # id -> (sources, their versions)
        self._entries: OrderedDict[tuple[int, Hashable], Expert] = OrderedDict()  # (layer id, expert) -> tensors

    def layer(self, sources: tuple[torch.Tensor, ...]) -> int:
        """The key of the MoE layer whose packed tensors (and biases) are `sources`; stale entries dropped."""
        key = id(sources[0])
        version = sum(_version(t) for t in sources)
        known = self._layers.get(key)
        if known is not None:
            refs, known_version = known
            if known_version == version and all(ref() is t for ref, t in zip(refs, sources, strict=True)):
                return key
        self._drop_layers([key] + [k for k, (refs, _) in self._layers.items() if any(ref() is None for ref in refs)])
        self._layers[key] = (tuple(weakref.ref(t) for t in sources), version)
        return key

    def expert(self, layer: int, expert: Hashable, make: Callable[[], Expert]) -> Expert:
        """Expert `expert` of `layer` (a `layer` key), made and kept (within budget) when missing."""
        key = (layer, expert)
        value = self._entries.get(key)
        if value is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return value
        self.misses += 1
        value = make()
        size = _nbytes(value)
        if size <= self.budget_bytes:
            self.shrink_to(self.budget_bytes - size)
            self._entries[key] = value
            self.used_bytes += size
        return value

    def _drop_layers(self, layers: list[int]) -> None:
        dropped = set(layers)
        for key in [key for key in self._entries if key[0] in dropped]:
            self.used_bytes -= _nbytes(self._entries.pop(key))
        for layer in dropped:
            self._layers.pop(layer, None)

    def shrink_to(self, budget_bytes: int) -> None:
        """Drop least recently used entries until at most `budget_bytes` are held."""
        while self._entries and self.used_bytes > budget_bytes:
            self.used_bytes -= _nbytes(self._entries.popitem(last=False)[1])

    def clear(self) -> None:
        self._entries.clear()
        self._layers.clear()
        self.used_bytes = 0


def _nbytes(tensors: Expert) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _deinterleave(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Even rows then odd rows along `dim` (gpt-oss interleaves gate and up)."""
    pairs = weight.unflatten(dim, (-1, 2))
    return torch.cat((pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)), dim=dim)


EXPERT_CACHE = ExpertCache()


def _version(tensor: torch.Tensor) -> int:
    """The in-place write counter of a tensor (inference-mode tensors keep none: 0)."""
    return 0 if tensor.is_inference() else tensor._version


def set_expert_cache_budget(budget_bytes: int) -> None:
    """Bound the process-wide cache of dequantised experts (0 disables it); drops what no longer fits."""
    EXPERT_CACHE.budget_bytes = max(0, int(budget_bytes))
    EXPERT_CACHE.shrink_to(EXPERT_CACHE.budget_bytes)


def moe(
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
    cache: ExpertCache | None = None,
    batch_invariant: bool = True,
) -> torch.Tensor:
    """`kernels.reference.moe_reference`, with cached dequantised experts and one combine (math in fp32).

    `batch_invariant`: each expert's rows go through its matmuls in fixed-shape tiles, so a token's bits do not
    depend on how many others chose the expert; otherwise in one matmul per expert, or, for small models, all
    experts in two batched matmuls (`_batched_experts`, fewer ops)."""
    cache = EXPERT_CACHE if cache is None else cache
    num_tokens, num_experts = router_logits.shape
    layer = cache.layer((w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias))

    def dequantize(expert: int) -> Expert:
        w1 = _deinterleave(mxfp4_dequantize(w1_blocks[expert], w1_scales[expert]), dim=0)
        b1 = _deinterleave(w1_bias[expert].to(torch.float32), dim=0)
        # The SwiGLU's 1 / alpha (see below) is folded into w2 once, rather than applied to every activation.
        w2 = mxfp4_dequantize(w2_blocks[expert], w2_scales[expert]) / swiglu_alpha
        return w1, b1, w2, w2_bias[expert].to(torch.float32)

    values_per_expert = 2 * (w1_blocks[0].numel() + w2_blocks[0].numel())  # two e2m1 values a byte
    if not batch_invariant and num_experts * values_per_expert <= BATCHED_EXPERTS_MAX:
        stacked = cache.expert(
            layer, ("all", swiglu_alpha), lambda: _stack_experts([dequantize(e) for e in range(num_experts)])
        )
        return _batched_experts(x, router_logits, stacked, top_k, swiglu_limit, swiglu_alpha)

    expert_ids, expert_weights = route_topk(router_logits, top_k)
    x32 = x.to(torch.float32)

    def expert_mlp(weights: Expert, rows: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = weights
        gate, up = torch.nn.functional.linear(rows, w1, b1).chunk(2, dim=-1)
        # (up + 1) * gate * sigmoid(alpha * gate) = (up + 1) * silu(alpha * gate) / alpha, the / alpha in w2.
        silu = torch.nn.functional.silu(gate.clamp_(max=swiglu_limit).mul_(swiglu_alpha), inplace=True)
        act = torch.addcmul(silu, up.clamp_(min=-swiglu_limit, max=swiglu_limit), silu)
        return torch.nn.functional.linear(act, w2, b2)

    flat_experts = expert_ids.flatten()
    # Token-slot pairs grouped by expert: one sort, then contiguous runs.
    order = torch.argsort(flat_experts, stable=True)
    experts, counts = torch.unique_consecutive(flat_experts[order], return_counts=True)
    rows = x32[order // top_k]  # [T*k, H], grouped by expert
    weights = [cache.expert(layer, (e, swiglu_alpha), lambda e=e: dequantize(e)) for e in experts.tolist()]
    out_sorted = _expert_loop(weights, rows, counts.tolist(), expert_mlp, batch_invariant)
    # Back to token-major order: row t*k + j is token t's j-th expert; then each token's weighted sum, in slot
    # order per token (elementwise: a batched matmul over the tokens would split its work by their number).
    per_slot = torch.empty_like(out_sorted)
    per_slot[order] = out_sorted
    combined = (per_slot.view(num_tokens, top_k, -1) * expert_weights.unsqueeze(-1)).sum(dim=1)
    return combined.to(x.dtype)


# Small models are op-bound on a CPU: without batch invariance all their experts are kept stacked and the
# step's token slots go through them as two batched matmuls, a dozen ops whatever the routing, when the layer's
# experts hold at most this many weight values (a tiny model's 6 experts: 0.3M; one gpt-oss-120b expert: 50M).
BATCHED_EXPERTS_MAX = 16 << 20
# Few tokens (decode) go through every expert rather than only their own when the extra multiply-adds are at
# most this many: on a CPU that is cheaper than the ~8 ops that gather each slot's row and scatter it back
# (measured on a 2-core Xeon VM, fp32, one thread: batch 1 91 vs 210 us, batch 16 210 vs 270 us, even near 64).
DENSE_EXTRA_MACS_MAX = 8 << 20


def _stack_experts(weights: list[Expert]) -> Expert:
    """Experts' (w1 `[2I, H]`, b1, w2 `[H, I]`, b2) as batched-matmul operands: `[E, H, 2I]`, `[E, 1, 2I]`,
    `[E, I, H]`, `[E, 1, H]`."""
    w1, b1, w2, b2 = (torch.stack([w[i] for w in weights]) for i in range(4))
    return w1.transpose(1, 2).contiguous(), b1.unsqueeze(1), w2.transpose(1, 2).contiguous(), b2.unsqueeze(1)


def _batched_experts(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    stacked: Expert,
    top_k: int,
    swiglu_limit: float,
    swiglu_alpha: float,
) -> torch.Tensor:
    """The MoE of `x` `[T, H]` over all of a layer's experts, `stacked` (`_stack_experts`), in two batched
    matmuls over `[E, m, H]` rows. Dense (few tokens): every token is a row of every expert (m = T) and each
    token's result the sum of all experts' outputs, weighted by its routing weight there (0 elsewhere).
    Otherwise each token slot gets a row of its expert's slice (m: the busiest expert's slot count), one
    `index_copy_` in and one `index_select` out."""
    w1, b1, w2, b2 = stacked
    num_tokens, hidden = x.shape
    num_experts, _, intermediate2 = w1.shape
    # route_topk's routing, the ids kept int64 for indexing.
    top_values, expert_ids = torch.topk(router_logits, top_k, dim=-1)
    expert_weights = torch.softmax(top_values.to(torch.float32), dim=-1)
    x32 = x.to(torch.float32)
    extra_macs = num_tokens * (num_experts - top_k) * hidden * intermediate2 * 3 // 2
    dense = extra_macs <= DENSE_EXTRA_MACS_MAX
    if dense:
        rows_per_expert = num_tokens
        rows = x32.expand(num_experts, num_tokens, hidden)
    else:
        slot_experts = expert_ids.view(-1)  # slot t*k + j: token t's j-th expert
        # Per slot, how many slots up to it chose its expert (1-based): its row within the expert's slice.
        seen = (slot_experts[:, None] == torch.arange(num_experts, device=x.device)).cumsum(0)
        rows_per_expert = int(seen[-1].max())
        slot_rows = seen.gather(1, slot_experts[:, None]).view(-1).add_(slot_experts, alpha=rows_per_expert).sub_(1)
        padded = x32.new_zeros(num_experts * rows_per_expert, hidden)
        padded.index_copy_(0, slot_rows, x32.unsqueeze(1).expand(num_tokens, top_k, hidden).reshape(-1, hidden))
        rows = padded.view(num_experts, rows_per_expert, hidden)
    gate, up = torch.baddbmm(b1, rows, w1).chunk(2, dim=-1)
    # (up + 1) * gate * sigmoid(alpha * gate) = (up + 1) * silu(alpha * gate) / alpha, the / alpha in w2.
    silu = torch.nn.functional.silu(gate.clamp_(max=swiglu_limit).mul_(swiglu_alpha), inplace=True)
    act = torch.addcmul(silu, up.clamp_(min=-swiglu_limit, max=swiglu_limit), silu)
    outputs = torch.baddbmm(b2, act, w2)  # [E, m, H]
    if dense:
        # Each token's weighted sum over the experts: [T, 1, E] @ [T, E, H].
        weights = x32.new_zeros(num_tokens, num_experts).scatter_(1, expert_ids, expert_weights)
        combined = torch.bmm(weights.unsqueeze(1), outputs.transpose(0, 1)).view(num_tokens, hidden)
    else:
        # Each token's weighted sum over its k slots, elementwise (a batched matmul of T tiny products is
        # slower here).
        per_slot = outputs.view(-1, hidden).index_select(0, slot_rows).view(num_tokens, top_k, hidden)
        combined = (per_slot * expert_weights.unsqueeze(-1)).sum(dim=1)
    return combined.to(x.dtype)


def _expert_loop(
    weights: list[Expert],
    rows: torch.Tensor,
    counts: list[int],
    expert_mlp: Callable[[Expert, torch.Tensor], torch.Tensor],
    batch_invariant: bool,
) -> torch.Tensor:
    out_sorted = torch.empty_like(rows)
    start = 0
    for expert_weights, count in zip(weights, counts, strict=True):
        end = start + count
        # In fixed-shape row tiles: a token's bits must not depend on how many others chose this expert.
        mlp = functools.partial(expert_mlp, expert_weights)
        out_sorted[start:end] = map_row_tiles(mlp, rows[start:end]) if batch_invariant else mlp(rows[start:end])
        start = end
    return out_sorted


# ------------------------------------------------------------------------------------------------- attention
# The caches `[num_blocks, Hkv, block_size, D]` are read and written as `[num_blocks * Hkv * block_size, D]`:
# the D values of (block b, KV head h, offset o) are row `(b * Hkv + h) * block_size + o`. One `index_select` of
# precomputed rows gathers what a batch of sequences sees, in the layout the batched matmuls want; advanced
# indexing on dims 0 and 2 (`cache[blocks, :, offsets]`) cost five times as much.


class _StepMemo:
    """Small values derived from one step's index tensors (positions, slot mapping, block tables, lengths),
    made on the first layer that needs them and reused by the step's other layers.

    An entry serves only equal contents (one compare per small tensor, about a microsecond): the tensors may be
    buffers rewritten in place between steps (the decode graph runner's), and a freed tensor's address may come
    back with other contents. The last `per_key` entries of a key are kept (a step's layer types may read
    different tables under one key), for the last `keys` keys. Lookups never mutate and an insert rebinds a
    key's tuple in one step, so concurrent engines cannot corrupt it.
    """

    def __init__(self, keys: int = 16, per_key: int = 2) -> None:
        self.keys, self.per_key = keys, per_key
        self._entries: dict[Hashable, tuple[tuple[tuple[torch.Tensor, ...], Any], ...]] = {}  # newest first

    def get(
        self,
        key: Hashable,
        sources: tuple[torch.Tensor, ...],
        make: Callable[[], Any],
        valid: Callable[[Any], bool] | None = None,
    ) -> Any:
        """The value made by `make` for `key` and the contents of `sources` (made now if unknown or not `valid`)."""
        entries = self._entries.get(key, ())
        for saved, value in entries:
            for a, b in zip(saved, sources, strict=True):
                if a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b):  # equal: shapes too
                    break
            else:
                if valid is None or valid(value):
                    return value
        value = make()
        if key not in self._entries and len(self._entries) >= self.keys:
            self._entries.pop(next(iter(self._entries)), None)  # the oldest key
        self._entries[key] = ((tuple(t.clone() for t in sources), value), *entries)[: self.per_key]
        return value


_STEP_MEMO = _StepMemo()


def _cache_rows(blocks: torch.Tensor, offsets: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """Rows of a cache viewed as `[-1, D]` for `blocks` / `offsets` `[..., N]`: `[..., Hkv, N]` (KV head major)."""
    first_head = blocks * (num_kv_heads * block_size) + offsets
    return first_head.unsqueeze(-2) + _head_rows(num_kv_heads, block_size, blocks.device)


@functools.lru_cache(maxsize=16)
def _head_rows(num_kv_heads: int, block_size: int, device: torch.device) -> torch.Tensor:
    """`[Hkv, 1]`: how many rows past KV head 0's each head's row is (shared between calls: never written to)."""
    return (torch.arange(num_kv_heads, device=device) * block_size).view(-1, 1)


def _rope_rows(
    positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at `positions` `[T]` in `dtype`, over whole heads `[T, 1, D]`: `(cos, cos)` and `(-sin, sin)`,
    so that RoPE is `x * cos + swap_halves(x) * sin`. Once per step (every layer rotates the same positions)."""

    def make() -> tuple[weakref.ref, weakref.ref, torch.Tensor, torch.Tensor]:
        cos, sin = cos_table[positions].to(dtype), sin_table[positions].to(dtype)
        whole_cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
        signed_sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)
        return weakref.ref(cos_table), weakref.ref(sin_table), whole_cos, signed_sin

    # The tables are the model's (16 MB each at gpt-oss-120b's 131k positions): known by identity, not content.
    key = ("rope", id(cos_table), id(sin_table), _version(cos_table), _version(sin_table), dtype)
    value = _STEP_MEMO.get(key, (positions,), make, lambda v: v[0]() is cos_table and v[1]() is sin_table)
    return value[2], value[3]


def rope_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
) -> torch.Tensor:
    """`kernels.reference.rope_write_kv_reference`, bit for bit, in a few ops: q and k heads (adjacent in the
    fused projection) rotated together, the cos/sin rows gathered once per step. Returns the rotated queries
    `[T, Hq, D]` (a view into the rotated q and k heads, not contiguous across tokens)."""
    num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    heads = qkv.view(qkv.shape[0], num_q_heads + 2 * num_kv_heads, head_dim)
    cos, sin = _rope_rows(positions, cos_table, sin_table, qkv.dtype)
    x, value = heads.split((num_q_heads + num_kv_heads, num_kv_heads), dim=1)
    # The reference's products and sums in the same dtype: first*cos - second*sin is first*cos + second*(-sin)
    # exactly (negation is exact), second*cos + first*sin as it is.
    rotated = x * cos
    rotated += x.roll(head_dim // 2, dims=-1).mul_(sin)
    query, key = rotated.split((num_q_heads, num_kv_heads), dim=1)
    write_kv(key, value, k_cache, v_cache, slot_mapping)
    return query


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`kernels.reference.write_kv_reference`: keys/values `[T, Hkv, D]` stored at `slot_mapping` `[T]` (negative:
    skipped), by cache rows computed once per step."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        write_kv_reference(key, value, k_cache, v_cache, slot_mapping)
        return
    _, num_kv_heads, block_size, head_dim = k_cache.shape

    def make() -> tuple[torch.Tensor | None, torch.Tensor]:
        if slot_mapping.numel() * num_kv_heads <= SMALL_ROWS:
            slots = slot_mapping.tolist()
            kept = [i for i, slot in enumerate(slots) if slot >= 0]
            rows = [
                (slots[i] // block_size * num_kv_heads + h) * block_size + slots[i] % block_size
                for i in kept
                for h in range(num_kv_heads)
            ]
            keep = None if len(kept) == len(slots) else torch.tensor(kept, device=slot_mapping.device)
            return keep, torch.tensor(rows, dtype=torch.int64, device=slot_mapping.device).view(-1, num_kv_heads)
        slots, keep = slot_mapping, None
        if slots.numel() and int(slots.min()) < 0:
            keep = torch.nonzero(slots >= 0).flatten()
            slots = slots[keep]
        slots = slots[:, None]  # one key per token: rows [T', Hkv, 1]
        return keep, _cache_rows(slots // block_size, slots % block_size, num_kv_heads, block_size).squeeze(-1)

    keep, rows = _STEP_MEMO.get(("write", num_kv_heads, block_size), (slot_mapping,), make)  # rows [T', Hkv]
    if keep is not None:
        key, value = key.index_select(0, keep), value.index_select(0, keep)
    k_cache.view(-1, head_dim).index_put_((rows,), key if key.dtype == k_cache.dtype else key.to(k_cache.dtype))
    v_cache.view(-1, head_dim).index_put_((rows,), value if value.dtype == v_cache.dtype else value.to(v_cache.dtype))


# Up to this many cache rows, a step's rows are computed in Python: a dozen tensor ops on a few dozen numbers
# cost more than the arithmetic (decoding at batch 1).
SMALL_ROWS = 512

# Scores, probabilities and gathered keys/values of one dense attention call stay under this many bytes; a
# sequence that needs more goes through the tiled reference (a long prompt: memory stays one tile of scores).
DENSE_ATTENTION_BYTES = 8 << 20


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    batch_invariant: bool = True,
) -> torch.Tensor:
    """`kernels.reference.paged_attention_reference`, with sequences batched.

    Sequences go in groups (`_Group`): one gather of the keys and values each sees and two batched matmuls per
    group, scores held whole (bounded by `DENSE_ATTENTION_BYTES`, groups split by sequences beyond it; a
    sequence beyond it alone, a long prompt, takes the tiled reference).

    `batch_invariant`: a group holds sequences of one shape only (as many queries, as many keys seen), so no
    padding enters a sum and a sequence's bits do not depend on the rest of the step: decoding sequences by
    span (in steady decoding one or two groups per layer: every sliding layer past the window shares a span,
    and so do equal lengths on full layers); prompts take the tiled reference with its fixed key tile, as their
    bits must not depend on how a prompt was chunked either. Without it, all decoding sequences share a group,
    and so do prompts within 2x their own scores (`PADDING_SLACK_SCORES`), shorter ones padded at the end and
    masked; the reference's last key tile ends at the last block.
    """
    num_q_heads = query.shape[1]
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return paged_attention_reference(
            query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, sinks, scale, sliding_window,
            fixed_key_tile=batch_invariant,
        )  # fmt: skip
    plan = _attention_plan(
        block_tables, seq_lens, query_start_loc, k_cache.shape, num_q_heads, sliding_window, batch_invariant
    )
    if plan.in_order == query.shape[0]:
        # One group of every query row, in order, no padding: the usual decode step, or a batch of equal prompts.
        return _dense_attention(query, k_cache, v_cache, plan.groups[0], sinks, scale)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    for group in plan.groups:
        result = _dense_attention(query.index_select(0, group.rows), k_cache, v_cache, group, sinks, scale)
        if group.keep is None:
            out[group.rows] = result
        else:
            out[group.targets] = result.index_select(0, group.keep)
    if plan.tiled is not None:
        rows, seqs, starts = plan.tiled
        out[rows] = paged_attention_reference(
            query.index_select(0, rows),
            k_cache,
            v_cache,
            block_tables[seqs],
            starts,
            seq_lens[seqs],
            sinks,
            scale,
            sliding_window,
            fixed_key_tile=batch_invariant,  # a prompt's bits the same however it is chunked
        )
    return out


@dataclass
class _Group:
    """Sequences attended to together, as if each had `num_queries` queries (its last positions) and its last
    `num_keys` keys: one gather and two batched matmuls. With batch invariance they have exactly these shapes;
    without it shorter ones are padded at the end (padding queries repeat the sequence's last query, their
    results dropped; padding keys repeat its last key, hidden from its queries)."""

    rows: torch.Tensor  # the query rows gathered [S * Tq], sequence by sequence
    num_seqs: int
    num_queries: int
    num_keys: int
    kv_rows: torch.Tensor  # their keys' cache rows [S * Hkv * Lk] (see `_cache_rows`)
    # Scores to drop, broadcast over [S, Hkv, Tq * G, Lk]: None (one query each, equal spans), the causal and
    # window mask `[Tq * G, Lk]` of equal shapes, or one per sequence `[S, 1, Tq * G, Lk]` when padded.
    hidden: torch.Tensor | None
    keep: torch.Tensor | None = None  # which of the S * Tq results are real queries (None: all)
    targets: torch.Tensor | None = None  # and their query rows


@dataclass
class _AttentionPlan:
    """How one step's sequences go through attention on a layer type (shared by its layers)."""

    groups: list[_Group]
    # Sequences for the tiled reference: (their query rows, their indices, their query starts from 0), or None.
    tiled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    in_order: int = -1  # one group of rows 0 .. in_order - 1 in order, without padding; else -1


# Without batch invariance, sequences of other shapes share a group while its padded scores stay within twice
# their own plus this many elements (small groups cost their ops more than their sizes).
PADDING_SLACK_SCORES = 1 << 16


def _attention_plan(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    cache_shape: torch.Size,
    num_q_heads: int,
    sliding_window: int | None,
    batch_invariant: bool,
) -> _AttentionPlan:
    """The step's plan for a layer type, made once per step (every layer of a type reads the same tables)."""
    _, num_kv_heads, block_size, head_dim = cache_shape
    key = ("attention", sliding_window, num_kv_heads, block_size, head_dim, num_q_heads, batch_invariant)
    sources = (block_tables, seq_lens, query_start_loc)
    make = functools.partial(
        _make_attention_plan, *sources, num_kv_heads, block_size, head_dim, num_q_heads, sliding_window, batch_invariant
    )
    return _STEP_MEMO.get(key, sources, make)


def _make_attention_plan(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_kv_heads: int,
    block_size: int,
    head_dim: int,
    num_q_heads: int,
    sliding_window: int | None,
    batch_invariant: bool,
) -> _AttentionPlan:
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    shapes: dict[int, tuple[int, int]] = {}  # sequence -> (queries, keys)
    buckets: dict[tuple[int, int] | bool, list[int]] = {}  # exact shape, or (without batch invariance) prompt?
    tiled: list[int] = []
    per_head = 4 * 2 * num_kv_heads * head_dim  # keys and values of one key, fp32 (see `_dense_bytes`)
    for seq, length in enumerate(lens):
        num_queries = starts[seq + 1] - starts[seq]
        if num_queries == 0:
            continue
        # Keys from the first query's window on (the earlier blocks may be freed); Lk >= Tq.
        num_keys = length if sliding_window is None else min(length, num_queries + sliding_window - 1)
        small = num_keys * (12 * num_q_heads * num_queries + per_head) <= DENSE_ATTENTION_BYTES
        if not small or (num_queries > 1 and batch_invariant):
            tiled.append(seq)
            continue
        shapes[seq] = (num_queries, num_keys)
        buckets.setdefault(num_queries > 1 if not batch_invariant else (num_queries, num_keys), []).append(seq)

    # A bucket's sequences join a group in turn while it stays within the memory bound and its padded scores
    # within twice their own (plus a slack); prompts sorted by shape first, like with like.
    parts: list[tuple[list[int], int, int, bool]] = []  # sequences, queries, keys, padded
    for seqs in buckets.values():
        if len({shapes[s] for s in seqs}) == 1:  # one shape (steady decoding, equal prompts): no padding
            num_queries, num_keys = shapes[seqs[0]]
            per_seq = _dense_bytes(1, num_queries, num_keys, num_q_heads, num_kv_heads, head_dim)
            chunk = max(1, DENSE_ATTENTION_BYTES // per_seq)
            parts += [(seqs[i : i + chunk], num_queries, num_keys, False) for i in range(0, len(seqs), chunk)]
            continue
        if shapes[seqs[0]][0] > 1:
            seqs = sorted(seqs, key=shapes.__getitem__)
        part: list[int] = []
        most_queries = most_keys = own = 0
        for seq in seqs:
            num_queries, num_keys = shapes[seq]
            queries, keys = max(most_queries, num_queries), max(most_keys, num_keys)
            scores, size = own + num_queries * num_keys, len(part) + 1
            bytes_ = _dense_bytes(size, queries, keys, num_q_heads, num_kv_heads, head_dim)
            if part and (
                bytes_ > DENSE_ATTENTION_BYTES
                or num_q_heads * (size * queries * keys - 2 * scores) > PADDING_SLACK_SCORES
            ):
                parts.append((part, most_queries, most_keys, True))
                part, queries, keys, scores = [], num_queries, num_keys, num_queries * num_keys
            part.append(seq)
            most_queries, most_keys, own = queries, keys, scores
        parts.append((part, most_queries, most_keys, True))
    make_group = functools.partial(
        _make_group,
        shapes=shapes,
        lens=lens,
        starts=starts,
        block_tables=block_tables,
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        num_q_heads=num_q_heads,
        sliding_window=sliding_window,
    )
    groups = [make_group(*part) for part in parts]
    tiled_plan = None
    device = block_tables.device
    if tiled:
        rows = torch.tensor([row for s in tiled for row in range(starts[s], starts[s + 1])], device=device)
        sizes = torch.tensor([0] + [starts[s + 1] - starts[s] for s in tiled])
        tiled_plan = (rows, torch.tensor(tiled, device=device), torch.cumsum(sizes, 0).to(query_start_loc))
    in_order = -1
    if not tiled and len(groups) == 1 and groups[0].keep is None and parts[0][0] == list(shapes):
        in_order = starts[-1]  # every sequence with queries, in order, unpadded: rows 0 .. T-1
    return _AttentionPlan(groups, tiled_plan, in_order)


def _make_group(
    part: list[int],
    num_queries: int,
    num_keys: int,
    padded: bool,
    shapes: dict[int, tuple[int, int]],
    lens: list[int],
    starts: list[int],
    block_tables: torch.Tensor,
    num_kv_heads: int,
    block_size: int,
    num_q_heads: int,
    sliding_window: int | None,
) -> _Group:
    """The group of sequences `part` (see `_Group`) with up to `num_queries` queries and `num_keys` keys each,
    `padded`: shorter ones padded at the end (else all have these shapes)."""
    device = block_tables.device
    num_seqs = len(part)
    group_size = num_q_heads // num_kv_heads
    if not padded and num_queries == 1 and num_seqs * num_kv_heads * num_keys <= SMALL_ROWS:
        kv_rows = []
        for s in part:
            first = lens[s] - num_keys
            table = block_tables[s, first // block_size : (lens[s] - 1) // block_size + 1].tolist()
            for head in range(num_kv_heads):
                kv_rows += [
                    (table[p // block_size - first // block_size] * num_kv_heads + head) * block_size + p % block_size
                    for p in range(first, lens[s])
                ]
        rows = torch.tensor([starts[s] for s in part], device=device)
        return _Group(rows, num_seqs, 1, num_keys, torch.tensor(kv_rows, device=device), None)
    tables = block_tables if part == list(range(len(lens))) else block_tables[part]
    first_key = torch.tensor([lens[s] - shapes[s][1] for s in part], device=device)[:, None]
    key_slots = torch.arange(num_keys, device=device)
    positions = first_key + key_slots  # [S, Lk]
    hidden = None
    if not padded:
        if num_queries > 1:
            hidden = _hidden_keys(num_queries, num_keys, group_size, sliding_window, device)
    else:
        # Padding keys repeat the last key (positions past it may be in unallocated blocks) and are hidden from
        # real queries. Key slot j of a sequence with q queries over k keys is seen by query slot t when
        # j <= k - q + t (and, windowed, j > k - q + t - window): past a short span for every real query.
        last_key = torch.tensor([lens[s] - 1 for s in part], device=device)[:, None]
        positions = torch.minimum(positions, last_key)
        offset = torch.tensor([shapes[s][1] - shapes[s][0] for s in part], device=device)[:, None]
        query_pos = offset + torch.arange(num_queries, device=device).repeat_interleave(group_size)  # [S, Tq*G]
        hidden = key_slots > query_pos[..., None]  # [S, Tq*G, Lk]
        if sliding_window is not None:
            hidden |= key_slots <= query_pos[..., None] - sliding_window
        hidden = hidden.unsqueeze(1)  # over the KV heads
    blocks = tables.gather(1, positions // block_size)
    kv_rows = _cache_rows(blocks, positions % block_size, num_kv_heads, block_size).flatten()
    if num_queries == 1:
        rows = [starts[s] for s in part]
    else:  # a sequence's queries first, padding slots repeating its last (their results dropped)
        rows = [starts[s] + min(t, shapes[s][0] - 1) for s in part for t in range(num_queries)]
    group = _Group(torch.tensor(rows, device=device), num_seqs, num_queries, num_keys, kv_rows, hidden)
    if padded and any(shapes[s][0] != num_queries for s in part):
        keep = [i * num_queries + t for i, s in enumerate(part) for t in range(shapes[s][0])]
        group.keep = torch.tensor(keep, device=device)
        group.targets = group.rows[group.keep]
    return group


def _dense_bytes(
    num_seqs: int, num_queries: int, num_keys: int, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> int:
    """fp32 bytes `_dense_attention` holds for these sizes: scores three times over (scores, with the sink
    column, probabilities) and the gathered keys and values."""
    return 4 * num_seqs * num_keys * (3 * num_q_heads * num_queries + 2 * num_kv_heads * head_dim)


@functools.lru_cache(maxsize=16)  # each at most DENSE_ATTENTION_BYTES / 12 bytes
def _hidden_keys(
    num_queries: int, num_keys: int, group: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """`[Tq * G, Lk]` True where a query row (query by query, the G heads of a KV group within) must not see a
    key: after it (causal) or `sliding_window` or more before it. Queries are the last Tq of the Lk positions.
    Shared between calls: never written to."""
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device).repeat_interleave(group)[:, None]
    key_pos = torch.arange(num_keys, device=device)[None, :]
    hidden = key_pos > query_pos
    if sliding_window is not None:
        hidden |= key_pos <= query_pos - sliding_window
    return hidden


# Decoding's sink columns by (sinks, sequences): made once per layer and batch size, not once per step, and
# kept while those very sinks live unwritten (by weak reference and version counter; inference-mode tensors keep
# no version counter, as with `ExpertCache`).
_SINK_COLUMNS: dict[tuple[int, int], tuple[weakref.ref, int, torch.Tensor]] = {}


def _sink_column(sinks: torch.Tensor, num_seqs: int, num_queries: int, num_kv_heads: int) -> torch.Tensor:
    """Each score row's sink logit, fp32 `[S * Hkv, Tq * G, 1]` (rows as in `_dense_attention`)."""
    group_size = sinks.shape[0] // num_kv_heads
    if num_queries == 1:  # decoding: kept while the layer's sinks are alive and unchanged
        known = _SINK_COLUMNS.get((id(sinks), num_seqs))
        if known is not None and known[0]() is sinks and known[1] == _version(sinks):
            return known[2]
    column = sinks.to(torch.float32).view(1, num_kv_heads, 1, group_size)
    column = column.expand(num_seqs, -1, num_queries, -1).reshape(num_seqs * num_kv_heads, -1, 1)
    if num_queries == 1:
        if len(_SINK_COLUMNS) >= 1024:  # layers x batch sizes seen; a new model's start over
            _SINK_COLUMNS.clear()
        _SINK_COLUMNS[(id(sinks), num_seqs)] = (weakref.ref(sinks), _version(sinks), column)
    return column


def _dense_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: _Group,
    sinks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one group's queries `[S * Tq, Hq, D]` (any strides) over their keys: `[S * Tq, Hq, D]`
    contiguous, in the query's dtype. Math in fp32, the sink logit a column of the softmax."""
    _, num_q_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[1]
    group_size = num_q_heads // num_kv_heads
    num_seqs, num_queries, num_keys = group.num_seqs, group.num_queries, group.num_keys
    batch = num_seqs * num_kv_heads  # one matmul per (sequence, KV head)
    keys = k_cache.view(-1, head_dim).index_select(0, group.kv_rows).view(batch, num_keys, head_dim)
    values = v_cache.view(-1, head_dim).index_select(0, group.kv_rows).view(batch, num_keys, head_dim)
    if keys.dtype != torch.float32:
        keys, values = keys.float(), values.float()
    if num_queries == 1:
        # [S, Hq, D] is already [S, Hkv, G, D]; the scale goes on q, in the copy made anyway (the same bits for
        # gpt-oss's 1/8, a power of two; a rounding apart otherwise).
        q = query * scale if query.dtype == torch.float32 else query.float().mul_(scale)
        scores = torch.bmm(q.reshape(batch, group_size, head_dim), keys.transpose(1, 2))  # [batch, G, Lk]
    else:  # rows: query, then head within the KV group
        q = query.reshape(num_seqs, num_queries, num_kv_heads, group_size, head_dim).transpose(1, 2)
        q = q.reshape(batch, num_queries * group_size, head_dim)
        if q.dtype != torch.float32:
            q = q.float()
        scores = torch.bmm(q, keys.transpose(1, 2)).mul_(scale)  # [batch, Tq * G, Lk]
    if group.hidden is not None:
        scores.view(num_seqs, num_kv_heads, -1, num_keys).masked_fill_(group.hidden, float("-inf"))
    sink = _sink_column(sinks, num_seqs, num_queries, num_kv_heads)  # [batch, Tq * G, 1]
    # The sink first and padding keys (exact zeros after the softmax) last: a real key keeps its place in the
    # softmax's sums however far its group is padded (a decoding sequence's bits then did not depend on its
    # group here; a BLAS may still block the padded matmuls otherwise, so that is not promised).
    probs = torch.softmax(torch.cat((sink, scores), dim=-1), dim=-1)[..., 1:]
    out = torch.bmm(probs, values)  # [batch, Tq * G, D]
    if num_queries == 1:
        out = out.view(num_seqs, num_q_heads, head_dim)
    else:
        out = out.view(num_seqs, num_kv_heads, num_queries, group_size, head_dim).transpose(1, 2)
        out = out.reshape(num_seqs * num_queries, num_q_heads, head_dim)
    return out if out.dtype == query.dtype else out.to(query.dtype)
