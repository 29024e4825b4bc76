"""The CPU path: the references of `kernels/reference.py` rearranged for speed, equal to them up to rounding.

Where the references favour clarity, a CPU decode step paid for it in two places:
- the MoE dequantised every routed expert's MXFP4 weights on every step (about half of a tiny model's step).
  Here dequantised experts are kept in a least-recently-used cache bounded by a byte budget
  (`set_expert_cache_budget`, from `EngineArgs.cpu_expert_cache_gb`); tokens are grouped by expert with one
  sort, and each token's k expert outputs are combined by one weighted sum (no `index_add_` per expert);
- attention looped over sequences in Python, a dozen small ops each. A decode-only batch (one query per
  sequence, the steady state of continuous batching) here is one gather of the keys/values each query sees
  and two batched matmuls; batches with prefill rows still take the reference.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from gptoss.kernels.reference import mxfp4_dequantize, paged_attention_reference, route_topk, write_kv_reference

DEFAULT_EXPERT_CACHE_BYTES = 4 << 30


class ExpertCache:
    """Dequantised fp32 expert weights, least recently used first out once `budget_bytes` would be exceeded.

    Keyed by the packed tensor's storage address, its version counter (bumped by every in-place write, so
    reloading weights into the same tensor never serves stale values; inference-mode tensors have none) and
    what was made of it (one expert, or all of them stacked). An entry also holds a weak reference to the
    tensor it was made from: a new tensor at a freed one's address (another model loaded in this process)
    is a miss, not the old model's experts.
    """

    def __init__(self, budget_bytes: int = DEFAULT_EXPERT_CACHE_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[int, int, object], tuple[weakref.ref, torch.Tensor]] = OrderedDict()

    def lookup(self, source: tuple[torch.Tensor, ...], what: object, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached `make()` for (`source` tensors, `what`), made and kept (within budget) when missing."""
        key = (source[0].data_ptr(), sum(_version(t) for t in source), what)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is source[0]:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry[1]
        if entry is not None:  # made from a tensor since freed, whose address this one reuses
            del self._entries[key]
            self.used_bytes -= entry[1].numel() * entry[1].element_size()
        self.misses += 1
        value = make()
        size = value.numel() * value.element_size()
        if size <= self.budget_bytes:
            self.shrink_to(self.budget_bytes - size)
            self._entries[key] = (weakref.ref(source[0]), value)
            self.used_bytes += size
        return value

    def get(self, blocks: torch.Tensor, scales: torch.Tensor, expert: int, deinterleave: bool = False) -> torch.Tensor:
        """`[rows, cols]` fp32 weights of `expert` from its packed `blocks` / `scales` (`[E, rows, cols/32, 16]`);
        `deinterleave`: the even rows first, then the odd ones (gate/up of w1 as two contiguous halves)."""

        def make() -> torch.Tensor:
            weight = mxfp4_dequantize(blocks[expert], scales[expert])
            return _deinterleave(weight, dim=0) if deinterleave else weight

        return self.lookup((blocks, scales), (expert, deinterleave), make)

    def get_all(self, blocks: torch.Tensor, scales: torch.Tensor, deinterleave: bool = False) -> torch.Tensor:
        """Every expert's weights `[E, rows, cols]` as one right-hand side of a matmul over all experts:
        `[cols, E * rows]` with `deinterleave` (w1: x `[T, cols]` @ it = every expert's gate/up, side by side),
        else `[E * cols, rows]` (w2: activations of every expert side by side @ it = their sum)."""

        def make() -> torch.Tensor:
            weight = mxfp4_dequantize(blocks, scales)  # [E, rows, cols]
            if deinterleave:
                return _deinterleave(weight, dim=1).flatten(0, 1).t().contiguous()
            return weight.transpose(1, 2).flatten(0, 1).contiguous()

        return self.lookup((blocks, scales), ("all", deinterleave), make)

    def shrink_to(self, budget_bytes: int) -> None:
        """Drop least recently used entries until at most `budget_bytes` are held."""
        while self._entries and self.used_bytes > budget_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.used_bytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self.used_bytes = 0


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
) -> torch.Tensor:
    """`kernels.reference.moe_reference`, with cached dequantised experts and one combine (math in fp32)."""
    cache = EXPERT_CACHE if cache is None else cache
    num_tokens, hidden = x.shape
    num_experts = w1_blocks.shape[0]
    expert_ids, expert_weights = route_topk(router_logits, top_k)
    x32 = x.to(torch.float32)
    # w1's gate/up rows (and bias) are used as two halves, gate first, so the SwiGLU reads contiguous columns.
    w1_bias32 = cache.lookup((w1_bias,), "bias", lambda: _deinterleave(w1_bias.to(torch.float32), dim=1))
    w2_bias32 = w2_bias.to(torch.float32)

    def swiglu_halves(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        gate = gate.clamp_(max=swiglu_limit)
        up = up.clamp_(min=-swiglu_limit, max=swiglu_limit).add_(1)
        return up.mul_(gate * torch.sigmoid(swiglu_alpha * gate))

    intermediate = w2_blocks.shape[2] * 32
    if _dense_is_cheaper(num_tokens, num_experts, top_k, hidden, intermediate):
        # Every expert on every token, in two plain matmuls over the experts side by side: far fewer ops than
        # a loop over experts when the experts are small and most are routed to anyway (tiny models, small
        # batches). Unrouted experts get weight 0, folded into the activations before the down projection.
        w1 = cache.get_all(w1_blocks, w1_scales, deinterleave=True)  # [H, E * 2I]
        w2 = cache.get_all(w2_blocks, w2_scales)  # [E * I, H]
        routing = torch.zeros(num_tokens, num_experts, dtype=torch.float32, device=x.device)
        routing.scatter_(1, expert_ids.long(), expert_weights)
        h = torch.addmm(w1_bias32.view(-1), x32, w1).view(num_tokens, num_experts, 2 * intermediate)
        act = swiglu_halves(h).mul_(routing.unsqueeze(-1))  # [T, E, I]
        return torch.addmm(routing @ w2_bias32, act.reshape(num_tokens, -1), w2).to(x.dtype)

    def expert_mlp(expert: int, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        w1 = cache.get(w1_blocks, w1_scales, expert, deinterleave=True)
        act = swiglu_halves(torch.nn.functional.linear(rows, w1, w1_bias32[expert]))
        w2 = cache.get(w2_blocks, w2_scales, expert)
        return torch.nn.functional.linear(act, w2, w2_bias32[expert], out=out)

    if num_tokens == 1:  # decode at batch 1: k experts, no grouping
        outs = torch.cat([expert_mlp(expert, x32) for expert in expert_ids[0].tolist()])  # [k, H]
        return (expert_weights @ outs).to(x.dtype)
    flat_experts = expert_ids.flatten()
    # Token-slot pairs grouped by expert: one sort, then contiguous runs.
    order = torch.argsort(flat_experts, stable=True)
    experts, counts = torch.unique_consecutive(flat_experts[order], return_counts=True)
    rows = x32[order // top_k]  # [T*k, H], grouped by expert
    out_sorted = torch.empty(num_tokens * top_k, hidden, dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
        end = start + count
        expert_mlp(expert, rows[start:end], out=out_sorted[start:end])
        start = end
    # Back to token-major order: row t*k + j is token t's j-th expert; then each token's weighted sum.
    per_slot = torch.empty_like(out_sorted)
    per_slot[order] = out_sorted
    combined = torch.bmm(expert_weights.unsqueeze(1), per_slot.view(num_tokens, top_k, -1)).squeeze(1)
    return combined.to(x.dtype)


# What one more small op costs on a CPU, in multiply-adds of the same time (about 40 us at ~25 GFLOP/s).
_OP_OVERHEAD_FLOPS = 1_000_000
# Ops of one expert in the loop (weights and bias lookups, two matmuls, the SwiGLU).
_OPS_PER_EXPERT = 12


def _dense_is_cheaper(num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int) -> bool:
    """Whether running every expert on every token costs less than looping over the routed ones: the extra
    multiply-adds against the per-expert ops saved. Only ever true for small experts."""
    if num_tokens < 2:
        return False
    flops_per_row = 6 * hidden * intermediate  # gate/up (2I x H) and down (H x I), 2 flops per multiply-add
    extra = num_tokens * (num_experts - top_k) * flops_per_row
    saved = min(num_experts, num_tokens * top_k) * _OPS_PER_EXPERT * _OP_OVERHEAD_FLOPS
    return extra < saved


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """`kernels.reference.write_kv_reference`; without the padding mask when no slot is negative."""
    if int(slot_mapping.min()) < 0:
        write_kv_reference(key, value, k_cache, v_cache, slot_mapping)
        return
    block_size = k_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, :, offsets] = key.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = value.to(v_cache.dtype)


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
    max_query_len: int,
) -> torch.Tensor:
    """`kernels.reference.paged_attention_reference`; decode-only batches (`max_query_len == 1`, one query per
    sequence) batched over the sequences."""
    num_seqs = seq_lens.shape[0]
    if max_query_len != 1 or query.shape[0] != num_seqs:
        return paged_attention_reference(
            query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, sinks, scale, sliding_window
        )
    return decode_attention(query, k_cache, v_cache, block_tables, seq_lens, sinks, scale, sliding_window)


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One query per sequence `[S, Hq, D]` (at position seq_len - 1) over its cached keys: `[S, Hq, D]`.

    Each sequence reads only the positions it sees (its last `sliding_window` on windowed layers, whose earlier
    blocks may be freed); shorter sequences' padding re-reads their last position and is masked out.
    """
    num_seqs, num_q_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    blocks, offsets, valid = _decode_positions(block_tables, seq_lens, k_cache.shape[2], sliding_window)
    # Advanced indices on dims 0 and 2: [S, L, Hkv, D].
    keys = k_cache[blocks, :, offsets].to(torch.float32).permute(0, 2, 3, 1)  # [S, Hkv, D, L]
    values = v_cache[blocks, :, offsets].to(torch.float32).transpose(1, 2)  # [S, Hkv, L, D]
    q = query.to(torch.float32).view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(q, keys).mul_(scale).masked_fill_(~valid, float("-inf"))  # [S, Hkv, G, L]
    sink_column = sinks.to(torch.float32).view(1, num_kv_heads, group, 1).expand(num_seqs, -1, -1, 1)
    probs = torch.softmax(torch.cat((scores, sink_column), dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs, values).view(num_seqs, num_q_heads, head_dim).to(query.dtype)


# The last step's gather indices per window: every layer of a type shares its block tables and lengths, so
# they are computed once per step, not once per layer. Entries hold the tensors they were made from (so an
# id is never reused while its entry lives).
_POSITIONS_MEMO: dict[int | None, tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[torch.Tensor, ...]]] = {}


def _decode_positions(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, sliding_window: int | None
) -> tuple[torch.Tensor, ...]:
    """Block ids and offsets `[S, L]` of the positions each sequence's query sees, and `[S, 1, 1, L]` validity."""
    memo = _POSITIONS_MEMO.get(sliding_window)
    versions = (_version(block_tables), _version(seq_lens), block_size)
    if memo is not None and memo[0] is block_tables and memo[1] is seq_lens and memo[2] == versions:
        return memo[3]
    lens = seq_lens.to(torch.int64)
    first = (lens - sliding_window).clamp_(min=0) if sliding_window is not None else torch.zeros_like(lens)
    span = int((lens - first).max())
    positions = first[:, None] + torch.arange(span, device=lens.device)[None, :]  # [S, L]
    valid = positions < lens[:, None]
    positions = torch.minimum(positions, lens[:, None] - 1)  # padding re-reads the last position
    blocks = block_tables.to(torch.int64).gather(1, positions // block_size)
    result = (blocks, positions % block_size, valid[:, None, None, :])
    _POSITIONS_MEMO[sliding_window] = (block_tables, seq_lens, versions, result)
    return result
