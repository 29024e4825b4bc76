"""Paged KV cache bookkeeping: block pools with reference counts, per-sequence block tables, prefix reuse.

Plain Python (no torch): it decides which block ids hold which positions; the model runner turns the
tables into tensors.

Layout. Position p of a sequence lives in block `block_table[p // block_size]` at offset `p % block_size`.
There is one *block group* per attention kind, each with its own pool and its own table per sequence:
  - "full_attention": a sequence holds every block of its context until it finishes.
  - "sliding_attention" (window W tokens, the current one included): a query at position i reads keys
    i-W+1 .. i, so once a step starting at position s is scheduled, blocks lying wholly before s-W+1 are
    never read again (s only grows; a preemption frees everything). They are released and their table
    entries set to -1. During a chunked prefill the chunk's first query (position s) is the one that
    reaches furthest back, which is why the cut uses the step's first position.
A model with only one kind of layer has one group.

Prefix reuse. Every full block of a sequence's tokens has a hash chained on its parent's hash
(`hash(parent_hash, token ids)`), so equal hashes mean equal whole prefixes. When a block's KV has been
computed it is registered under its hash in its group's pool; when no sequence references it any more it
stays cached in an LRU free queue until its slot is needed. A new sequence with k leading hits starts at
position k*block_size, which is usable only if every group holds what the next step reads: the full group
blocks 0..k-1, the sliding group the blocks covering positions k*bs-W+1 .. k*bs-1. The longest k meeting
both is used. At least one prompt token is always recomputed (its logits are needed), and sequences that
want prompt logprobs get no hits (the skipped positions would have no logits).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC

from gptoss.engine.core.sequence import Sequence
from gptoss.engine.model.config import FULL


def hash_block(parent_hash: bytes | None, token_ids: SequenceABC[int]) -> bytes:
    """A 128-bit key for one full block given its parent's key: equal keys mean equal prefixes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or b"root")
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


