"""Engine settings (`EngineArgs`): one dataclass, read by the command line (its defaults) and the engine.

How much KV cache they imply is engine/worker/memory.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the command line reads these defaults for `--help`.

# What runs each heavy op (engine/model/ops.py): "auto" Triton on CUDA and the torch references elsewhere,
# "triton" the Triton kernels everywhere (CPU: the Triton interpreter), "torch" the references everywhere.
KERNEL_BACKENDS = ("auto", "triton", "torch")

# Accepted dtype names -> the torch dtype's name.
DTYPE_NAMES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "float32": "float32",
    "fp32": "float32",
}


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPE_NAMES[name])


@dataclass
class EngineArgs:
    """Everything the engine needs besides requests. `model` is a checkpoint folder (HF layout)."""

    model: str
    tokenizer: str | None = None  # tokenizer.json path or folder; default: the checkpoint's
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    kv_cache_dtype: str = "auto"  # "auto": the model dtype
    device: str = "auto"  # "auto": cuda if available, else cpu
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # default: the model's max_position_embeddings (and what the cache holds)
    max_num_waiting: int = 4096  # beyond this, new requests get EngineOverloadedError
    enable_prefix_caching: bool = True
    # Results independent of batch composition. None: on with CUDA (the Triton kernels are invariant by design),
    # off on CPU, where invariance means matmuls in fixed-shape row tiles (~30% slower at batch 16).
    batch_invariant: bool | None = None
    kernel_backend: str = "auto"  # "auto" (Triton on CUDA, torch on CPU), "triton" (also CPU: interpreter), "torch"
    seed: int = 0  # the generator of unseeded sampling
    random_weights: bool = False  # skip loading: random weights drawn on the device (benchmarks)
    load_progress: bool = False
    check_weights: bool = True  # refuse a checkpoint with NaN/inf weights (one pass over them at load)
    enforce_eager: bool = False  # no CUDA graphs (they are used for decode steps on CUDA otherwise)
    max_cuda_graph_batch_size: int = 256  # decode batches up to this many sequences replay a CUDA graph
    tensor_parallel_size: int = 1  # ranks (GPUs) one replica is split over; rank 0 schedules and samples
    data_parallel_size: int = 1  # replica processes behind one server (engine/data_parallel.py), each on its own GPUs
    # On CPU: dequantised MXFP4 experts kept between steps (kernels/cpu/experts.py), at most this many GiB (0: none).
    cpu_expert_cache_gb: float = 4.0

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_num_waiting",
            "max_cuda_graph_batch_size",
            "tensor_parallel_size",
            "data_parallel_size",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}): every running sequence decodes a token per step"
            )
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_expert_cache_gb < 0:
            raise ValueError(f"cpu_expert_cache_gb must be >= 0, got {self.cpu_expert_cache_gb}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        for name in ("dtype", "kv_cache_dtype"):
            value = getattr(self, name)
            if value != "auto" and value not in DTYPE_NAMES:
                raise ValueError(f"{name} must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {value!r}")
        self.model = str(self.model)

    def resolve_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_batch_invariant(self, device: torch.device) -> bool:
        return self.batch_invariant if self.batch_invariant is not None else device.type == "cuda"

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return _torch_dtype("bfloat16" if device.type == "cuda" else "float32")
        return _torch_dtype(self.dtype)

    def resolve_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.kv_cache_dtype == "auto" else _torch_dtype(self.kv_cache_dtype)

    def use_cuda_graphs(self, device: torch.device) -> bool:
        """Decode steps replay CUDA graphs on CUDA unless `enforce_eager`; never on CPU, nor with the torch
        references (kernel_backend "torch": they sync with the host, which a graph capture cannot)."""
        return device.type == "cuda" and not self.enforce_eager and self.kernel_backend != "torch"

    @property
    def cuda_graph_max_batch(self) -> int:
        """The largest decode batch captured in a CUDA graph."""
        return min(self.max_num_seqs, self.max_cuda_graph_batch_size)
