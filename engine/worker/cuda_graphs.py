"""CUDA graphs for pure-decode steps: one graph per batch-size bucket, replayed on static input buffers.

A decode step of N sequences (one new token each) runs as the graph captured for the smallest bucket B >= N.
The step's metadata is copied into the first N rows of static buffers and rows N..B-1 are padding that reads
in bounds and writes nothing:
- slot_mapping -1 (the KV write skips the token), seq_len 1 with block-table column 0 set to block 0 (the
  attention reads key 0 of block 0, a valid block whatever it holds), query_start_loc one query per row;
- input_ids/positions keep whatever they held (any token id and any position below the model's maximum is
  valid; padding rows' outputs are thrown away).
The attention launcher sizes its decode split grid from the `max_seq_len` hint, which a captured graph
freezes: the graphs get the engine's max_model_len, an upper bound; each sequence's split count is computed on
the device from its own seq_len and the split slots beyond it are skipped. The split kernel is persistent
(kernels/attention.py `_decode_split_kernel`: a few programs per SM loop over the work items), so the unused
slots of a graph sized for max_model_len cost a few scalar loads each, not a CTA launch.
The MoE grid is a host-known upper bound of the token count (kernels/moe.py), so a whole step is capturable.

Each graph computes `model.forward` of all B rows into one hidden-state buffer shared by all buckets
(`[max_bucket, H]`); `run` returns a view of its first N rows, valid until the next `run`. The logits are left
to the caller (`model.compute_logits` on the rows that sample): the unembedding reads the same weights for any
row count, its launch is hidden behind the graph's execution, and keeping it out of the graphs saves a
`[max_bucket, vocab]` fp32 buffer (206 MB at 120b and 256 rows) and the padding rows' logits. Graphs share one
memory pool and are captured largest first, so the smaller ones reuse the largest one's temporaries.

Without CUDA graphs (`use_graphs=False`, the only mode on CPU) `run` does the same copies and padding and runs
the padded batch eagerly: the padding logic is then testable anywhere.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from gptoss.engine.model.config import FULL, SLIDING
from gptoss.engine.model.forward_batch import ForwardBatch
from gptoss.engine.model.gpt_oss import GptOssModel
from gptoss.engine.worker.kv_cache import KVCache

logger = logging.getLogger(__name__)


def capture_sizes(limit: int) -> list[int]:
    """Batch-size buckets (as vLLM): 1, 2, 4, then multiples of 8 up to `limit`, itself a bucket so that every
    decode batch of at most `limit` sequences has a graph."""
    if limit < 1:
        return []
    return sorted({s for s in (1, 2, 4) if s < limit} | set(range(8, limit, 8)) | {limit})


class DecodeGraphRunner:
    """Static decode buffers and one CUDA graph (or, without graphs, one eager padded forward) per bucket.

    `groups` are the block pools (layer types) with their own block tables and slots; with one pool for both
    layer types, both keys of the ForwardBatch dicts point at its buffers. `max_seq_len` bounds every
    sequence's length (the model's context; the attention grid hint), `max_blocks_per_seq` the block-table width.
    """

    def __init__(
        self,
        model: GptOssModel,
        kv_caches: list[KVCache],
        groups: list[str],
        sizes: list[int],
        max_seq_len: int,
        block_size: int,
        use_graphs: bool,
    ) -> None:
        if not sizes:
            raise ValueError("no batch sizes to capture")
        if use_graphs and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model = model
        self.kv_caches = kv_caches
        self.groups = list(groups)
        self.sizes = sorted(sizes)
        self.max_size = self.sizes[-1]
        self.max_seq_len = max_seq_len
        # +1: a table may hold one block more than the context needs (the block of the next token).
        self.max_blocks_per_seq = math.ceil(max_seq_len / block_size) + 1
        self.use_graphs = use_graphs
        # Rows >= this hold padding (as allocated): `_pad` only rewrites rows that earlier steps made real.
        self._padding_from = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        device, n = model.device, self.max_size
        config = model.config
        with torch.inference_mode():  # buffers are inference tensors: written only inside inference mode
            self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
            self.positions = torch.zeros(n, dtype=torch.int64, device=device)
            self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
            # Pure decode: sequence s owns row s, so this never changes.
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
            self.block_tables = {
                g: torch.zeros(n, self.max_blocks_per_seq, dtype=torch.int32, device=device) for g in self.groups
            }
            self.slot_mapping = {g: torch.full((n,), -1, dtype=torch.int64, device=device) for g in self.groups}
            self.hidden = torch.zeros(n, config.hidden_size, dtype=model.dtype, device=device)
        self._batches = {size: self._batch(size) for size in self.sizes}

    def _group_of(self, layer_type: str) -> str:
        return layer_type if layer_type in self.block_tables else self.groups[0]

    def _batch(self, size: int) -> ForwardBatch:
        """The ForwardBatch of bucket `size`: views of the first `size` rows of the static buffers."""
        layer_types = (FULL, SLIDING)
        return ForwardBatch(
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables={t: self.block_tables[self._group_of(t)][:size] for t in layer_types},
            slot_mapping={t: self.slot_mapping[self._group_of(t)][:size] for t in layer_types},
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest bucket holding `num_seqs` sequences (None: too many)."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether the step described by `batch` can run here: pure decode, a bucket large enough, tables that
        fit the static width (host-side hints only, no device sync)."""
        if batch.max_query_len != 1 or batch.max_seq_len > self.max_seq_len or self.bucket(batch.num_seqs) is None:
            return False
        return all(batch.block_tables[g].shape[1] <= self.max_blocks_per_seq for g in self.groups)

    def _forward(self, size: int) -> None:
        """The captured work: the padded forward of bucket `size`, into the shared hidden-state buffer."""
        hidden = self.model.forward(self.input_ids[:size], self.positions[:size], self._batches[size], self.kv_caches)
        self.hidden[:size].copy_(hidden)

    def _pad(self, num_seqs: int, size: int) -> None:
        """Make rows num_seqs..size-1 padding that reads key 0 of block 0 and writes nothing (rewriting only
        those below `_padding_from`), then record which rows are padding now."""
        stale_end = min(size, self._padding_from)  # rows num_seqs..stale_end-1 were real in an earlier step
        if num_seqs < stale_end:
            self.seq_lens[num_seqs:stale_end].fill_(1)
            for g in self.groups:
                self.slot_mapping[g][num_seqs:stale_end].fill_(-1)
                # Only column 0 is read at seq_len 1; a real row may have left a freed (-1) entry there.
                self.block_tables[g][num_seqs:stale_end, 0].zero_()
        if self._padding_from <= size:
            self._padding_from = num_seqs

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, into one shared memory pool (no-op without graphs).

        Must run while nothing else uses the device; the padded warm-up writes nothing into the KV cache.
        """
        if not self.use_graphs:
            return
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.model.device)[0]
        self._pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._forward(size)  # compiles the Triton kernels of this shape, outside the capture
            torch.cuda.synchronize(self.model.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.model.device)
        used = free_before - torch.cuda.mem_get_info(self.model.device)[0]
        logger.info(
            "CUDA graphs: %d decode batch sizes (1..%d) captured in %.1f s, %.2f GiB",
            len(self.sizes), self.max_size, time.perf_counter() - start, used / 2**30,
        )  # fmt: skip

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """One decode step of N = `batch.num_seqs` sequences (`fits(batch)` must hold), as `model.forward`.

        input_ids, positions `[N]` and the batch's tensors may be on the host or the device (they are copied
        into the static buffers). Returns the final hidden states `[N, H]`: a view of the output buffer,
        overwritten by the next `run`.
        """
        num_seqs = batch.num_seqs
        size = self.bucket(num_seqs)
        if size is None or not self.fits(batch):
            raise ValueError(f"a decode batch of {num_seqs} sequences does not fit the graph buffers")
        # Rows below num_seqs stop being padding now (recorded first, so a failed copy cannot leave stale
        # real slots in rows taken for padding later).
        self._padding_from = max(self._padding_from, num_seqs)
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(batch.seq_lens, non_blocking=True)
        for g in self.groups:
            table = batch.block_tables[g]
            # Columns beyond the step's width keep stale ids: they lie past every seq_len, so nothing reads them.
            self.block_tables[g][:num_seqs, : table.shape[1]].copy_(table, non_blocking=True)
            self.slot_mapping[g][:num_seqs].copy_(batch.slot_mapping[g], non_blocking=True)
        self._pad(num_seqs, size)
        if self.use_graphs:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return self.hidden[:num_seqs]
