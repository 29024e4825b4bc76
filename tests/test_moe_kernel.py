"""kernels/moe.py (Triton MXFP4 MoE) against kernels.reference.moe_reference.

Without CUDA the kernels run in Triton's CPU interpreter: this module sets TRITON_INTERPRET=1 before anything
is launched. `kernels.moe` turns its kernels into Triton functions at launch time, so the variable takes effect
even if another test module imported triton first. With CUDA (and TRITON_INTERPRET unset) the same tests run
compiled on the GPU, where bf16 dots make the bounds below the ones that matter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from gptoss.kernels.moe import (
    _FAST_CONFIGS,
    _INVARIANT_CONFIGS,
    MoeConfig,
    fused_moe,
    interpreting,
    moe_route,
)
from gptoss.kernels.reference import moe_reference

DEVICE = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
# ||out - ref|| / ||ref||. Interpreter: fp32 math, so fp32 is at rounding level (measured <= 3e-7) and bf16 is
# dominated by storing act [P, I] and the output in bf16 (measured <= 6.7e-3; the interpreter truncates
# fp32 -> bf16 where the GPU rounds to nearest). GPU: bf16 operands in the dots too (fp32 x is cast to bf16).
REL_TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1.5e-2, torch.bfloat16: 2e-2}

# numpy warns when exp overflows in sigmoid of a very negative gate; the result (0) is the right one.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def make_moe_inputs(
    num_tokens: int, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random activations, router logits and MXFP4 experts (scales near 2^0 so values stay O(1))."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    def mxfp4(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (num_experts, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
        scales = torch.randint(119, 125, (num_experts, rows, cols // 32), generator=gen, dtype=torch.uint8)
        return blocks.to(DEVICE), scales.to(DEVICE)

    w1_blocks, w1_scales = mxfp4(2 * intermediate, hidden)
    w2_blocks, w2_scales = mxfp4(hidden, intermediate)
    return {
        "x": randn(num_tokens, hidden),
        "router_logits": (torch.randn(num_tokens, num_experts, generator=gen) * 2).to(DEVICE),
        "w1_blocks": w1_blocks,
        "w1_scales": w1_scales,
        "w1_bias": randn(num_experts, 2 * intermediate, scale=0.5),
        "w2_blocks": w2_blocks,
        "w2_scales": w2_scales,
        "w2_bias": randn(num_experts, hidden, scale=0.5),
    }


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_against_reference(inputs: dict[str, torch.Tensor], top_k: int, batch_invariant: bool = True) -> float:
    out = fused_moe(**inputs, top_k=top_k, batch_invariant=batch_invariant)
    ref = moe_reference(**inputs, top_k=top_k)
    assert out.shape == ref.shape and out.dtype == inputs["x"].dtype
    assert torch.isfinite(out.float()).all()
    err = rel_error(out, ref)
    assert err < REL_TOL[inputs["x"].dtype], f"relative error {err:.3g}"
    return err


# ---------------------------------------------------------------------------------------------- routing


ROUTE_CASES = [(1, 8, 4, 16), (37, 6, 2, 8), (5, 128, 4, 64), (64, 128, 4, 64)]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", ROUTE_CASES)
def test_route_groups_pairs_by_expert(num_tokens: int, num_experts: int, top_k: int, block_m: int) -> None:
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(num_tokens))
    r = moe_route(logits, top_k, block_m, fused=False)
    ref_values, ref_ids = torch.topk(logits, top_k, dim=-1)
    assert torch.equal(r.expert_ids.long(), ref_ids)
    torch.testing.assert_close(r.expert_weights, torch.softmax(ref_values, -1))
    flat = r.expert_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    assert r.expert_offsets.tolist() == [0, *torch.cumsum(counts, 0).tolist()]
    sorted_experts = flat[r.sorted_pairs.long()]
    assert torch.all(sorted_experts[1:] >= sorted_experts[:-1])
    assert sorted(r.sorted_pairs.tolist()) == list(range(num_tokens * top_k))
    # Tiles: exactly ceil(count / block_m) per expert, never crossing an expert, empty experts get none.
    tiles = [(e, s) for e, s in zip(r.tile_expert.tolist(), r.tile_row_start.tolist(), strict=False) if e >= 0]
    expected = [
        (e, int(r.expert_offsets[e]) + i * block_m)
        for e in range(num_experts)
        for i in range(-(-int(counts[e]) // block_m))
    ]
    assert tiles == expected
    assert all(e == -1 for e in r.tile_expert.tolist()[len(tiles) :])


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", ROUTE_CASES)
def test_fused_route_kernel_matches_torch_routing(num_tokens: int, num_experts: int, top_k: int, block_m: int) -> None:
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    fused = moe_route(logits, top_k, block_m, fused=True)
    plain = moe_route(logits, top_k, block_m, fused=False)
    for name in ("expert_ids", "sorted_pairs", "expert_offsets", "tile_expert", "tile_row_start"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    torch.testing.assert_close(fused.expert_weights, plain.expert_weights, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ kernel vs reference


@pytest.mark.parametrize(
    "num_tokens,num_experts,hidden,intermediate,top_k,dtype",
    [
        (13, 8, 96, 160, 4, torch.float32),  # sizes multiples of 32 but not of 64
        (13, 8, 160, 96, 4, torch.bfloat16),
        (1, 16, 96, 64, 4, torch.bfloat16),  # decode: most experts empty
        (37, 4, 64, 96, 2, torch.float32),  # several row tiles per expert, token count not a block multiple
    ],
)
def test_fused_moe_matches_reference(
    num_tokens: int, num_experts: int, hidden: int, intermediate: int, top_k: int, dtype: torch.dtype
) -> None:
    inputs = make_moe_inputs(num_tokens, num_experts, hidden, intermediate, dtype, seed=num_tokens + hidden)
    check_against_reference(inputs, top_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_mode_matches_reference(dtype: torch.dtype) -> None:
    inputs = make_moe_inputs(11, 8, 96, 96, dtype, seed=3)
    check_against_reference(inputs, top_k=4, batch_invariant=False)


@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_on_one_expert(top_k: int) -> None:
    inputs = make_moe_inputs(40, 8, 64, 96, torch.float32, seed=5)
    inputs["router_logits"][:, 3] += 100.0  # expert 3 first for everyone; with k=2 the others share the rest
    r = moe_route(inputs["router_logits"], top_k, 32)
    assert int(r.expert_offsets[4] - r.expert_offsets[3]) == 40
    check_against_reference(inputs, top_k)


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_expert_parallel_shards_sum_to_the_whole(batch_invariant: bool) -> None:
    """Each rank's experts (a contiguous quarter) give its fp32 part; the parts add up to the full MoE, in the
    kernel as in the reference (which shares the contract: slots routed to other ranks add nothing)."""
    inputs = make_moe_inputs(9, 8, 64, 96, torch.float32, seed=11)
    full = moe_reference(**inputs, top_k=2)
    expert_tensors = [k for k in inputs if k.startswith("w")]
    parts, reference_parts = [], []
    for start in range(0, 8, 2):
        shard = {k: v[start : start + 2] if k in expert_tensors else v for k, v in inputs.items()}
        kwargs = {"top_k": 2, "expert_start": start, "out_dtype": torch.float32}
        parts.append(fused_moe(**shard, batch_invariant=batch_invariant, **kwargs))
        reference_parts.append(moe_reference(**shard, **kwargs))
    assert all(p.dtype == torch.float32 for p in parts)
    assert rel_error(sum(reference_parts), full) < 1e-6
    assert rel_error(sum(parts), full) < REL_TOL[torch.float32]
    with pytest.raises(ValueError, match="not among"):
        fused_moe(**{k: v[6:] if k in expert_tensors else v for k, v in inputs.items()}, top_k=2, expert_start=7)


def test_swiglu_clamps_are_applied() -> None:
    """Large biases push gate/up past the +-7 clamps, so a missing clamp would show."""
    inputs = make_moe_inputs(6, 4, 64, 64, torch.float32, seed=9)
    inputs["w1_bias"] = inputs["w1_bias"] * 40.0
    check_against_reference(inputs, top_k=2)


def test_zero_tokens() -> None:
    inputs = make_moe_inputs(0, 4, 64, 64, torch.float32)
    assert fused_moe(**inputs, top_k=2).shape == (0, 64)


def test_rejects_bad_shapes() -> None:
    inputs = make_moe_inputs(2, 4, 64, 64, torch.float32)
    with pytest.raises(ValueError):
        fused_moe(**{**inputs, "w2_bias": inputs["w2_bias"][:, :32]}, top_k=2)
    with pytest.raises(ValueError):
        fused_moe(**inputs, top_k=5)


# ------------------------------------------------------------------------------------------ invariance


def test_batch_invariance_bit_identical() -> None:
    """A token's output is the same bits alone or inside a batch (24 here; on GPU 256 and 3000, which also
    crosses from the first invariant tile config to the second, and from fused to torch routing)."""
    batches = [24] if DEVICE == "cpu" else [256, 3000]
    inputs = make_moe_inputs(max(batches), 8, 64, 96, torch.bfloat16, seed=11)
    alone = {}
    for token in (0, 5, 23):
        single = {
            **inputs,
            "x": inputs["x"][token : token + 1],
            "router_logits": inputs["router_logits"][token : token + 1],
        }
        alone[token] = fused_moe(**single, top_k=4)[0]
    for batch in batches:
        batch_inputs = {**inputs, "x": inputs["x"][:batch], "router_logits": inputs["router_logits"][:batch]}
        full = fused_moe(**batch_inputs, top_k=4)
        for token, out in alone.items():
            assert torch.equal(out, full[token]), f"token {token} differs alone vs in a batch of {batch}"
        assert torch.equal(fused_moe(**batch_inputs, top_k=4), full)


def test_invariant_table_keeps_the_reduction_shape() -> None:
    """Batch invariance on GPU rests on the table: one BLOCK_K (no split-K) in every entry. The MMA
    instruction shape of each entry is checked in test_kernels_compile_for_sm90."""
    assert len({c.block_k for _, c in _INVARIANT_CONFIGS}) == 1


# ----------------------------------------------------------------------------------- sm_90 compilation


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.exists(os.path.join(bin_dir, "ptxas")) or shutil.which("ptxas") is not None


def compile_moe_for_hopper(configs: list[MoeConfig]) -> list[str]:
    """Compile the matmul variants and the combine for sm_90 without a GPU (real codegen + ptxas).

    Returns, per config and matmul variant, the MMA layouts of its TTGIR (`versionMajor ... instrShape`).

    Runs in a child process without TRITON_INTERPRET: the interpreter patches triton.language in this one.
    """
    tiles = [(c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages) for c in configs]
    code = _COMPILE_SCRIPT.replace("TILES", repr(tiles))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [line.split("=", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("MMA=")]


_COMPILE_SCRIPT = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from gptoss.kernels import moe

def build(fn, pointer_types, constants, num_warps, num_stages):
    kernel = JITFunction(fn)
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name.startswith("swiglu") else "i32"
    source = triton.compiler.ASTSource(kernel, signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return sorted(set(re.findall(r"versionMajor = [0-9]+.*?instrShape = \\[[0-9, ]*\\]", compiled.asm["ttgir"])))

index_types = dict(wb_ptr="*u8", ws_ptr="*u8", bias_ptr="*bf16", sorted_pair_ptr="*i32",
                   pair_weight_ptr="*fp32", tile_expert_ptr="*i32", tile_row_start_ptr="*i32",
                   expert_offsets_ptr="*i32")
variants = [(True, False, "*bf16", "*bf16"), (True, False, "*fp32", "*fp32"), (False, False, "*bf16", "*fp32"),
            (False, True, "*bf16", "*fp32")]
for block_m, block_n, block_k, num_warps, num_stages in TILES:
    for swiglu, atomic, a_type, out_type in variants:
        constants = dict(K=2880, TOP_K=4, GATHER_A=swiglu, SWIGLU=swiglu, ATOMIC_OUT=atomic, FP32_MATH=False,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        mma = build(moe._moe_matmul_kernel, dict(index_types, a_ptr=a_type, out_ptr=out_type), constants,
                    num_warps, num_stages)
        print("MMA=", "; ".join(mma))
build(moe._moe_combine_kernel, dict(y_ptr="*fp32", out_ptr="*bf16"), dict(TOP_K=4, BLOCK_H=1024), 4, 1)
route_types = dict(logits_ptr="*bf16", expert_ids_ptr="*i32", expert_weights_ptr="*fp32", sorted_pairs_ptr="*i32",
                   expert_offsets_ptr="*i32", tile_expert_ptr="*i32", tile_row_start_ptr="*i32")
route_constants = dict(E=128, TOP_K=4, BLOCK_M=64, BLOCK_T=1, BLOCK_E=128, BLOCK_KK=4, BLOCK_P=4, BLOCK_S=8)
build(moe._moe_route_kernel, route_types, route_constants, 8, 1)
"""


