"""The CPU path (kernels/cpu.py) against the plain references it rearranges."""

from __future__ import annotations

import functools

import pytest
import torch
from gptoss.kernels import cpu, reference


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
        monkeypatch.setattr(cpu, "DENSE_EXTRA_MACS_MAX", dense_macs)
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
