"""What one model step needs besides token ids and positions: where each sequence's queries and keys live.

The scheduler decides, the model runner builds this, the model and its attention kernels read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gptoss.engine.model.config import FULL, SLIDING


@dataclass
class ForwardBatch:
    """Attention metadata for a flat batch of new tokens from `S` sequences.

    query_start_loc: `[S+1]` int32, sequence s owns token rows `query_start_loc[s]:query_start_loc[s+1]`.
    seq_lens: `[S]` int32, each sequence's context length after this step (cached + new tokens).
    block_tables: per layer type ("full_attention", "sliding_attention"), `[S, max_blocks]` int32 block ids.
    slot_mapping: per layer type, `[T]` int64 cache slot of each new token (-1: write nothing).
    The two layer types may share tensors (one block pool) or have their own (sliding layers keep only the
    blocks inside their window).
    max_query_len / max_seq_len: host-side bounds, so kernels need no device sync to size their grids.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: dict[str, torch.Tensor]
    slot_mapping: dict[str, torch.Tensor]
    max_query_len: int
    max_seq_len: int

    @classmethod
    def shared_pool(
        cls,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
        max_query_len: int | None = None,
        max_seq_len: int | None = None,
    ) -> ForwardBatch:
        """All layers use one block pool: the same block table and slots for both layer types."""
        if max_query_len is None:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item()) if len(seq_lens) else 0
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item()) if len(seq_lens) else 0
        return cls(
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables={FULL: block_tables, SLIDING: block_tables},
            slot_mapping={FULL: slot_mapping, SLIDING: slot_mapping},
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
        )

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])
