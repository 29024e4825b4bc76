"""What the GPU would do, read off the compiler without a GPU: `python -m benchmarks.static_report`.

For every kernel launch the engine makes at gpt-oss-120b shapes (decode of 1, 8 and 64 tokens at a 1k
context, decode of 1 token at 32k, a 2048-token prefill), compiled for sm_90 with the installed Triton
(real codegen + ptxas): registers, spills, shared memory, CTAs against the 132 SMs of an H100/H200, bytes
each CTA streams, and for the MoE main loop the SASS instructions per weight element and byte (nvdisasm
from Triton's bundled tools). Then the launches of one decode step and a predicted batch-1 tokens/s, with
the assumptions printed. The last line reads
`predicted batch-1 decode, gpt-oss-120b, H100 SXM: N tokens/s; launches per decode step: M`.

Registry: each kernel module in `KERNEL_MODULES` exposes `launch_specs(model, scenario)` returning
`kernels.launch_spec.LaunchSpec`s; a new kernel module adds its path to `KERNEL_MODULES`. The torch ops still
launched between kernels are counted on the model itself (`torch_ops_per_layer`: one decode step of the tiny
model through the Triton path in the interpreter, benchmarks/launch_count.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Module paths whose `launch_specs(model, scenario)` the report reads.
KERNEL_MODULES: list[str] = [
    "gptoss.kernels.norm",
    "gptoss.kernels.matmul",
    "gptoss.kernels.attention",
    "gptoss.kernels.moe",
]

H100_SMS = 132
H100_HBM_BYTES_PER_S = 3.35e12
STREAM_EFFICIENCY = 0.80  # fraction of peak HBM a streaming kernel with >= 1 CTA per SM reaches
ISSUE_EFFICIENCY = 0.5  # fraction of the 4 warp-instructions/clock/SM a decode-heavy loop sustains
SM_CLOCK_HZ = 1.755e9
LAUNCH_GAP_S = 1.5e-6  # per kernel node inside a CUDA graph (launch + tail), measured elsewhere ~1-2 us


@dataclass
class Compiled:
    registers: int
    spills: int
    shared: int
    loop_instructions: int | None  # SASS instructions (per warp) in the innermost hot loop, if found


def _scenarios():
    from gptoss.kernels.launch_spec import Scenario

    return [
        Scenario("decode-1 ctx1k", 1, 1024, True),
        Scenario("decode-8 ctx1k", 8, 1024, True),
        Scenario("decode-64 ctx1k", 64, 1024, True),
        Scenario("decode-1 ctx32k", 1, 32768, True),
        Scenario("prefill-2048", 2048, 0, False),
    ]


def all_specs(model, scenario) -> list:
    """Every launch of one step in `scenario`: the registered kernel modules'."""
    specs = []
    for path in KERNEL_MODULES:
        specs += importlib.import_module(path).launch_specs(model, scenario)
    return specs


# ----------------------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------------------