class BlockPool:
    """The blocks of one group: reference counts, the prefix cache (hash -> block) and an LRU free queue.

    A block is free when no sequence references it; free blocks wait in `free_queue`, never-cached ones at
    the front (taken first) and cached ones in the order they were released, so allocation evicts the least
    recently used cached block only when no plain free block is left.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self) -> int:
        """Take a free block (evicting its cached content if it has any); the caller checked there is one."""
        block_id, _ = self.free_queue.popitem(last=False)
        old_hash = self.block_hash[block_id]
        if old_hash is not None:
            del self.cached[old_hash]
            self.block_hash[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def touch(self, block_id: int) -> None:
        """Add a reference to a cached block (a prefix hit)."""
        if self.ref_counts[block_id] == 0:
            del self.free_queue[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        if self.ref_counts[block_id] <= 0:
            raise RuntimeError(f"block {block_id} released more often than referenced")
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_queue[block_id] = None
            if self.block_hash[block_id] is None:
                self.free_queue.move_to_end(block_id, last=False)

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Register a computed full block; a second block with the same content stays uncached."""
        if self.block_hash[block_id] is not None or block_hash in self.cached:
            return
        self.block_hash[block_id] = block_hash
        self.cached[block_hash] = block_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds."""
        for block_id in list(self.free_queue):
            old_hash = self.block_hash[block_id]
            if old_hash is not None:
                del self.cached[old_hash]
                self.block_hash[block_id] = None
                self.free_queue.move_to_end(block_id, last=False)


class BlockManager:
    """Block tables for every sequence, one pool per block group.

    `num_blocks` maps group name -> pool size (an int gives every group that size); `windows` maps group
    name -> sliding window in tokens (None for full attention). Usage per step (the scheduler's side):
    `allocate(seq, n)` before computing positions seq.num_computed_tokens .. +n-1 (applies prefix hits on a
    fresh sequence; all or nothing), `mark_computed(seq, n)` after the step, `free(seq)` on finish, abort or
    preemption.
    """

    def __init__(
        self,
        num_blocks: int | dict[str, int],
        block_size: int,
        windows: dict[str, int | None] | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        windows = dict(windows) if windows is not None else {FULL: None}
        if not windows:
            raise ValueError("at least one block group is needed")
        if isinstance(num_blocks, int):
            num_blocks = dict.fromkeys(windows, num_blocks)
        if set(num_blocks) != set(windows):
            raise ValueError(f"block counts given for {sorted(num_blocks)} but groups are {sorted(windows)}")
        for name, window in windows.items():
            if window is not None and window <= 0:
                raise ValueError(f"group {name!r} has a non-positive window {window}")
        self.block_size = block_size
        self.windows = windows
        self.pools = {name: BlockPool(num_blocks[name]) for name in windows}
        self.enable_prefix_caching = enable_prefix_caching

    # ---- capacity -------------------------------------------------------------------------------

    @property
    def group_names(self) -> list[str]:
        return list(self.pools)

    def num_free_blocks(self, group: str | None = None) -> int:
        """Free blocks of one group, or the fewest over all groups."""
        if group is not None:
            return self.pools[group].num_free_blocks
        return min(pool.num_free_blocks for pool in self.pools.values())

    def max_tokens_per_sequence(self) -> int:
        """The longest context one sequence alone can hold (bounded by the full-attention pools)."""
        limits = [pool.num_blocks * self.block_size for name, pool in self.pools.items() if self.windows[name] is None]
        return min(limits) if limits else 1 << 62

    def _first_needed_block(self, group: str, start: int) -> int:
        """Index of the first block a step whose first query is at position `start` reads in `group`."""
        window = self.windows[group]
        if window is None:
            return 0
        return max(0, start - window + 1) // self.block_size

    # ---- hashing and prefix hits ----------------------------------------------------------------

    def _update_hashes(self, seq: Sequence) -> None:
        """Extend seq.block_hashes to every full block of its tokens."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), seq.num_tokens // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs]))

    def find_prefix_hit(self, seq: Sequence) -> int:
        """How many leading blocks of a fresh sequence every group can serve from the cache (no side effect)."""
        if not self.enable_prefix_caching or seq.want_prompt_logprobs:
            return 0
        self._update_hashes(seq)
        # Keep at least one token to compute: the last one's logits are what the next step samples from.
        max_blocks = min(len(seq.block_hashes), (seq.num_tokens - 1) // self.block_size)
        full_hits = max_blocks
        for name, pool in self.pools.items():
            if self.windows[name] is None:
                k = 0
                while k < full_hits and seq.block_hashes[k] in pool.cached:
                    k += 1
                full_hits = k
        for k in range(full_hits, 0, -1):
            if all(self._group_hit(name, seq, k) for name in self.pools if self.windows[name] is not None):
                return k
        return 0

    def _group_hit(self, group: str, seq: Sequence, k: int) -> bool:
        pool = self.pools[group]
        first = self._first_needed_block(group, k * self.block_size)
        return all(seq.block_hashes[i] in pool.cached for i in range(first, k))

    # ---- allocation -----------------------------------------------------------------------------

    def _free_out_of_window(self, seq: Sequence) -> None:
        for name, pool in self.pools.items():
            table = seq.block_tables.get(name)
            if not table or self.windows[name] is None:
                continue
            # Entries below `num_window_freed` are -1 already: each entry is visited once per sequence.
            start = seq.num_window_freed.get(name, 0)
            end = min(self._first_needed_block(name, seq.num_computed_tokens), len(table))
            for i in range(start, end):
                if table[i] >= 0:
                    pool.release(table[i])
                    table[i] = -1
            if end > start:
                seq.num_window_freed[name] = end

    def _num_blocks_needed(self, seq: Sequence, num_new_tokens: int, hit_blocks: int) -> dict[str, int]:
        """Free blocks each group must give up to add `num_new_tokens` (hit blocks that are free count)."""
        bs = self.block_size
        start = seq.num_computed_tokens if hit_blocks == 0 else hit_blocks * bs
        end_blocks = -(-(start + num_new_tokens) // bs)
        needed = {}
        for name, pool in self.pools.items():
            table = seq.block_tables.get(name, [])
            if hit_blocks:
                first = self._first_needed_block(name, start)
                reused = [pool.cached[seq.block_hashes[i]] for i in range(first, hit_blocks)]
                num_new = end_blocks - hit_blocks
                needed[name] = num_new + sum(1 for b in reused if pool.ref_counts[b] == 0)
            else:
                # Blocks behind the window were released first (`_free_out_of_window`); they are free now.
                needed[name] = max(0, end_blocks - len(table))
        return needed

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `allocate(seq, num_new_tokens)` would succeed now.

        Releases the sliding-window blocks `seq` will never read again first (always safe: positions only
        move forward until a preemption frees everything), so that they count as free.
        """
        fresh = self._is_fresh(seq)
        if not fresh:
            self._free_out_of_window(seq)
        hit = self.find_prefix_hit(seq) if fresh else 0
        needed = self._num_blocks_needed(seq, num_new_tokens, hit)
        return all(needed[name] <= pool.num_free_blocks for name, pool in self.pools.items())

    @staticmethod
    def _is_fresh(seq: Sequence) -> bool:
        return seq.num_computed_tokens == 0 and not seq.block_tables

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` the blocks for its next `num_new_tokens` positions; False (and no change) if they don't fit.

        On a fresh sequence (nothing computed, no blocks) the prefix cache is consulted first: on a hit,
        seq.num_computed_tokens and seq.num_cached_tokens jump to the hit length, and `num_new_tokens` then
        counts from there (the caller recomputes its chunk from the new seq.num_computed_tokens).
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be positive, got {num_new_tokens}")
        bs = self.block_size
        if self._is_fresh(seq):
            hit = self.find_prefix_hit(seq)
            needed = self._num_blocks_needed(seq, num_new_tokens, hit)
            if any(needed[name] > pool.num_free_blocks for name, pool in self.pools.items()):
                return False
        else:
            hit = 0
            self._free_out_of_window(seq)
            # `_num_blocks_needed` without a hit, inline: this runs for every running sequence every step.
            end_blocks = -(-(seq.num_computed_tokens + num_new_tokens) // bs)
            tables = seq.block_tables
            if any(end_blocks - len(tables.get(name, ())) > pool.num_free_blocks for name, pool in self.pools.items()):
                return False
        if hit:
            for name, pool in self.pools.items():
                first = self._first_needed_block(name, hit * bs)
                table = [-1] * first
                for i in range(first, hit):
                    block_id = pool.cached[seq.block_hashes[i]]
                    pool.touch(block_id)
                    table.append(block_id)
                seq.block_tables[name] = table
                seq.num_window_freed[name] = first
            seq.num_computed_tokens = hit * bs
            if seq.num_preemptions == 0:  # a recompute's hits are its own blocks, not a client's prefix
                seq.num_cached_tokens = hit * bs
        end_blocks = -(-(seq.num_computed_tokens + num_new_tokens) // bs)
        for name, pool in self.pools.items():
            table = seq.block_tables.setdefault(name, [])
            while len(table) < end_blocks:
                table.append(pool.allocate())
        return True

    def max_allocatable_tokens(self, seq: Sequence, limit: int) -> int:
        """The most new tokens (<= limit) `allocate` would accept now (0 if none), prefix hits applied."""
        if limit <= 0 or self.can_allocate(seq, limit):
            return max(limit, 0)
        lo, hi = 0, limit  # can_allocate(lo) holds (or lo == 0), can_allocate(hi) fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.can_allocate(seq, mid):
                lo = mid
            else:
                hi = mid
        return lo

    def mark_computed(self, seq: Sequence, num_new_tokens: int) -> None:
        """Record that a step wrote KV for `num_new_tokens` more positions; cache blocks that became full."""
        old = seq.num_computed_tokens
        seq.num_computed_tokens = old + num_new_tokens
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first_new_full, end_full = old // bs, seq.num_computed_tokens // bs
        if end_full <= first_new_full:
            return
        self._update_hashes(seq)
        for name, pool in self.pools.items():
            table = seq.block_tables[name]
            for i in range(first_new_full, end_full):
                if table[i] >= 0:
                    pool.cache_block(table[i], seq.block_hashes[i])

    def free(self, seq: Sequence) -> None:
        """Drop every block `seq` holds (finish, abort or preemption); it may be scheduled afresh later."""
        for name, table in seq.block_tables.items():
            pool = self.pools[name]
            # Release the tail first so that, among equally old cached blocks, the deepest are evicted first.
            for block_id in reversed(table):
                if block_id >= 0:
                    pool.release(block_id)
        seq.block_tables = {}
        seq.num_window_freed = {}
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        for pool in self.pools.values():
            pool.reset_prefix_cache()

    def check_invariants(self, sequences: Iterable[Sequence]) -> None:
        """Assert reference counts equal table references and the free queue holds exactly the free blocks."""
        for name, pool in self.pools.items():
            counts = [0] * pool.num_blocks
            for seq in sequences:
                for block_id in seq.block_tables.get(name, []):
                    if block_id >= 0:
                        counts[block_id] += 1
            assert counts == pool.ref_counts, f"{name}: reference counts drifted"
            free = {i for i, c in enumerate(counts) if c == 0}
            assert set(pool.free_queue) == free, f"{name}: free queue disagrees with reference counts"
            for block_hash, block_id in pool.cached.items():
                assert pool.block_hash[block_id] == block_hash, f"{name}: cache map inconsistent"
