"""kernels/matmul.py (batch-invariant Triton linear) against kernels.matmul.linear_reference, and its dispatch.

Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before anything is
launched; kernels.matmul reads it at launch time) with one fixed tile config and fp32 math. With CUDA the same
tests run compiled, where bf16 tensor-core dots and the whole tile table are exercised: the invariance tests
then cross every row-count bucket of the table at the model's real layer shapes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from gptoss.engine.model import ops
from gptoss.kernels.matmul import (
    _COUNTERS,
    MatmulConfig,
    gpu_config,
    instr_n_for,
    interpreting,
    invariant_configs,
    k_per_split,
    launch_specs,
    linear,
    linear_reference,
    pick_config,
)

DEVICE = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
# ||out - ref|| / ||ref|| against the fp32 reference before its final cast. Products of bf16 values are exact
# in fp32, so the kernel and the reference differ by fp32 summation order (~1e-7) plus the one rounding to
# the output dtype: bf16 output is within 2^-8 of the fp32 value per element (the interpreter truncates,
# measured 3.3e-3), 2^-9 on GPU (round to nearest, ~1.5e-3); fp32 output: measured <= 2e-7 in the
# interpreter; on GPU the bound allows for K = 4096 summed in one sequential chain (~eps * sqrt(K) = 4e-6).
REL_TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 5e-5, torch.bfloat16: 2.0**-8 + 1e-5}

# The dense layers of gpt-oss-120b: (name, N, K).
MODEL_SHAPES = [
    ("q_proj", 4096, 2880),
    ("k_proj", 512, 2880),
    ("o_proj", 2880, 4096),
    ("router", 128, 2880),
    ("lm_head", 201088, 2880),
]


def make_inputs(rows: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    """x `[rows, K]`, weight `[N, K]` (scaled so outputs are O(1)), bias `[N]` or None, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    return x, weight, b


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# ------------------------------------------------------------------------------------ kernel vs reference


