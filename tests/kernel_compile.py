"""Compile a kernel module's `launch_configs(...)` for sm_90 with Triton's real code generation and ptxas (no
GPU needed), in a child process without TRITON_INTERPRET (which the test process has set)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import re, subprocess, tempfile
import triton
from triton.backends.nvidia.compiler import get_ptxas
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from gptoss.kernels import MODULE as module

for cfg in eval(CALL, vars(module)):
    kernel = cfg["kernel"]
    kernel = kernel if isinstance(kernel, JITFunction) else triton.jit(kernel)
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in cfg["constexprs"]:
            signature[name] = "constexpr"
            continue
        signature[name] = cfg["pointers"].get(name, "fp32" if name in cfg["float_args"] else "i32")
        # What a real launch specialises: 16-aligned pointers and strides (a block-table row may not be).
        if name.endswith("_ptr") or (name.startswith("stride") and name != "stride_bt"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(kernel, signature, constexprs=cfg["constexprs"], attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    # Registers and spills: ptxas -v on the kernel's PTX (what Triton's own ptxas run computes, unprinted).
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        info = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx.name, "-o", "/dev/null"],
                              capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\\d+) registers", info).group(1))
    spills = sum(int(n) for n in re.findall(r"(\\d+) bytes spill", info))
    print(f"RESULT|{cfg['name']}|{compiled.metadata.shared}|{regs}|{spills}", flush=True)
"""


def have_ptxas() -> bool:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() or shutil.which("ptxas") is not None


def compile_launch_configs(module: str, call: str) -> list[tuple[str, int, int, int]]:
    """(name, shared memory bytes, registers a thread, spilled bytes) of every config that `call` (an expression
    evaluated in the namespace of `gptoss.kernels.<module>`, e.g. "launch_configs(1, 1024)") lists, compiled
    for sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = _SCRIPT.replace("MODULE", module).replace("CALL", repr(call))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [line.split("|")[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT|")]
    return [(name, int(shared), int(regs), int(spills)) for name, shared, regs, spills in results]