def compile_spec(spec) -> Compiled:
    """Compile one launch for sm_90 (no GPU) and read registers and spills from ptxas, shared memory from
    Triton, and the hot loop's SASS instruction count from nvdisasm."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.runtime.jit import JITFunction

    kernel = spec.kernel if isinstance(spec.kernel, JITFunction) else JITFunction(spec.kernel)
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in spec.constants:
            signature[name] = "constexpr"
        else:
            signature[name] = spec.pointers.get(name, "i32")
    aligned = [n for n in names if spec.pointers.get(n, "").startswith("*")] + list(spec.aligned)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned if a in names and a not in spec.constants}
    source = triton.compiler.ASTSource(kernel, signature, constexprs=spec.constants, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptxas = get_ptxas(90).path
    bin_dir = os.path.dirname(ptxas)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        info = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", ptx_path, "-o", cubin_path], capture_output=True, text=True
        )
        if info.returncode:
            raise RuntimeError(f"ptxas failed for {spec.name}: {info.stderr[-2000:]}")
        registers = int(re.search(r"Used (\d+) registers", info.stderr).group(1))
        spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", info.stderr))
        loop = None
        nvdisasm = os.path.join(bin_dir, "nvdisasm")
        if spec.loop_weight_bytes and os.path.exists(nvdisasm):
            with open(cubin_path, "wb") as f:
                f.write(compiled.asm["cubin"])
            sass = subprocess.run([nvdisasm, "-c", cubin_path], capture_output=True, text=True).stdout
            loop = _largest_loop(sass)
    return Compiled(registers, spills, compiled.metadata.shared, loop)


def _largest_loop(sass: str) -> int | None:
    """Instructions between a label and the last backward branch to it (the main loop's body)."""
    lines = sass.splitlines()
    label_at, best = {}, None
    count = 0
    for line in lines:
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            label_at[label.group(1)] = count
            continue
        if re.search(r"/\*[0-9a-f]{4,}\*/", line):
            count += 1
            branch = re.search(r"BRA\s+`?\(?(\.L_x_\d+)\)?", line)
            if branch and branch.group(1) in label_at:
                size = count - label_at[branch.group(1)]
                best = max(best or 0, size)
    return best


# ----------------------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------------------


def torch_ops_per_layer() -> int:
    """Torch kernels a decoder layer still launches between its Triton kernels in a decode step: measured on
    the tiny model through the Triton path, in the interpreter, in a child process (this one compiles for the
    GPU, without TRITON_INTERPRET). benchmarks/launch_count.py; tests/test_model.py holds it at 0."""
    code = (
        "from gptoss.benchmarks.launch_count import decode_step_launches\n"
        "per_layer = decode_step_launches('triton')\n"
        "print('TORCH_OPS', max(sum(n.startswith('torch:') for n in v) for v in per_layer.values()))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return int(re.search(r"TORCH_OPS (\d+)", out).group(1))


def predict(rows: list[dict], torch_ops: int, layers: int) -> tuple[float, int, list[str]]:
    """(seconds per batch-1 decode step, launches per step, assumptions) from the decode-1 ctx1k rows."""
    step = 0.0
    launches = torch_ops * layers
    for row in rows:
        fill = min(1.0, row["ctas"] / H100_SMS)
        t_mem = row["total_bytes"] / (H100_HBM_BYTES_PER_S * STREAM_EFFICIENCY * fill)
        t_issue = 0.0
        if row.get("loop_instructions"):
            warp_instructions = row["loop_instructions"] * row["num_warps"] * row["total_bytes"] / row["loop_bytes"]
            t_issue = warp_instructions / (H100_SMS * 4 * SM_CLOCK_HZ * ISSUE_EFFICIENCY)
        step += row["launches_per_step"] * (max(t_mem, t_issue) + LAUNCH_GAP_S)
        launches += row["launches_per_step"]
    step += torch_ops * layers * LAUNCH_GAP_S  # the torch elementwise ops: tiny, launch-bound
    assumptions = [
        f"HBM {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s peak, streaming kernels at {STREAM_EFFICIENCY:.0%} of it "
        f"when they have >= {H100_SMS} CTAs (proportionally less with fewer)",
        f"MoE main loop issue-bound time: SASS loop instructions x warps x iterations at "
        f"{ISSUE_EFFICIENCY:.0%} of 4 warp-instr/clock/SM, {SM_CLOCK_HZ / 1e9:.3f} GHz; "
        "a launch costs max(memory, issue)",
        f"{LAUNCH_GAP_S * 1e6:.1f} us per kernel node inside a CUDA graph; torch elementwise ops launch-bound",
        "bytes: weights read once per step, KV of a 1k context, activations; no L2 reuse across layers",
    ]
    return step, launches, assumptions


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def build_rows(scenarios, model, only: set[str] | None = None) -> list[dict]:
    rows = []
    for scenario in scenarios:
        for spec in all_specs(model, scenario):
            if only and spec.name.split(" ")[0] not in only:
                continue
            c = compile_spec(spec)
            row = {
                "scenario": scenario.name,
                "kernel": spec.name,
                "warps": spec.num_warps,
                "stages": spec.num_stages,
                "regs": c.registers,
                "spills": c.spills,
                "smem_KiB": round(c.shared / 1024, 1),
                "ctas": spec.ctas,
                "ctas/SM": round(spec.ctas / H100_SMS, 2),
                "KB/cta": round(spec.bytes_per_cta / 1e3, 1),
                "total_bytes": spec.total_bytes,
                "num_warps": spec.num_warps,
                "launches_per_step": spec.launches_per_step,
                "loop_instructions": c.loop_instructions,
                "loop_bytes": spec.loop_weight_bytes,
            }
            if c.loop_instructions:
                threads = 32 * spec.num_warps  # each thread issues the loop once per iteration
                row["sass/elem"] = round(c.loop_instructions * threads / spec.loop_weight_elements, 2)
                row["sass/byte"] = round(c.loop_instructions * threads / spec.loop_weight_bytes, 2)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="kernel names to compile (e.g. moe.matmul1)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "gptoss.benchmarks.static_report", *(argv or [])], env=env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from gptoss.benchmarks.common import format_table
    from gptoss.kernels.launch_spec import ModelShape

    model = ModelShape()
    rows = build_rows(_scenarios(), model, set(args.only) if args.only else None)
    columns = ["scenario", "kernel", "warps", "stages", "regs", "spills", "smem_KiB", "ctas", "ctas/SM", "KB/cta",
               "sass/elem", "sass/byte", "launches_per_step"]  # fmt: skip
    print(f"sm_90 compilation with triton {triton.__version__}; {H100_SMS} SMs (H100 SXM / H200)")
    print("sass/elem, sass/byte: SASS instructions per thread in the MoE main loop per weight element / byte")
    print(format_table(rows, columns))
    torch_ops = torch_ops_per_layer()
    decode = [r for r in rows if r["scenario"] == "decode-1 ctx1k"]
    step, launches, assumptions = predict(decode, torch_ops, model.layers)
    print(f"torch ops between kernels: {torch_ops} per layer (measured: benchmarks/launch_count.py)")
    print("assumptions:\n  " + "\n  ".join(assumptions))
    print(f"predicted decode step (batch 1, 1k context): {step * 1e3:.2f} ms")
    print(
        f"predicted batch-1 decode, gpt-oss-120b, H100 SXM: {1 / step:.0f} tokens/s; launches per decode step: "
        f"{launches}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
