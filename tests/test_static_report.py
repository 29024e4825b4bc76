"""benchmarks/static_report.py: the kernels compile for sm_90 without spills or shared-memory overflow.

The full report (every launch at every scenario) is a script (`python -m benchmarks.static_report`, ~2 min);
here the MoE launches of a batch-1 decode and of a 2048-token prefill, and the fused norm, q/k/v GEMM and
attention launches of decodes at 1k and 32k and of the prefill, are compiled with the installed triton and
with triton 3.6 (the GPU image's) when a copy is at $GPTOSS_TRITON36 (default /tmp/triton36).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SHARED_BYTES = 227 * 1024

_SCRIPT = """
import os
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from gptoss.benchmarks import static_report
from gptoss.kernels.launch_spec import ModelShape
scenarios = [s for s in static_report._scenarios() if s.name in SCENARIOS]
only = ONLY
for row in static_report.build_rows(scenarios, ModelShape(), only):
    print("ROW|{scenario}|{kernel}|{regs}|{spills}|{smem_KiB}".format(**row), flush=True)
"""


def _triton_dirs() -> list[tuple[str, str]]:
    dirs = [("installed", "")]
    triton36 = os.environ.get("GPTOSS_TRITON36", "/tmp/triton36")
    if (Path(triton36) / "triton" / "__init__.py").exists():
        dirs.append(("3.6", triton36))
    return dirs


def _has_nvidia_backend(pythonpath: str, env: dict) -> bool:
    code = "from triton.backends.nvidia.compiler import get_ptxas; import os; assert os.path.exists(get_ptxas(90).path)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def _compiled_rows(label: str, pythonpath: str, scenarios: set[str], only: set[str]) -> list[list[str]]:
    """(scenario, kernel, regs, spills, smem_KiB) of the `only` kernels' launches in `scenarios`, compiled for
    sm_90 by the report in a child process (without TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    if not _has_nvidia_backend(pythonpath, env):
        pytest.skip(f"triton ({label}) has no NVIDIA backend / ptxas")
    code = _SCRIPT.replace("SCENARIOS", repr(scenarios)).replace("ONLY", repr(only))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [line.split("|")[1:] for line in proc.stdout.splitlines() if line.startswith("ROW|")]


def _assert_fits(label: str, rows: list[list[str]]) -> None:
    for scenario, kernel, regs, spills, smem_kib in rows:
        assert int(spills) == 0, f"{kernel} ({scenario}) spills {spills} bytes with triton {label}"
        assert float(smem_kib) * 1024 <= H100_SHARED_BYTES, (kernel, scenario, smem_kib)
        assert int(regs) <= 255


@pytest.mark.parametrize("label,pythonpath", _triton_dirs(), ids=[d[0] for d in _triton_dirs()])
def test_moe_launches_compile_without_spills(label: str, pythonpath: str) -> None:
    only = {"moe.route_topk", "moe.route_group", "moe.matmul1", "moe.matmul2", "moe.combine"}
    rows = _compiled_rows(label, pythonpath, {"decode-1 ctx1k", "decode-64 ctx1k", "prefill-2048"}, only)
    assert len(rows) >= 12, rows
    _assert_fits(label, rows)


@pytest.mark.parametrize("label,pythonpath", _triton_dirs(), ids=[d[0] for d in _triton_dirs()])
def test_fused_and_attention_launches_compile_without_spills(label: str, pythonpath: str) -> None:
    """add+RMSNorm, the fused q/k/v GEMM (N = 5120), the split-K o_proj and router GEMMs, RoPE + KV write,
    decode split + folded combine (full and sliding layers, 1k and 32k contexts) and prefill."""
    only = {"norm.add_rms_norm", "dense.qkv_proj", "dense.o_proj", "dense.router", "attn.rope_write_kv",
            "attn.decode_split", "attn.prefill"}  # fmt: skip
    rows = _compiled_rows(label, pythonpath, {"decode-1 ctx1k", "decode-1 ctx32k", "prefill-2048"}, only)
    kernels = {kernel for _, kernel, *_ in rows}
    assert {"attn.decode_split (+combine, full)", "attn.decode_split (+combine, sliding)", "attn.prefill (sliding)",
            "norm.add_rms_norm", "dense.qkv_proj", "dense.o_proj", "dense.router",
            "attn.rope_write_kv"} <= kernels, kernels  # fmt: skip
    _assert_fits(label, rows)


def test_largest_loop_counts_the_backward_branch_body() -> None:
    from gptoss.benchmarks.static_report import _largest_loop

    sass = "\n".join(
        [
            "        /*0000*/   MOV R1, c[0x0][0x28] ;",
            ".L_x_1:",
            "        /*0010*/   IADD3 R2, R2, 0x1, RZ ;",
            "        /*0020*/   LOP3.LUT R3, R2, 0x7, RZ, 0xc0, !PT ;",
            "        /*0030*/   @P0 BRA `(.L_x_1) ;",
            "        /*0040*/   EXIT ;",
        ]
    )
    assert _largest_loop(sass) == 3


def test_no_torch_op_between_kernels() -> None:
    """The report's count of torch ops between kernels (one decode step on the Triton path) is 0."""
    from gptoss.benchmarks.static_report import torch_ops_per_layer

    assert torch_ops_per_layer() == 0


_FALLBACK_SCRIPT = """
import dataclasses, os
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from gptoss.benchmarks import static_report
from gptoss.kernels import moe
from gptoss.kernels.launch_spec import ModelShape
scenario = [s for s in static_report._scenarios() if s.name == "decode-1 ctx1k"][0]
for spec in moe.launch_specs(ModelShape(), scenario):
    if spec.name.startswith("moe.matmul"):
        for asm, wide in ((True, False), (False, False), (True, True)):
            constants = {**spec.constants, "ASM_DECODE": asm, "WIDE_SCALES": wide}
            c = static_report.compile_spec(dataclasses.replace(spec, constants=constants))
            print("ROW|{}|{}|{}|{}|{}".format(spec.name, asm, wide, c.spills, c.loop_instructions), flush=True)
"""


def test_moe_decode_fallback_compiles_without_spills() -> None:
    """The pure-Triton e2m1 decode (ASM_DECODE=False, the fallback to the inline PTX) and the decode of a
    checkpoint with scales > 128 (WIDE_SCALES) compile for sm_90 on the installed triton without spills; the
    inline PTX one has the shorter main loop."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not _has_nvidia_backend("", env):
        pytest.skip("triton has no NVIDIA backend / ptxas")
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split("|")[1:] for line in proc.stdout.splitlines() if line.startswith("ROW|")]
    assert len(rows) == 6, proc.stdout
    loops = {}
    for name, asm, wide, spills, loop in rows:
        assert int(spills) == 0, f"{name} (ASM_DECODE={asm}, WIDE_SCALES={wide}) spills {spills} bytes"
        loops[name, asm == "True", wide == "True"] = int(loop)
    for name, _, _ in loops:
        assert loops[name, True, False] <= loops[name, False, False], loops
