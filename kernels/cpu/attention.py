"""Attention, RoPE and the KV write on the CPU path: `kernels.reference`'s paged attention, RoPE and KV write
with sequences batched and the step's index arithmetic done once per step.

The references loop over sequences in Python, a dozen small ops each, and recompute their indices on every
layer. Here sequences go through attention in groups (`paged_attention`): one gather of the keys/values they
see and two batched matmuls per group, within a memory bound (else the tiled reference); with batch invariance
a group holds one shape only and prompts take the tiled reference, without it all decoding sequences are one
group and prompts share groups too, padded. RoPE rotates q and k heads together; what depends only on the step
(cos/sin rows, cache rows, the grouping) is made by the first layer that needs it and reused by the others
(`memo.STEP_MEMO`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from gptoss.kernels.cpu.memo import STEP_MEMO, TensorStamp
from gptoss.kernels.reference import paged_attention_reference, write_kv_reference

# The caches `[num_blocks, Hkv, block_size, D]` are read and written as `[num_blocks * Hkv * block_size, D]`:
# the D values of (block b, KV head h, offset o) are row `(b * Hkv + h) * block_size + o`. One `index_select` of
# precomputed rows gathers what a batch of sequences sees, in the layout the batched matmuls want; advanced
# indexing on dims 0 and 2 (`cache[blocks, :, offsets]`) cost five times as much.


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

    def make() -> tuple[TensorStamp, TensorStamp, torch.Tensor, torch.Tensor]:
        cos, sin = cos_table[positions].to(dtype), sin_table[positions].to(dtype)
        whole_cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
        signed_sin = torch.cat((-sin, sin), dim=-1).unsqueeze(1)
        return TensorStamp(cos_table), TensorStamp(sin_table), whole_cos, signed_sin

    # The tables are the model's (16 MB each at gpt-oss-120b's 131k positions): known by stamp, not content.
    key = ("rope", id(cos_table), id(sin_table), dtype)
    value = STEP_MEMO.get(key, (positions,), make, lambda v: v[0].matches(cos_table) and v[1].matches(sin_table))
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

    keep, rows = STEP_MEMO.get(("write", num_kv_heads, block_size), (slot_mapping,), make)  # rows [T', Hkv]
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
    return STEP_MEMO.get(key, sources, make)


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
_SINK_COLUMNS: dict[tuple[int, int], tuple[TensorStamp, torch.Tensor]] = {}


def _sink_column(sinks: torch.Tensor, num_seqs: int, num_queries: int, num_kv_heads: int) -> torch.Tensor:
    """Each score row's sink logit, fp32 `[S * Hkv, Tq * G, 1]` (rows as in `_dense_attention`)."""
    group_size = sinks.shape[0] // num_kv_heads
    if num_queries == 1:  # decoding: kept while the layer's sinks are alive and unchanged
        known = _SINK_COLUMNS.get((id(sinks), num_seqs))
        if known is not None and known[0].matches(sinks):
            return known[1]
    column = sinks.to(torch.float32).view(1, num_kv_heads, 1, group_size)
    column = column.expand(num_seqs, -1, num_queries, -1).reshape(num_seqs * num_kv_heads, -1, 1)
    if num_queries == 1:
        if len(_SINK_COLUMNS) >= 1024:  # layers x batch sizes seen; a new model's start over
            _SINK_COLUMNS.clear()
        _SINK_COLUMNS[(id(sinks), num_seqs)] = (TensorStamp(sinks), column)
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
