"""The MoE on the CPU path: `kernels.reference.moe_reference` with cached dequantised experts.

The reference dequantises every routed expert's MXFP4 weights on every step (about half of a tiny model's
step). Here dequantised experts are kept in a least-recently-used cache bounded by a byte budget
(`set_expert_cache_budget`, from `EngineArgs.cpu_expert_cache_gb`), w1's gate and up rows as two halves (a
contiguous SwiGLU) and 1/alpha folded into w2. With batch invariance tokens are grouped by expert with one sort
and go through each expert in fixed-shape row tiles; without it (the CPU default) a small model's experts are
kept stacked and a step's tokens go through all of them in two batched matmuls.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from gptoss.kernels.cpu.memo import TensorStamp
from gptoss.kernels.reference import map_row_tiles, mxfp4_dequantize, route_topk

DEFAULT_EXPERT_CACHE_BYTES = 4 << 30

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
        self._layers: dict[int, tuple[TensorStamp, ...]] = {}  # id of the first source -> the sources' stamps
        self._entries: OrderedDict[tuple[int, Hashable], Expert] = OrderedDict()  # (layer id, expert) -> tensors

    def layer(self, sources: tuple[torch.Tensor, ...]) -> int:
        """The key of the MoE layer whose packed tensors (and biases) are `sources`; stale entries dropped."""
        key = id(sources[0])
        known = self._layers.get(key)
        if known is not None and all(stamp.matches(t) for stamp, t in zip(known, sources, strict=True)):
            return key
        self._drop_layers([key] + [k for k, stamps in self._layers.items() if not all(s.alive for s in stamps)])
        self._layers[key] = tuple(TensorStamp(t) for t in sources)
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
    expert_ids, expert_weights = route_topk(router_logits, top_k, id_dtype=torch.int64)  # ids for indexing
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
