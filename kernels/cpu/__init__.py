"""The CPU path: the references of `kernels/reference.py` rearranged for speed, equal to them up to rounding
(bit for bit where a docstring says so).

A CPU step is mostly per-op overhead on small models, and the references favour clarity: they dequantise every
routed expert on every step and loop over sequences in Python. `experts` keeps dequantised experts and runs a
small model's in batched matmuls, `attention` batches sequences and does the step's index arithmetic once,
`norm` is the fused add + RMSNorm in two ops.

With `batch_invariant` (opt-in on a CPU, `--batch-invariant`) every op keeps the references' promise: a token's
bits never depend on the rest of the step. Without it (the CPU default) they may change in the last bits with
the batch, and the faster paths are taken.
"""

from gptoss.kernels.cpu.attention import paged_attention, rope_write_kv, write_kv
from gptoss.kernels.cpu.experts import EXPERT_CACHE, ExpertCache, moe, set_expert_cache_budget
from gptoss.kernels.cpu.norm import add_rms_norm

__all__ = [
    "EXPERT_CACHE",
    "ExpertCache",
    "add_rms_norm",
    "moe",
    "paged_attention",
    "rope_write_kv",
    "set_expert_cache_budget",
    "write_kv",
]
