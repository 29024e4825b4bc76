"""kernels/reference.py, the CPU path: tiled attention against the dense formula, and batch invariance of the
tiled ops (a row's bits do not depend on the rows that share its call)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from gptoss.kernels import reference

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 6, 2, 16, 4


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """The textbook formula (what the reference computed before it was tiled): full fp32 scores `[Hq, Tq, Tk]`,
    the sink as one more softmax column."""
    group = query.shape[1] // key.shape[1]
    q = query.float().transpose(0, 1)
    k = key.float().repeat_interleave(group, dim=1).transpose(0, 1)
    v = value.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q @ k.transpose(1, 2) * scale
    key_positions = torch.arange(key.shape[0])
    visible = key_positions[None, :] <= positions[:, None]
    if window is not None:
        visible &= key_positions[None, :] > positions[:, None] - window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    logits = torch.cat((scores, sinks[:, None, None].expand(-1, scores.shape[1], 1)), dim=-1)
    return (torch.softmax(logits, dim=-1)[..., :-1] @ v).transpose(0, 1)


class PagedSequence:
    """One sequence's keys/values in a paged cache with shuffled blocks, plus queries for every position."""

    def __init__(self, seq_len: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        num_blocks = math.ceil(seq_len / BLOCK_SIZE)
        self.seq_len = seq_len
        self.key = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        self.value = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen)
        self.query = torch.randn(seq_len, NUM_Q_HEADS, HEAD_DIM, generator=gen)
        self.sinks = torch.randn(NUM_Q_HEADS, generator=gen)
        pool = num_blocks + 5
        self.block_table = torch.randperm(pool, generator=gen)[:num_blocks].to(torch.int32)
        # Unused blocks hold NaN: a read outside the sequence (or a freed block) would show.
        shape = (pool, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
        self.k_cache, self.v_cache = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
        slots = self.block_table.long()[torch.arange(seq_len) // BLOCK_SIZE] * BLOCK_SIZE
        reference.write_kv_reference(
            self.key, self.value, self.k_cache, self.v_cache, (slots + torch.arange(seq_len) % BLOCK_SIZE)
        )

    def attend(self, q_begin: int, q_end: int, window: int | None, fixed_key_tile: bool = True) -> torch.Tensor:
        """Queries `q_begin:q_end`, the cache holding the keys up to `q_end` (as in a prefill chunk)."""
        positions = torch.arange(q_begin, q_end)
        return reference.attention_with_sinks(
            self.query[q_begin:q_end],
            positions,
            self.k_cache,
            self.v_cache,
            self.block_table,
            q_end,
            self.sinks,
            HEAD_DIM**-0.5,
            window,
            fixed_key_tile,
        )


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 4 queries and 8 keys, so short sequences cross many of both."""
    monkeypatch.setattr(reference, "ATTENTION_QUERY_TILE", 4)
    monkeypatch.setattr(reference, "ATTENTION_KEY_TILE", 8)


@pytest.mark.parametrize("fixed_key_tile", [True, False])
@pytest.mark.parametrize("window", [None, 5, 13])
def test_tiled_attention_matches_the_dense_formula(small_tiles: None, window: int | None, fixed_key_tile: bool) -> None:
    seq = PagedSequence(61, seed=0)
    for q_begin, q_end in [(0, 61), (0, 1), (37, 61), (60, 61), (22, 29)]:
        out = seq.attend(q_begin, q_end, window, fixed_key_tile)
        expected = dense_attention(
            seq.query[q_begin:q_end],
            seq.key[:q_end],
            seq.value[:q_end],
            torch.arange(q_begin, q_end),
            seq.sinks,
            HEAD_DIM**-0.5,
            window,
        )
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_windowed_attention_reads_no_block_before_the_window(small_tiles: None) -> None:
    seq = PagedSequence(40, seed=1)
    expected = seq.attend(30, 40, window=5)
    # Free (poison) every block wholly before the window of the first query (position 30 sees 26..30).
    for block in range(26 // BLOCK_SIZE):
        seq.k_cache[seq.block_table[block]] = float("nan")
        seq.v_cache[seq.block_table[block]] = float("nan")
    assert torch.equal(seq.attend(30, 40, window=5), expected)


@pytest.mark.parametrize("window", [None, 7])
def test_each_query_is_bit_identical_however_it_is_chunked(small_tiles: None, window: int | None) -> None:
    """A query's output does not depend on which other queries share its call (chunked prefill, prefix reuse,
    decode one at a time): every chunking of the same sequence gives the same bits."""
    seq = PagedSequence(45, seed=2)
    whole = seq.attend(0, 45, window)
    for chunks in ([(0, 45)], [(0, 1), (1, 45)], [(0, 13), (13, 14), (14, 30), (30, 45)]):
        parts = torch.cat([seq.attend(begin, end, window) for begin, end in chunks])
        assert torch.equal(parts, whole), chunks
    one_by_one = torch.cat([seq.attend(p, p + 1, window) for p in range(45)])
    assert torch.equal(one_by_one, whole)


def test_linear_rows_are_independent_of_the_batch() -> None:
    """torch's own CPU linear gives a row different bits at different row counts (shown here, so the test
    keeps proving something); the fixed-shape tiles do not."""
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(729, 96, generator=gen), torch.randn(729, generator=gen)
    x = torch.randn(40, 96, generator=gen)
    plain = torch.nn.functional.linear(x, weight, bias)
    assert any(not torch.equal(torch.nn.functional.linear(x[:m], weight, bias), plain[:m]) for m in range(1, 40))
    tiled = reference.linear_fixed_shape(x, weight, bias)
    torch.testing.assert_close(tiled, plain, rtol=1e-5, atol=1e-5)
    for m in range(1, 40):
        rows = torch.randperm(40, generator=gen)[:m]
        assert torch.equal(reference.linear_fixed_shape(x[rows], weight, bias), tiled[rows])
    assert reference.linear_fixed_shape(x[:0], weight, bias).shape == (0, 729)


@pytest.mark.parametrize("implementation", ["reference", "cpu"])
def test_moe_rows_are_independent_of_the_batch(implementation: str) -> None:
    """Each token's MoE output has the same bits whatever other tokens (routed to its experts) share the step:
    the reference and the CPU path (kernels/cpu/, cached experts) alike."""
    from gptoss.kernels import cpu

    moe = (
        reference.moe_reference
        if implementation == "reference"
        else functools.partial(cpu.moe, cache=cpu.ExpertCache())
    )
    gen = torch.Generator().manual_seed(4)
    hidden, inter, experts = 64, 64, 4
    blocks = lambda *shape: torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)  # noqa: E731
    scales = lambda *shape: torch.randint(120, 130, shape, dtype=torch.uint8, generator=gen)  # noqa: E731
    weights = (
        blocks(experts, 2 * inter, hidden // 32, 16),
        scales(experts, 2 * inter, hidden // 32),
        torch.randn(experts, 2 * inter, generator=gen),
        blocks(experts, hidden, inter // 32, 16),
        scales(experts, hidden, inter // 32),
        torch.randn(experts, hidden, generator=gen),
    )
    x = torch.randn(37, hidden, generator=gen)
    router = torch.randn(37, experts, generator=gen)
    whole = moe(x, router, *weights, top_k=2)
    for m in (1, 2, 5, 17, 36):
        rows = torch.randperm(37, generator=gen)[:m]
        assert torch.equal(moe(x[rows], router[rows], *weights, top_k=2), whole[rows])
