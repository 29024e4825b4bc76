"""Block manager: no leaks or double frees under random use, prefix hits in both groups, window freeing."""

from __future__ import annotations

import pytest
from gptoss.engine.core.block_manager import BlockManager
from gptoss.engine.core.sequence import Sequence
from gptoss.engine.model.config import FULL, SLIDING
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BS = 4


def make_seq(tokens: list[int], prompt_logprobs: bool = False) -> Sequence:
    return Sequence(f"r{tokens[:3]}", tokens, None, want_prompt_logprobs=prompt_logprobs)


def run_to(bm: BlockManager, seq: Sequence, end: int, chunk: int = 5) -> None:
    """Allocate and 'compute' seq's positions up to `end` (exclusive), in chunks like the scheduler does."""
    while seq.num_computed_tokens < end:
        n = min(chunk, end - seq.num_computed_tokens)
        assert bm.allocate(seq, n)
        # a fresh sequence may have jumped forward on a prefix hit
        n = min(n, end - seq.num_computed_tokens)
        if n > 0:
            bm.mark_computed(seq, n)


def two_groups(num_blocks: int = 32, window: int = 6) -> BlockManager:
    return BlockManager({FULL: num_blocks, SLIDING: num_blocks}, BS, {FULL: None, SLIDING: window})


def test_prefix_hit_needs_both_groups_and_keeps_one_token():
    bm = two_groups()
    prompt = list(range(1, 18))  # 17 tokens: 4 full blocks
    a = make_seq(prompt)
    run_to(bm, a, len(prompt))
    bm.free(a)
    b = make_seq(prompt)
    assert bm.find_prefix_hit(b) == 4  # (17 - 1) // 4
    assert bm.allocate(b, 1)
    assert b.num_computed_tokens == 16 and b.num_cached_tokens == 16
    # sliding table: blocks wholly before position 16 - 6 + 1 = 11 (blocks 0, 1) are not held
    assert b.block_tables[SLIDING][:2] == [-1, -1]
    assert all(x >= 0 for x in b.block_tables[FULL])
    # a prompt that is exactly 4 blocks recomputes its last block's last token: 3 hits
    c = make_seq(prompt[:16])
    assert bm.find_prefix_hit(c) == 3
    bm.free(b)
    bm.check_invariants([a, b, c])


def test_sliding_eviction_limits_prefix_hit():
    bm = two_groups(num_blocks=64)
    prompt = list(range(100, 125))  # 25 tokens, 6 full blocks
    a = make_seq(prompt)
    run_to(bm, a, len(prompt))
    bm.free(a)
    # evict sliding block 5 (needed for a hit at 6 blocks) by dropping it from the cache by hand
    pool = bm.pools[SLIDING]
    block_id = pool.cached[a.block_hashes[5]]
    pool.free_queue.move_to_end(block_id, last=False)
    pool.allocate()
    pool.release(block_id)
    b = make_seq(prompt)
    # at 5 blocks (20 tokens) the window needs positions 15..19: blocks 3, 4 -> still cached
    assert bm.find_prefix_hit(b) == 5


def test_sliding_group_frees_blocks_behind_window():
    bm = two_groups(num_blocks=64, window=6)
    seq = make_seq(list(range(40)))
    run_to(bm, seq, 40, chunk=3)
    assert bm.allocate(seq, 1)  # next step: position 40 reads 35..40
    held = [b for b in seq.block_tables[SLIDING] if b >= 0]
    # blocks covering 35..40: indices 8, 9, 10 at most
    assert len(held) <= 3
    assert len([b for b in seq.block_tables[FULL] if b >= 0]) == 11
    bm.free(seq)
    assert bm.num_free_blocks(FULL) == 64 and bm.num_free_blocks(SLIDING) == 64


def test_lru_eviction_prefers_uncached_blocks():
    bm = BlockManager(6, BS)
    a = make_seq(list(range(9)))
    run_to(bm, a, 9)  # 3 blocks, 2 cached
    bm.free(a)
    b = make_seq(list(range(50, 57)))  # needs 2 blocks: must take uncached ones first
    run_to(bm, b, 7)
    c = make_seq(list(range(9)))
    assert bm.find_prefix_hit(c) == 2
    bm.free(b)
    bm.check_invariants([a, b, c])