@pytest.mark.parametrize(
    "table",
    [pytest.param(_INVARIANT_CONFIGS, id="invariant"), pytest.param(_FAST_CONFIGS, id="fast", marks=pytest.mark.slow)],
)
def test_kernels_compile_for_sm90(table: list[tuple[int, MoeConfig]]) -> None:
    if not _ptxas_available():
        pytest.skip("this triton has no NVIDIA backend / ptxas")
    mma_layouts = compile_moe_for_hopper([config for _, config in table])
    assert len(mma_layouts) == 4 * len(table)
    if table is _INVARIANT_CONFIGS:
        # One wgmma instruction shape and one warp arrangement per warpgroup for every entry and variant.
        shapes = {re.sub(r"warpsPerCTA = \[[0-9, ]*\], ", "", layout) for layout in mma_layouts}
        assert len(shapes) == 1 and "versionMajor = 3" in shapes.pop(), mma_layouts


# ------------------------------------------------------------------------------------------ benchmark


def test_bench_moe_tiny_smoke(tmp_path) -> None:
    """The benchmark runs end to end at a tiny size (interpreter on CPU) and writes its table, JSON and PNG."""
    from gptoss.benchmarks import bench_moe

    results = bench_moe.main(["--tiny", "--out", str(tmp_path), "--tokens", "1", "5"])
    assert (tmp_path / "bench_moe.json").exists()
    assert [r["tokens"] for r in results["rows"] if r["impl"] == "triton_invariant"] == [1, 5]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bench_moe.png").exists()
