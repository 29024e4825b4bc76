"""Launches of one decode step on the Triton path, per decoder layer: `python -m benchmarks.launch_count`.

Counts Triton kernel launches plus every torch op that would launch a kernel of its own (all ops but views
and allocations), layer by layer (forward hooks on the decoder layers). Runs on the CPU in the Triton
interpreter (it sets `TRITON_INTERPRET=1`), the model in fp32 with random weights: the launch sequence of a
decode step does not depend on the weights, the shapes or the device (the kernels' grids do, their count does
not). tests/test_model.py holds the budget with it; benchmarks/static_report.py reports it.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Torch ops that launch nothing: allocations (an empty tensor is not a kernel).
_ALLOCATIONS = {"aten.empty.memory_format", "aten.empty_like.default", "aten.empty_strided.default",
                "aten.new_empty.default"}  # fmt: skip


class LaunchCounter(TorchDispatchMode):
    """Inside `with counter:`, records per decoder layer the Triton launches (`triton:<kernel>`) and the torch
    ops that launch a kernel (`torch:<op>`). Torch ops the Triton interpreter runs while it executes a kernel
    are not counted. Call `close()` after use (it removes the layer hooks and the launch hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        from triton.runtime.interpreter import InterpretedFunction

        self.layer: int | None = None
        self.in_triton = False
        self.per_layer: dict[int, list[str]] = {}
        self.hooks = []
        for index, layer in enumerate(model.model.layers):
            self.hooks.append(layer.register_forward_pre_hook(lambda *_, i=index: self._enter(i)))
            self.hooks.append(layer.register_forward_hook(lambda *_: self._enter(None)))
        self._interpreted = InterpretedFunction
        self._real_run = InterpretedFunction.run
        counter = self

        def counted_run(kernel, *args, **kwargs):
            counter.record(f"triton:{kernel.fn.__name__}")
            counter.in_triton = True
            try:
                return counter._real_run(kernel, *args, **kwargs)
            finally:
                counter.in_triton = False

        InterpretedFunction.run = counted_run

    def close(self) -> None:
        self._interpreted.run = self._real_run
        for hook in self.hooks:
            hook.remove()

    def _enter(self, layer: int | None) -> None:
        self.layer = layer
        if layer is not None:
            self.per_layer[layer] = []

    def record(self, name: str) -> None:
        if self.layer is not None:
            self.per_layer[self.layer].append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_triton and not func.is_view and str(func) not in _ALLOCATIONS:
            self.record(f"torch:{func}")
        return func(*args, **(kwargs or {}))


def count_step(model: torch.nn.Module, step) -> dict[int, list[str]]:
    """What `step()` (a call running the model once) launches, per decoder layer."""
    counter = LaunchCounter(model)
    try:
        with counter:
            step()
    finally:
        counter.close()
    return counter.per_layer


def decode_step_launches(backend: str = "triton", num_seqs: int = 2, context: int = 5) -> dict[int, list[str]]:
    """Per layer, the launches of one decode step of `num_seqs` sequences (after a `context`-token prefill) of
    the tiny preset with random weights, on `backend` (CPU; "triton" runs the Triton interpreter)."""
    from gptoss.engine.model import ops
    from gptoss.engine.model.config import preset
    from gptoss.engine.model.forward_batch import ForwardBatch
    from gptoss.engine.model.gpt_oss import GptOssModel
    from gptoss.engine.model.loader import randomize_weights
    from gptoss.engine.worker.kv_cache import allocate_kv_caches

    if backend == "triton":
        ops.enable_triton_interpreter()
    config, block_size = preset("tiny"), 16
    model = GptOssModel.create(config, torch.float32, "cpu")
    model.kernel_backend = backend
    randomize_weights(model, seed=0)
    blocks_per_seq = -(-(context + 1) // block_size)
    caches = allocate_kv_caches(config, num_seqs * blocks_per_seq, block_size, torch.float32, "cpu")
    tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)

    def run(lengths: list[int], new: int) -> None:
        positions = torch.tensor([p for n in lengths for p in range(n - new, n)])
        seq = torch.arange(num_seqs).repeat_interleave(new)
        slots = tables[seq, positions // block_size].long() * block_size + positions % block_size
        batch = ForwardBatch.shared_pool(
            torch.arange(0, num_seqs * new + 1, new, dtype=torch.int32),
            torch.tensor(lengths, dtype=torch.int32),
            tables,
            slots,
        )
        ids = torch.randint(0, config.vocab_size, (num_seqs * new,), generator=torch.Generator().manual_seed(new))
        model.compute_logits(model(ids, positions, batch, caches))

    run([context] * num_seqs, context)
    return count_step(model, lambda: run([context + 1] * num_seqs, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="triton", choices=("triton", "torch"))
    args = parser.parse_args(argv)
    per_layer = decode_step_launches(args.backend)
    for layer, launches in per_layer.items():
        print(f"layer {layer}: {len(launches)} launches: {', '.join(launches)}")
    print(f"launches per layer: {max(len(v) for v in per_layer.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