def test_prompt_logprobs_disable_hits():
    bm = BlockManager(16, BS)
    a = make_seq(list(range(13)))
    run_to(bm, a, 13)
    assert bm.find_prefix_hit(make_seq(list(range(13)), prompt_logprobs=True)) == 0


def test_allocate_is_all_or_nothing():
    bm = two_groups(num_blocks=4)
    seq = make_seq(list(range(30)))
    assert bm.max_allocatable_tokens(seq, 30) == 16
    assert not bm.allocate(seq, 17)
    assert seq.block_tables == {} and bm.num_free_blocks() == 4
    assert bm.allocate(seq, 16)
    assert bm.num_free_blocks() == 0


ops = st.lists(
    st.tuples(st.sampled_from(["add", "step", "copy", "free", "reset"]), st.integers(0, 10**6)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, window=st.sampled_from([None, 3, 6, 9]), num_blocks=st.integers(6, 24))
def test_random_operations_never_leak(ops, window, num_blocks):
    windows = {FULL: None} if window is None else {FULL: None, SLIDING: window}
    bm = BlockManager(dict.fromkeys(windows, num_blocks), BS, windows)
    live: list[Sequence] = []
    dead: list[Sequence] = []
    # a few shared prefixes so that hits happen
    prefixes = [[7] * 8, list(range(12)), [3, 1, 4, 1, 5, 9, 2, 6]]
    for op, r in ops:
        if op == "add":
            tokens = prefixes[r % 3][: 4 + r % 9] + [r % 11 + 20] * (r % 7)
            seq = make_seq(tokens)
            if bm.allocate(seq, 1 + r % 5):
                bm.mark_computed(seq, min(1 + r % 5, seq.num_tokens - seq.num_computed_tokens))
                live.append(seq)
            else:
                assert seq.block_tables == {}
        elif op == "step" and live:
            seq = live[r % len(live)]
            if seq.num_computed_tokens >= seq.num_tokens:
                seq.token_ids.append(r % 13)  # a sampled token
            n = min(1 + r % 6, seq.num_tokens - seq.num_computed_tokens)
            if bm.allocate(seq, n):
                # a fresh (copied) sequence may have jumped forward on a prefix hit
                n = min(n, seq.num_tokens - seq.num_computed_tokens)
                if n > 0:
                    bm.mark_computed(seq, n)
        elif op == "copy" and live:  # same tokens as a live sequence: its first step takes prefix hits
            live.append(make_seq(list(live[r % len(live)].token_ids)))
        elif op == "free" and live:
            seq = live.pop(r % len(live))
            bm.free(seq)
            dead.append(seq)
        elif op == "reset":
            bm.reset_prefix_cache()
        bm.check_invariants(live + dead)
    for seq in live:
        bm.free(seq)
    bm.check_invariants(live + dead)
    for pool in bm.pools.values():
        assert pool.num_free_blocks == pool.num_blocks
        assert all(c == 0 for c in pool.ref_counts)


def test_double_free_is_caught():
    bm = BlockManager(4, BS)
    seq = make_seq([1, 2, 3])
    assert bm.allocate(seq, 3)
    block_id = seq.block_tables[FULL][0]
    bm.pools[FULL].release(block_id)
    with pytest.raises(RuntimeError):
        bm.pools[FULL].release(block_id)


@pytest.mark.parametrize("gb", [0.05, 1.0, 60.0])
def test_kv_budget_split_fits_and_favours_full_attention(gb):
    import torch
    from gptoss.engine.engine_args import EngineArgs
    from gptoss.engine.model.config import preset
    from gptoss.engine.worker.kv_cache import kv_bytes_per_block
    from gptoss.engine.worker.memory import split_kv_budget

    config = preset("gpt-oss-120b")
    args = EngineArgs(model="unused")
    budget = int(gb * (1 << 30))
    blocks = split_kv_budget(args, config, budget, torch.bfloat16)
    used = sum(n * kv_bytes_per_block(config, 16, torch.bfloat16, layer_type=g) for g, n in blocks.items())
    assert used <= budget
    assert blocks[SLIDING] >= 9  # one sequence's window (128 tokens) plus a block
    assert blocks[FULL] >= blocks[SLIDING]
