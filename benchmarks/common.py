"""Shared benchmark helpers: timing, the device's measured ceilings, and table / JSON / PNG output.

Typical use (see benchmarks/bench_moe.py):

    device = pick_device()
    ceilings = measure_ceilings(device)            # copy GB/s and bf16 matmul TFLOP/s, measured once
    seconds = median_time(lambda: op(x), device)   # CUDA events on GPU, perf_counter on CPU
    row = dict(tokens=..., ms=seconds * 1e3, **roofline(seconds, bytes_moved, flops, ceilings))
    print(format_table(rows, ["tokens", "ms", "GB/s", "% roofline"]))
    write_json(out_dir / "bench_x.json", {"device": ceilings.as_dict(), "rows": rows})
    plot_series(out_dir / "bench_x.png", {"impl": (xs, ys)}, xlabel=..., ylabel=..., title=...)
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


def pick_device() -> torch.device:
    """CUDA device 0 when there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds of one `fn()` call: CUDA events around each call on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(max(1, iters)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def graph_time(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds of one `fn()` replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`): no host
    launch overhead, as in the engine's decode graphs. `fn` must be capturable (no host sync). CPU:
    `median_time`."""
    if device.type != "cuda":
        return median_time(fn, device, warmup=warmup, iters=iters)
    import triton.testing

    for _ in range(warmup):  # compile and autotune outside the capture
        fn()
    synchronize(device)
    # rep: milliseconds of replays to take the median over (at least `iters` of them in practice).
    return triton.testing.do_bench_cudagraph(fn, rep=max(100, iters), return_mode="median") / 1e3


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size (0 on CPU)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.get_device_properties(device).L2_cache_size)


def rotation_copies(bytes_per_copy: int, device: torch.device, free_bytes: int, tiny: bool = False) -> int:
    """How many copies of an operand a timed call walks through so that L2 never serves it from an earlier
    call: enough for 4x the L2 size (at least 4 when one copy is smaller than L2, 1 when one copy alone is
    more than 4x L2), as many as fit in `free_bytes`. Tiny (CPU) runs use 2, to exercise the rotation."""
    if tiny or device.type != "cuda":
        return 2
    wanted = max(1, -(-4 * l2_bytes(device) // max(1, bytes_per_copy)))
    if bytes_per_copy < l2_bytes(device):
        wanted = max(wanted, 4)
    return max(1, min(wanted, free_bytes // max(1, bytes_per_copy)))


@dataclass(frozen=True)
class Ceilings:
    """What the device measurably sustains: `copy_bytes_per_s` counts read + write bytes of a big copy."""

    device: str
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    matmul_dtype: str

    def as_dict(self) -> dict:
        return asdict(self)


def measure_copy_bandwidth(device: torch.device, num_bytes: int | None = None, iters: int = 10) -> float:
    """Bytes/s (read + write) of a device-to-device copy of `num_bytes` (default 1 GiB GPU, 64 MiB CPU)."""
    num_bytes = num_bytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, warmup=2, iters=iters)
    return 2 * num_bytes / seconds


def measure_matmul_rate(
    device: torch.device, size: int | None = None, dtype: torch.dtype | None = None, iters: int = 10
) -> float:
    """FLOP/s of a square `size`^3 matmul (bf16 8192 on GPU; fp32 512 on CPU, where bf16 is emulated)."""
    size = size or (8192 if device.type == "cuda" else 512)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = median_time(lambda: a @ b, device, warmup=2, iters=iters)
    return 2 * size**3 / seconds


def measure_ceilings(device: torch.device) -> Ceilings:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return Ceilings(
        device=device_name(device),
        copy_bytes_per_s=measure_copy_bandwidth(device),
        matmul_flops_per_s=measure_matmul_rate(device, dtype=dtype),
        matmul_dtype=str(dtype).removeprefix("torch."),
    )


def roofline(seconds: float, bytes_moved: float, flops: float, ceilings: Ceilings) -> dict[str, float]:
    """Achieved GB/s and TFLOP/s, their fractions of the ceilings, and % of the roofline time.

    The roofline time is max(bytes / copy bandwidth, flops / matmul rate): 100% means the op runs as fast
    as the slower of the two ceilings allows.
    """
    floor = max(bytes_moved / ceilings.copy_bytes_per_s, flops / ceilings.matmul_flops_per_s)
    return {
        "GB/s": bytes_moved / seconds / 1e9,
        "% copy bw": 100 * bytes_moved / seconds / ceilings.copy_bytes_per_s,
        "TFLOP/s": flops / seconds / 1e12,
        "% matmul": 100 * flops / seconds / ceilings.matmul_flops_per_s,
        "% roofline": 100 * floor / seconds,
    }


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A fixed-width text table of `columns` from dict rows (floats with 4 significant digits)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    body = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=False))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=False)) for r in body]
    return "\n".join(lines)


def write_json(path: Path | str, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def plot_series(
    path: Path | str,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
) -> Path | None:
    """One line per series name -> (xs, ys), saved as a PNG; returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
