"""The CPU path (kernels/cpu/) against the plain references it rearranges."""

from __future__ import annotations

import functools

import pytest
import torch
from gptoss.kernels import cpu, reference
from gptoss.kernels.cpu import attention as cpu_attention
from gptoss.kernels.cpu import experts as cpu_experts
from gptoss.kernels.cpu import memo as cpu_memo


def random_moe(tokens: int, hidden: int = 64, inter: int = 96, experts: int = 5, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    router = torch.randn(tokens, experts, generator=g)
    w1_blocks = torch.randint(0, 256, (experts, 2 * inter, hidden // 32, 16), generator=g, dtype=torch.uint8)
    w1_scales = torch.randint(120, 130, (experts, 2 * inter, hidden // 32), generator=g, dtype=torch.uint8)
    w1_bias = torch.randn(experts, 2 * inter, generator=g)
    w2_blocks = torch.randint(0, 256, (experts, hidden, inter // 32, 16), generator=g, dtype=torch.uint8)
    w2_scales = torch.randint(120, 130, (experts, hidden, inter // 32), generator=g, dtype=torch.uint8)
    w2_bias = torch.randn(experts, hidden, generator=g)
    return x, router, w1_blocks, w1_scales, w1_bias, w2_blocks, w2_scales, w2_bias


@pytest.mark.parametrize("tokens", [1, 7, 40])
@pytest.mark.parametrize(
    "batch_invariant, dense_macs",
    [(True, None), (False, 0), (False, 1 << 40)],  # tiles per expert / slots gathered per expert / every expert
)
def test_moe_matches_reference(
    tokens: int, batch_invariant: bool, dense_macs: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if dense_macs is not None:
        monkeypatch.setattr(cpu_experts, "DENSE_EXTRA_MACS_MAX", dense_macs)
    args = random_moe(tokens)
    cache = cpu.ExpertCache()
    expected = reference.moe_reference(*args, top_k=2)
    atol = 1e-5 * expected.abs().max().item()  # fp32 rounding of sums in another order (outputs reach ~1e3)
    moe = functools.partial(cpu.moe, top_k=2, cache=cache, batch_invariant=batch_invariant)
    torch.testing.assert_close(moe(*args), expected, rtol=1e-4, atol=atol)
    # The second call is served from the cache and still equal.
    misses = cache.misses
    torch.testing.assert_close(moe(*args), expected, rtol=1e-4, atol=atol)
    assert cache.misses == misses and cache.hits > 0


def test_expert_cache_stays_within_budget_and_sees_weight_updates() -> None:
    args = random_moe(20)
    one_expert = (2 * 96 * 64 + 2 * 96 + 64 * 96 + 64) * 4  # w1, its bias, w2, its bias in fp32
    cache = cpu.ExpertCache(budget_bytes=one_expert + 100)  # room for one expert of the five
    cpu.moe(*args, top_k=2, cache=cache)
    assert 0 < cache.used_bytes <= cache.budget_bytes
    # Writing new weights in place (a reload) is never answered from the cache.
    args[2].copy_(torch.randint(0, 256, args[2].shape, dtype=torch.uint8))
    expected = reference.moe_reference(*args, top_k=2)
    atol = 1e-5 * expected.abs().max().item()
    cpu.moe(*args, top_k=2, cache=cache)
    torch.testing.assert_close(cpu.moe(*args, top_k=2, cache=cache), expected, atol=atol, rtol=1e-4)
    # Another tensor at the same address (as a new model's weights after a freed one's) is not served.
    misses = cache.misses
    cpu.moe(args[0], args[1], args[2].view_as(args[2]), *args[3:], top_k=2, cache=cache)
    assert cache.misses > misses
    disabled = cpu.ExpertCache(budget_bytes=0)
    cpu.moe(*args, top_k=2, cache=disabled)
    assert disabled.used_bytes == 0


@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_reference(window: int | None) -> None:
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block, num_blocks = 6, 2, 16, 4, 40
    k_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=g)
    v_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=g)
    seq_lens = torch.tensor([1, 9, 13, 4], dtype=torch.int32)
    tables = torch.randperm(num_blocks, generator=g)[:16].view(4, 4).to(torch.int32)
    if window is not None:
        tables[2, 0] = -1  # a block that left the window and was freed: never read
    query = torch.randn(4, heads, dim, generator=g)
    sinks = torch.randn(heads, generator=g)
    starts = torch.arange(5, dtype=torch.int32)
    expected = reference.paged_attention_reference(
        query, k_cache, v_cache, tables, starts, seq_lens, sinks, 0.25, window
    )
    got = cpu.paged_attention(query, k_cache, v_cache, tables, starts, seq_lens, sinks, 0.25, window)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_is_batch_invariant_and_mixes_prefill_and_decode() -> None:
    """A sequence's output is bit-identical alone or beside others (decoding or prefilling), and equal to the
    reference's up to rounding."""
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, block, num_blocks, window = 4, 2, 8, 4, 64, 6
    k_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=g)
    v_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=g)
    sinks = torch.randn(heads, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[:20].view(4, 5).to(torch.int32)
    seq_lens = torch.tensor([9, 17, 9, 12], dtype=torch.int32)
    q_lens = [1, 1, 3, 1]  # sequence 2 prefills its last 3 positions
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(q_lens), heads, dim, generator=g)
    for w in (None, window):
        both = cpu.paged_attention(query, k_cache, v_cache, tables, starts, seq_lens, sinks, 0.3, w)
        expected = reference.paged_attention_reference(query, k_cache, v_cache, tables, starts, seq_lens, sinks, 0.3, w)
        torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)
        for seq in range(4):
            rows = slice(int(starts[seq]), int(starts[seq + 1]))
            alone = cpu.paged_attention(
                query[rows], k_cache, v_cache, tables[seq : seq + 1], torch.tensor([0, q_lens[seq]], dtype=torch.int32),
                seq_lens[seq : seq + 1], sinks, 0.3, w,
            )  # fmt: skip
            assert torch.equal(alone, both[rows]), (w, seq)


def random_paged_kv(
    g: torch.Generator, num_blocks: int = 64, kv_heads: int = 2, block: int = 4, dim: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.randn(num_blocks, kv_heads, block, dim, generator=g),
        torch.randn(num_blocks, kv_heads, block, dim, generator=g),
    )


def ragged_step(g: torch.Generator, q_lens: list[int], seq_lens: list[int], heads: int, dim: int, num_blocks: int):
    """Query rows, query starts, lengths and block tables (distinct random blocks) of one step."""
    max_blocks = -(-max(seq_lens) // 4)
    tables = torch.randperm(num_blocks, generator=g)[: len(seq_lens) * max_blocks].view(len(seq_lens), -1)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(q_lens), heads, dim, generator=g)
    return query, starts, torch.tensor(seq_lens, dtype=torch.int32), tables.to(torch.int32)


def poison_all_but_live_keys(
    caches: tuple[torch.Tensor, ...], tables: torch.Tensor, q_lens: list[int], seq_lens: list[int], window: int | None
) -> None:
    """NaN in every cache slot but the keys some query of the step sees: reading any other slot (past a
    sequence's end, before its window, another sequence's) shows in the output."""
    block = caches[0].shape[2]
    live = torch.zeros(caches[0].shape[0], block, dtype=torch.bool)
    for seq, (num_queries, length) in enumerate(zip(q_lens, seq_lens, strict=True)):
        first = 0 if window is None else max(0, length - num_queries - window + 1)
        for pos in range(first, length if num_queries else first):
            live[int(tables[seq, pos // block]), pos % block] = True
    for cache in caches:
        cache.masked_fill_(~live[:, None, :, None], float("nan"))


# A step of every kind at once: equal prompts (one batched group), a prompt chunk over earlier keys, prompts whose
# lengths are no multiple of the block size (4), decoding sequences of equal and unequal spans, a sequence with
# no query this step.
RAGGED_Q_LENS = [5, 5, 3, 1, 1, 1, 7, 0, 2]
RAGGED_SEQ_LENS = [5, 5, 11, 9, 9, 14, 7, 6, 22]


@pytest.fixture(params=["python rows", "tensor rows"])
def rows_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache rows computed in Python (few of them, as at batch 1) or by tensor ops (`cpu.attention.SMALL_ROWS`)."""
    if request.param == "tensor rows":
        monkeypatch.setattr(cpu_attention, "SMALL_ROWS", 0)
    cpu_memo.STEP_MEMO._entries.clear()  # plans made by the other path are not reused


@pytest.mark.parametrize("window", [None, 3, 6])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_batched_attention_matches_reference_on_a_ragged_mixed_step(
    window: int | None, batch_invariant: bool, rows_path: None
) -> None:
    g = torch.Generator().manual_seed(3)
    heads, dim = 6, 8
    k_cache, v_cache = random_paged_kv(g, dim=dim)
    sinks = torch.randn(heads, generator=g)
    query, starts, seq_lens, tables = ragged_step(g, RAGGED_Q_LENS, RAGGED_SEQ_LENS, heads, dim, 64)
    poison_all_but_live_keys((k_cache, v_cache), tables, RAGGED_Q_LENS, RAGGED_SEQ_LENS, window)
    args = (k_cache, v_cache, tables, starts, seq_lens, sinks, 0.3, window)
    expected = reference.paged_attention_reference(query, *args)
    got = cpu.paged_attention(query, *args, batch_invariant=batch_invariant)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plan = cpu_attention._make_attention_plan(tables, seq_lens, starts, 2, 4, dim, heads, window, batch_invariant)
    decoding = [(grp.num_seqs, grp.num_keys, grp.hidden is None) for grp in plan.groups if grp.num_queries == 1]
    prompts = [(grp.num_seqs, grp.keep is None) for grp in plan.groups if grp.num_queries > 1]
    if not batch_invariant:  # one group each; on full layers spans 9, 9, 14 padded to 14, prompts to 7 queries
        assert decoding == ([(3, 14, False)] if window is None else [(3, window, True)])
        assert prompts == [(5, False)]
    else:  # by span
        assert decoding == ([(2, 9, True), (1, 14, True)] if window is None else [(3, window, True)])
    # Queries given as a strided view (as `cpu.rope_write_kv` returns them) give the same bits.
    padded = torch.cat((query, torch.randn(query.shape[0], 2, dim, generator=g)), dim=1)
    assert torch.equal(cpu.paged_attention(padded[:, :heads], *args, batch_invariant=batch_invariant), got)


@pytest.mark.parametrize("window", [None, 4])
def test_batched_attention_of_unequal_prompts_alone_in_a_step(window: int | None) -> None:
    """Every sequence a prompt, in an order their sorting by shape changes (one padded group), over caches
    holding NaN wherever no query may read."""
    g = torch.Generator().manual_seed(7)
    heads, dim = 4, 8
    q_lens = seq_lens = [6, 3, 9, 2, 6]
    k_cache, v_cache = random_paged_kv(g, dim=dim)
    sinks = torch.randn(heads, generator=g)
    query, starts, lens, tables = ragged_step(g, q_lens, seq_lens, heads, dim, 64)
    poison_all_but_live_keys((k_cache, v_cache), tables, q_lens, seq_lens, window)
    args = (k_cache, v_cache, tables, starts, lens, sinks, 0.3, window)
    got = cpu.paged_attention(query, *args, batch_invariant=False)
    plan = cpu_attention._make_attention_plan(tables, lens, starts, 2, 4, dim, heads, window, False)
    assert [grp.num_seqs for grp in plan.groups] == [5]
    torch.testing.assert_close(got, reference.paged_attention_reference(query, *args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_batched_attention_in_bfloat16(batch_invariant: bool) -> None:
    """bf16 queries and caches: math in fp32 as the reference's, the result rounded once to bf16."""
    g = torch.Generator().manual_seed(8)
    heads, dim = 6, 8
    k_cache, v_cache = (t.to(torch.bfloat16) for t in random_paged_kv(g, dim=dim))
    sinks = torch.randn(heads, generator=g)
    query, starts, seq_lens, tables = ragged_step(g, RAGGED_Q_LENS, RAGGED_SEQ_LENS, heads, dim, 64)
    query = query.to(torch.bfloat16)
    args = (k_cache, v_cache, tables, starts, seq_lens, sinks, 0.3, 6)
    got = cpu.paged_attention(query, *args, batch_invariant=batch_invariant)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference.paged_attention_reference(query, *args), rtol=1e-2, atol=1e-2)


def test_attention_over_the_memory_bound_takes_the_tiled_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups larger than `DENSE_ATTENTION_BYTES` are split by sequences, and a sequence that alone exceeds it
    (a long prompt) goes through the tiled reference: the same results either way."""
    g = torch.Generator().manual_seed(4)
    heads, dim = 4, 8
    k_cache, v_cache = random_paged_kv(g, dim=dim)
    sinks = torch.randn(heads, generator=g)
    query, starts, seq_lens, tables = ragged_step(g, [6, 6, 6, 1, 1, 1, 30], [6, 6, 6, 9, 9, 9, 30], heads, dim, 64)
    args = (k_cache, v_cache, tables, starts, seq_lens, sinks, 0.3, None)
    unbounded = cpu.paged_attention(query, *args, batch_invariant=False)
    bound = cpu_attention._dense_bytes(3, 1, 9, heads, 2, dim)  # three decoding sequences, one 6-token prompt
    dense_bytes = cpu_attention._dense_bytes
    assert dense_bytes(1, 6, 6, heads, 2, dim) <= bound < dense_bytes(2, 6, 6, heads, 2, dim)
    monkeypatch.setattr(cpu_attention, "DENSE_ATTENTION_BYTES", bound)
    plan = cpu_attention._make_attention_plan(tables, seq_lens, starts, 2, 4, dim, heads, None, False)
    assert [(grp.num_seqs, grp.num_queries) for grp in plan.groups] == [(1, 6)] * 3 + [(3, 1)]
    assert plan.tiled is not None and plan.tiled[1].tolist() == [6]  # the 30-token prompt
    bounded = cpu.paged_attention(query, *args, batch_invariant=False)
    torch.testing.assert_close(bounded, unbounded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bounded, reference.paged_attention_reference(query, *args), rtol=1e-5, atol=1e-5)


def test_step_memo_follows_tensors_rewritten_in_place(rows_path: None) -> None:
    """Block tables, lengths and slot mappings reused as buffers (rewritten in place between steps, as the decode
    graph runner's are) never get the previous step's plan or cache rows; nor sinks their old columns."""
    g = torch.Generator().manual_seed(5)
    heads, dim = 4, 8
    k_cache, v_cache = random_paged_kv(g, dim=dim)
    sinks = torch.randn(heads, generator=g)
    query, starts, seq_lens, tables = ragged_step(g, [1, 1], [7, 9], heads, dim, 64)
    for _ in range(2):
        args = (k_cache, v_cache, tables, starts, seq_lens, sinks, 0.3, 4)
        got = cpu.paged_attention(query, *args, batch_invariant=False)
        torch.testing.assert_close(got, reference.paged_attention_reference(query, *args), rtol=1e-5, atol=1e-5)
        seq_lens.add_(1)  # the next decode step in the same buffers
        tables.copy_(tables.flip(0))
    # A layer's sinks written in place (a reload) are read again, not served from the sink columns kept.
    sinks.add_(1.0)
    args = (k_cache, v_cache, tables, starts, seq_lens, sinks, 0.3, 4)
    got = cpu.paged_attention(query, *args, batch_invariant=False)
    torch.testing.assert_close(got, reference.paged_attention_reference(query, *args), rtol=1e-5, atol=1e-5)
    key, value = torch.randn(2, 2, 2, dim, generator=g)
    slots = torch.tensor([5, 30])
    for _ in range(2):
        cpu.write_kv(key, value, k_cache, v_cache, slots)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        reference.write_kv_reference(key, value, expected_k, expected_v, slots)
        assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
        slots.copy_(torch.tensor([-1, 41]))  # another step: one padding slot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_kv_is_the_reference_bit_for_bit(dtype: torch.dtype, rows_path: None) -> None:
    g = torch.Generator().manual_seed(6)
    heads, kv_heads, dim, tokens = 6, 2, 8, 7
    k_cache, v_cache = (t.to(dtype) for t in random_paged_kv(g, kv_heads=kv_heads, dim=dim))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    positions = torch.tensor([3, 4, 5, 6, 0, 1, 9])
    slots = torch.tensor([3, 4, 5, 6, -1, 17, 50])  # a padding token writes nothing
    angles = torch.randn(16, dim // 2, generator=g)
    cos_table, sin_table = angles.cos(), angles.sin()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = reference.rope_write_kv_reference(
        qkv, positions, cos_table, sin_table, expected_k, expected_v, slots, heads
    )
    for _ in range(2):  # the second layer of a step: cos/sin rows and cache rows from the step memo
        got = cpu.rope_write_kv(qkv, positions, cos_table, sin_table, k_cache, v_cache, slots, heads)
        assert torch.equal(got, expected)
        assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    # New tables (another model) at positions already seen are not answered from the memo.
    cos_table, sin_table = sin_table.clone(), cos_table.clone()
    expected = reference.rope_write_kv_reference(
        qkv, positions, cos_table, sin_table, expected_k, expected_v, slots, heads
    )
    assert torch.equal(
        cpu.rope_write_kv(qkv, positions, cos_table, sin_table, k_cache, v_cache, slots, heads), expected
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_reference(dtype: torch.dtype, with_residual: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 96, generator=g) * 3).to(dtype)
    residual = torch.randn(7, 96, generator=g).to(dtype) if with_residual else None
    weight = torch.randn(96, generator=g).to(dtype)
    normed, summed = cpu.add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_summed = reference.add_rms_norm_reference(x, residual, weight, 1e-5)
    assert normed.dtype == dtype and torch.equal(summed, expected_summed)
    # The same math; a fused kernel may round its fp32 steps differently (one fp32 ulp, before the cast).
    torch.testing.assert_close(normed, expected_normed, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