@pytest.mark.parametrize(
    "rows,n,k,dtype,bias",
    [
        (1, 200, 96, torch.bfloat16, True),  # decode row; N, K not multiples of the blocks
        (3, 200, 160, torch.float32, True),
        (17, 200, 100, torch.float32, False),  # K not a multiple of any BLOCK_K: the masked K tail
        (17, 200, 160, torch.bfloat16, False),
        (64, 200, 160, torch.bfloat16, True),  # exactly two interpreter row tiles
        (130, 200, 96, torch.float32, True),  # several row tiles, the last one partial
        (130, 200, 160, torch.bfloat16, True),
        (3, 48, 64, torch.bfloat16, False),  # N below one tile, K a multiple of BLOCK_K (no K mask)
        (5, 72, 70, torch.bfloat16, True),  # masked K tail with bf16
    ],
)
def test_linear_matches_reference(rows: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> None:
    x, weight, b = make_inputs(rows, n, k, dtype, bias, seed=rows + n + k)
    out = linear(x, weight, b)
    ref = linear_reference(x, weight, b, out_dtype=torch.float32)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    err = rel_error(out, ref)
    assert err < REL_TOL[dtype], f"relative error {err:.3g}"
    if dtype == torch.bfloat16:  # element-wise: within one bf16 ulp (+ fp32 summation noise) of the fp32 value
        _, exponent = torch.frexp(ref)
        ulp = torch.ldexp(torch.ones_like(ref), exponent - 8)
        assert ((out.float() - ref).abs() <= ulp + 1e-5 * ref.abs()).all()


def test_fp32_output_from_bf16_operands() -> None:
    """out_dtype=float32 (the lm_head's logits) comes straight from the fp32 accumulator."""
    x, weight, b = make_inputs(5, 200, 160, torch.bfloat16, True, seed=1)
    out = linear(x, weight, b, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert rel_error(out, linear_reference(x, weight, b, out_dtype=torch.float32)) < REL_TOL[torch.float32]


def test_strided_input_and_fp32_bias() -> None:
    """A non-contiguous x (every other row) and an fp32 bias on bf16 operands."""
    x, weight, _ = make_inputs(10, 72, 96, torch.bfloat16, False, seed=2)
    bias = torch.randn(72).to(DEVICE)
    out = linear(x[::2], weight, bias)
    ref = linear_reference(x[::2], weight, bias, out_dtype=torch.float32)
    assert rel_error(out, ref) < REL_TOL[torch.bfloat16]


def test_empty_and_bad_inputs() -> None:
    x, weight, b = make_inputs(0, 32, 64, torch.float32, True)
    assert linear(x, weight, b).shape == (0, 32)
    x, weight, b = make_inputs(2, 32, 64, torch.float32, True)
    with pytest.raises(ValueError):
        linear(x, weight[:, :32], b)
    with pytest.raises(TypeError):
        linear(x.to(torch.bfloat16), weight, b)
    with pytest.raises(ValueError):
        linear(x, weight, b[:16])


# ------------------------------------------------------------------------------------------ invariance


def _check_rows_invariant(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch_sizes: list[int],
    rows: list[int],
    config: MatmulConfig | None = None,
) -> None:
    """Each row in `rows` gives the same bits alone, inside every prefix batch of `batch_sizes` that holds it,
    and inside a batch padded with garbage rows (a CUDA-graph bucket)."""
    alone = {r: linear(x[r : r + 1], weight, bias, config=config)[0] for r in rows}
    padding = torch.randn(37, x.shape[1], generator=torch.Generator().manual_seed(99)).mul(1e3).to(x)
    for size in batch_sizes:
        full = linear(x[:size], weight, bias, config=config)
        padded = linear(torch.cat([x[:size], padding]), weight, bias, config=config)
        for r in rows:
            if r < size:
                assert torch.equal(full[r], alone[r]), f"row {r} differs alone vs in a batch of {size}"
                assert torch.equal(padded[r], alone[r]), f"row {r} differs in a padded batch of {size}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_invariance_bit_identical(dtype: torch.dtype) -> None:
    """Interpreter: row tiles of 32, so the rows sit at different places of different tiles. GPU: batches
    that cross all three row-count buckets of the table (1..64, 65..256, > 256)."""
    n, k = 200, 160
    sizes = [3, 64, 130] if DEVICE == "cpu" else [3, 64, 65, 200, 256, 257, 600]
    x, weight, b = make_inputs(max(sizes), n, k, dtype, True, seed=3)
    _check_rows_invariant(x, weight, b, sizes, [0, 2, 31, 32, 63, 129])


def test_batch_invariance_across_tile_configs() -> None:
    """The same rows through different tile configs give the same bits. GPU: the table's configs for this N
    (one MMA width, more warp groups). Interpreter: other row/column tiles (numpy fp32 dots, so this checks
    the masking and tile bookkeeping, not GPU numerics)."""
    x, weight, b = make_inputs(40, 100, 96, torch.bfloat16, True, seed=4)
    if DEVICE == "cuda":
        configs = invariant_configs(100)
    else:
        configs = [
            MatmulConfig(block_m=bm, block_n=bn, block_k=32, instr_n=bn, num_warps=4, num_stages=1)
            for bm, bn in [(16, 32), (32, 64), (64, 16)]
        ]
    outs = [linear(x, weight, b, config=config) for config in configs]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_k_across_ctas_and_in_one_cta_give_the_same_bits(dtype: torch.dtype) -> None:
    """Split-K: each split's partial sum is reduced in split order, by the tile's last CTA (decode) or inside
    one CTA (bigger batches): the same fp32 adds, so the same bits; both close to the reference. K = 200 in
    32-wide K blocks over 4 splits: 64, 64, 64 and a masked 8-wide tail."""
    x, weight, b = make_inputs(70, 48, 200, dtype, True, seed=7)
    config = pick_config(1, 48, dtype)
    if DEVICE == "cpu":
        assert config.split_k == 4 and config.split_ctas
    base = replace(config, split_k=4)
    across, inside = replace(base, split_ctas=True), replace(base, split_ctas=False)
    unsplit = replace(base, split_k=1, split_ctas=False)
    ref = linear_reference(x, weight, b, out_dtype=torch.float32)
    for rows in (1, 5, 70):
        out_across = linear(x[:rows], weight, b, config=across)
        assert torch.equal(out_across, linear(x[:rows], weight, b, config=inside)), rows
        assert torch.equal(out_across, linear(x[:rows], weight, b, config=across)), "counters not re-armed"
        assert rel_error(out_across, ref[:rows]) < REL_TOL[dtype]
        assert rel_error(linear(x[:rows], weight, b, config=unsplit), ref[:rows]) < REL_TOL[dtype]
    assert int(_COUNTERS[x.device].abs().sum()) == 0  # every tile's last CTA reset its counter


def test_split_k_rows_bit_identical_alone_and_in_batches() -> None:
    """A split layer (N = 48: 4 splits in the interpreter) keeps a row's bits alone (split across CTAs) and in
    batches past one row tile (the splits inside one CTA), padded batches included."""
    n, k = 48, 200
    x, weight, b = make_inputs(130, n, k, torch.bfloat16, True, seed=8)
    if DEVICE == "cpu":
        assert pick_config(1, n).split_ctas and not pick_config(33, n).split_ctas
    _check_rows_invariant(x, weight, b, [3, 32, 33, 64, 130], [0, 2, 31, 32, 63, 129])


def test_split_k_depends_on_the_layer_only() -> None:
    """The split count is one per layer (N, dtype), whatever the batch; o_proj and the router launch more CTAs
    at batch 1 than without it, o_proj >= 132."""
    from gptoss.kernels.launch_spec import ModelShape, Scenario

    for _, n, _ in MODEL_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            configs = [gpu_config(rows, n, dtype) for rows in (1, 8, 64, 65, 256, 257, 4096)]
            assert len({c.split_k for c in configs}) == 1
            assert all(c.split_ctas == (c.split_k > 1) for c in configs[:3])  # decode buckets: across CTAs
            assert not any(c.split_ctas for c in configs[3:])
    assert gpu_config(1, 2880).split_k == 2 and gpu_config(1, 201088).split_k == gpu_config(1, 5120).split_k == 1
    specs = {spec.name: spec for spec in launch_specs(ModelShape(), Scenario("d", 1, 1024, True))}
    assert specs["dense.o_proj"].ctas >= 132 and specs["dense.o_proj"].constants["SPLIT_K"] == 2
    assert specs["dense.router"].ctas >= 12 * 8 and specs["dense.router"].constants["SPLIT_CTAS"]
    assert k_per_split(2880, 256, 17) == 256 and k_per_split(4096, 128, 2) == 2048


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: the real shapes and tile table")
@pytest.mark.parametrize("name,n,k", MODEL_SHAPES, ids=[s[0] for s in MODEL_SHAPES])
def test_model_shapes_invariant_across_the_table_on_gpu(name: str, n: int, k: int) -> None:
    """The proof the table needs: at each layer shape, rows are bit-identical alone (bucket 1) and in batches
    that pick each of the other buckets; and close to the reference. If only the cross-bucket comparisons
    fail, the table's premise (same wgmma shape and K steps -> same bits) does not hold on this GPU: make
    `gpu_config` return its M <= 64 entry for every M (invariant by construction, slower for big batches)."""
    x, weight, b = make_inputs(300, n, k, torch.bfloat16, name != "lm_head", seed=5)
    _check_rows_invariant(x, weight, b, [8, 64, 65, 256, 300], [0, 7, 63, 64, 255, 299])
    out = linear(x, weight, b, out_dtype=torch.float32 if name == "lm_head" else None)
    assert rel_error(out, linear_reference(x, weight, b, out_dtype=torch.float32)) < REL_TOL[out.dtype]


def test_table_keeps_block_k_and_mma_width_per_layer() -> None:
    """Invariance on GPU rests on this: within one layer (N, dtype) every row-count bucket shares BLOCK_K and
    the MMA width, and the warps tile exactly (block_m / 64) x (block_n / instr_n) warp groups."""
    for _, n, _ in MODEL_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            configs = invariant_configs(n, dtype)
            assert len({(c.block_k, c.instr_n) for c in configs}) == 1
            assert all(c.instr_n == instr_n_for(n) for c in configs)
            for c in configs:
                assert c.num_warps == 4 * (c.block_m // 64) * (c.block_n // c.instr_n) <= 32
                assert (c.block_m + c.block_n) * c.block_k * (
                    4 if dtype == torch.float32 else 2
                ) * c.num_stages <= 200 * 1024
    assert gpu_config(1, 201088).block_n == 128 and gpu_config(1, 4096).block_n == 32


# ------------------------------------------------------------------------------------------ dispatch


def test_ops_linear_uses_torch_on_cpu() -> None:
    gen = torch.Generator().manual_seed(6)
    x, weight, bias = torch.randn(5, 32, generator=gen), torch.randn(24, 32, generator=gen), torch.randn(24)
    for invariant in (True, False):
        assert torch.equal(ops.linear(x, weight, bias, invariant), torch.nn.functional.linear(x, weight, bias))
    logits = ops.linear(x.bfloat16(), weight.bfloat16(), None, True, out_dtype=torch.float32)
    assert logits.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ops_linear_dispatch_on_cuda() -> None:
    x, weight, b = make_inputs(9, 256, 128, torch.bfloat16, True, seed=7)
    assert torch.equal(ops.linear(x, weight, b, True), linear(x, weight, b))
    assert torch.equal(ops.linear(x, weight, b, False), torch.nn.functional.linear(x, weight, b))


def test_model_routes_every_dense_layer_through_ops_linear(monkeypatch) -> None:
    """q/k/v (fused), o, the router and the lm_head all go through ops.linear with the model's batch_invariant
    flag."""
    from gptoss.engine.model.config import preset
    from gptoss.engine.model.forward_batch import ForwardBatch
    from gptoss.engine.model.gpt_oss import GptOssModel
    from gptoss.engine.worker.kv_cache import allocate_kv_caches

    config = preset("tiny")
    model = GptOssModel.create(config, torch.float32, "cpu")
    for p in model.parameters():  # values do not matter here, only the calls
        p.data.copy_(torch.randn(p.shape).to(p.dtype) * 0.02 if p.is_floating_point() else torch.zeros_like(p))
    model.batch_invariant = False
    calls = []
    real = ops.linear

    def recording(x, weight, bias, batch_invariant=True, out_dtype=None, *, backend="auto"):
        calls.append((tuple(weight.shape), bias is not None, batch_invariant, out_dtype))
        return real(x, weight, bias, batch_invariant, out_dtype, backend=backend)

    monkeypatch.setattr(ops, "linear", recording)
    caches = allocate_kv_caches(config, 4, 16, torch.float32, "cpu")
    batch = ForwardBatch.shared_pool(
        torch.tensor([0, 3], dtype=torch.int32),
        torch.tensor([3], dtype=torch.int32),
        torch.tensor([[0]], dtype=torch.int32),
        torch.arange(3),
    )
    hidden = model.forward(torch.tensor([1, 2, 3]), torch.arange(3), batch, caches)
    model.compute_logits(hidden)
    h, d = config.hidden_size, config.head_dim
    per_layer = [
        ((config.num_attention_heads + 2 * config.num_key_value_heads) * d, h),  # the fused q/k/v projection
        (h, config.num_attention_heads * d),
        (config.num_local_experts, h),
    ]
    expected = [(shape, True, False, None) for _ in range(config.num_hidden_layers) for shape in per_layer]
    expected.append(((config.vocab_size, h), False, False, torch.float32))
    assert sorted(calls) == sorted(expected)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_model_decode_logits_bit_identical_alone_and_in_a_padded_batch(tiny_checkpoint: Path) -> None:
    """End to end on GPU (bf16): one decode step of 70 sequences plus 10 padding rows (crossing the first
    bucket of the tile table) against each of a few sequences alone: identical logits."""
    from gptoss.engine.model.config import ModelConfig
    from gptoss.engine.model.forward_batch import ForwardBatch
    from gptoss.engine.model.gpt_oss import GptOssModel
    from gptoss.engine.model.loader import load_weights
    from gptoss.engine.worker.kv_cache import allocate_kv_caches

    config = ModelConfig.from_json(tiny_checkpoint)
    model = GptOssModel.create(config, torch.bfloat16, "cuda")
    load_weights(model, tiny_checkpoint, progress=False)
    block_size, blocks_per_seq, num_seqs, num_pad = 16, 3, 70, 10
    gen = torch.Generator().manual_seed(8)
    caches = [
        (torch.randn(k.shape, generator=gen).to(k), torch.randn(v.shape, generator=gen).to(v))
        for k, v in allocate_kv_caches(config, num_seqs * blocks_per_seq + 1, block_size, torch.bfloat16, "cpu")
    ]
    caches = [(k.cuda(), v.cuda()) for k, v in caches]
    seq_lens = torch.randint(1, blocks_per_seq * block_size, (num_seqs,), generator=gen)
    tables = 1 + torch.arange(num_seqs * blocks_per_seq).view(num_seqs, blocks_per_seq)  # block 0: padding
    slots = tables.gather(1, ((seq_lens - 1) // block_size)[:, None])[:, 0] * block_size + (seq_lens - 1) % block_size
    input_ids = torch.randint(0, config.vocab_size, (num_seqs,), generator=gen)

    def step(rows: list[int], pad: int) -> torch.Tensor:
        n = len(rows) + pad
        lens = torch.cat([seq_lens[rows], torch.ones(pad, dtype=torch.int64)])
        table = torch.cat([tables[rows], torch.zeros(pad, blocks_per_seq, dtype=torch.int64)])
        slot = torch.cat([slots[rows], torch.full((pad,), -1)])
        ids = torch.cat([input_ids[rows], torch.zeros(pad, dtype=torch.int64)])
        batch = ForwardBatch.shared_pool(
            torch.arange(n + 1, dtype=torch.int32).cuda(),
            lens.int().cuda(),
            table.int().cuda(),
            slot.cuda(),
            max_query_len=1,
            max_seq_len=blocks_per_seq * block_size,
        )
        step_caches = [(k.clone(), v.clone()) for k, v in caches]
        hidden = model.forward(ids.cuda(), (lens - 1).cuda(), batch, step_caches)
        return model.compute_logits(hidden)[: len(rows)]

    full = step(list(range(num_seqs)), num_pad)
    for s in (0, 17, 69):
        assert torch.equal(step([s], 0)[0], full[s]), f"sequence {s}: logits differ alone vs in the batch"


# ----------------------------------------------------------------------------------- sm_90 compilation


def _triton_dirs() -> list[tuple[str, str]]:
    """(label, PYTHONPATH prefix) of each triton to compile with: the installed one, and the GPU image's
    release if a copy is at $GPTOSS_TRITON36 (default /tmp/triton36)."""
    dirs = [("installed", "")]
    triton36 = os.environ.get("GPTOSS_TRITON36", "/tmp/triton36")
    if (Path(triton36) / "triton" / "__init__.py").exists():
        dirs.append(("3.6", triton36))
    return dirs


def _ptxas_available(pythonpath: str) -> bool:
    code = (
        "import os, shutil, triton; from triton.backends.nvidia.compiler import get_ptxas; "
        "b = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas'); "
        "assert os.path.exists(b) or shutil.which('ptxas')"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


_COMPILE_SCRIPT = """
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from gptoss.kernels import matmul

def build(n, k, cfg, dtype, out_dtype, has_bias):
    kernel = JITFunction(matmul._linear_kernel, do_not_specialize=["M"])
    names = kernel.arg_names
    # What a launch on contiguous tensors specialises: unit strides are constants, the others (and the
    # pointers) divisible by 16; M never (do_not_specialize).
    constants = dict(stride_xk=1, stride_wk=1, stride_on=1, K=k, HAS_BIAS=has_bias, FP32_MATH=False,
                     DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=cfg[0], BLOCK_N=cfg[1],
                     BLOCK_K=cfg[2], GROUP_M=8, SPLIT_K=cfg[5], K_PER_SPLIT=cfg[6], SPLIT_CTAS=cfg[7])
    pointers = dict(x_ptr="*" + dtype, w_ptr="*" + dtype, bias_ptr="*" + dtype, out_ptr="*" + out_dtype,
                    partial_ptr="*fp32", counter_ptr="*i32")
    signature = {a: "constexpr" if a in constants else pointers.get(a, "i32") for a in names}
    aligned = [*pointers, "stride_xm", "stride_wn", "stride_om"] + (["N"] if n % 16 == 0 else [])
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    source = triton.compiler.ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg[3], num_stages=cfg[4]))
    mma = sorted(set(re.findall(r"versionMajor = [0-9]+.*?instrShape = \\[[0-9, ]*\\]", compiled.asm["ttgir"])))
    return "; ".join(mma), compiled.metadata.shared

for layer, n, k, dtype, out_dtype, has_bias, cfg in CASES:
    mma, shared = build(n, k, cfg, dtype, out_dtype, has_bias)
    print(f"RESULT|{layer}|{cfg}|{mma}|{shared}", flush=True)
"""


@pytest.mark.parametrize("label,pythonpath", _triton_dirs(), ids=[d[0] for d in _triton_dirs()])
def test_table_compiles_for_sm90_with_one_mma_shape_per_layer(label: str, pythonpath: str) -> None:
    """Every config of the table compiles for sm_90 (real codegen + ptxas, no GPU needed), fits in shared
    memory, and within one layer all configs issue the same wgmma instruction shape (warpsPerCTA differs:
    more warp groups, same instruction per warp group). One representative N per MMA width."""
    if not _ptxas_available(pythonpath):
        pytest.skip(f"triton ({label}) has no NVIDIA backend / ptxas")

    def cfg(c: MatmulConfig, k: int) -> tuple:
        step = k_per_split(k, c.block_k, c.split_k)
        splits = -(-k // step)
        return (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, splits, step, c.split_ctas and splits > 1)

    cases = []
    for layer, n, k, dtype, out_dtype, bias in [
        ("lm_head", 201088, 2880, "bf16", "fp32", False),
        ("q_proj", 4096, 2880, "bf16", "bf16", True),
        ("k_proj", 512, 2880, "bf16", "bf16", True),
        ("o_proj", 2880, 4096, "bf16", "bf16", True),  # split-K: 2 splits
        ("router", 128, 2880, "bf16", "bf16", True),  # split-K: 12 splits
    ]:
        for c in invariant_configs(n, torch.bfloat16):
            cases.append((layer, n, k, dtype, out_dtype, bias, cfg(c, k)))
    c = invariant_configs(4096, torch.float32)[-1]  # the fp32 (FMA) path compiles too
    cases.append(("q_proj_fp32", 4096, 2880, "fp32", "fp32", True, cfg(c, 2880)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    code = _COMPILE_SCRIPT.replace("CASES", repr(cases))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [line.split("|")[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT|")]
    assert len(results) == len(cases)
    by_layer: dict[str, set[str]] = {}
    for layer, cfg, mma, shared in results:
        assert int(shared) <= 227 * 1024, (layer, cfg, shared)
        if layer.endswith("fp32"):
            assert mma == "", (layer, mma)  # IEEE fp32: FMA dots, no tensor cores
            continue
        assert "versionMajor = 3" in mma, (layer, cfg, mma)  # Hopper wgmma
        by_layer.setdefault(layer, set()).add(re.sub(r"warpsPerCTA = \[[0-9, ]*\], ", "", mma))
    for layer, shapes in by_layer.items():
        assert len(shapes) == 1, (layer, shapes)
    assert by_layer["lm_head"] == {"versionMajor = 3, versionMinor = 0, instrShape = [16, 128, 16]"}


def test_fused_qkv_gemm_fills_the_gpu_at_batch_1() -> None:
    """The fused q/k/v projection (N = 5120 at 120b) streams its weight with >= 132 CTAs at batch 1 (it compiles
    for sm_90 without spills: tests/test_static_report.py)."""
    from gptoss.kernels.launch_spec import ModelShape, Scenario

    specs = {spec.name: spec for spec in launch_specs(ModelShape(), Scenario("d", 1, 1024, True))}
    assert specs["dense.qkv_proj"].ctas >= 132
    assert specs["dense.qkv_proj"].constants["BLOCK_N"] == instr_n_for(5120)


# ------------------------------------------------------------------------------------------ benchmark


def test_bench_matmul_tiny_smoke(tmp_path) -> None:
    """The benchmark runs end to end at a tiny size (interpreter on CPU) and writes its table and JSON."""
    from gptoss.benchmarks import bench_matmul

    results = bench_matmul.main(["--tiny", "--out", str(tmp_path), "--rows", "1", "8"])
    assert (tmp_path / "bench_matmul.json").exists()
    triton_rows = [r for r in results["rows"] if r["impl"] == "triton"]
    assert {r["rows"] for r in triton_rows} == {1, 8} and len({r["layer"] for r in triton_rows}) >= 2
    assert all(r["ms"] > 0 and r["GB/s"] > 0 for r in results["rows"])
