"""What the static report (benchmarks/static_report.py) needs to know about one kernel launch of the engine.

A kernel module describes the launches it makes at given model shapes and batch by a function
`launch_specs(model: ModelShape, scenario: Scenario) -> list[LaunchSpec]`; the report compiles each spec for
sm_90 (no GPU), reads registers, spills and shared memory, and predicts the decode step from the bytes each
launch streams. To add a kernel module to the report, give it `launch_specs` and add its import path to
`KERNEL_MODULES` in benchmarks/static_report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelShape:
    """The model dimensions the kernels see (gpt-oss-120b by default)."""

    hidden: int = 2880
    intermediate: int = 2880
    experts: int = 128
    top_k: int = 4
    q_heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    vocab: int = 201088
    layers: int = 36
    sliding_window: int = 128
    sliding_layers: int = 18  # gpt-oss alternates sliding-window and full layers


@dataclass(frozen=True)
class Scenario:
    """One engine step: `tokens` new tokens (decode: one per sequence, each with `context` keys cached)."""

    name: str
    tokens: int
    context: int
    decode: bool


@dataclass(frozen=True)
class LaunchSpec:
    """One kernel launch as the engine makes it in a scenario.

    kernel: the kernel function (plain, or `triton.jit`-decorated); pointers: argument -> Triton type for
    every pointer and float scalar (other scalars are i32); aligned: scalar arguments that are multiples of
    16 at these shapes (pointers are assumed 16-byte aligned, as torch allocations are). ctas: the grid's
    size (useful programs, not the upper bound). bytes_per_cta: DRAM bytes one CTA must stream; total_bytes:
    the launch's DRAM bytes (what a bandwidth-bound launch costs). launches_per_step: how many times one step
    launches it (per layer x layers). loop_weight_bytes: for weight-streaming kernels, the weight bytes one
    CTA reads per main-loop iteration (the report counts SASS instructions per weight byte in that loop).
    """

    name: str
    kernel: object
    pointers: dict[str, str]
    constants: dict[str, object]
    num_warps: int
    num_stages: int
    ctas: int
    bytes_per_cta: float
    total_bytes: float
    launches_per_step: int
    aligned: tuple[str, ...] = ()
    loop_weight_bytes: int = 0
    loop_weight_elements: int = 0
    notes: dict[str, str] = field(default_factory=dict)
