"""Triton paged attention (kernels/attention.py) against the plain-torch reference (kernels/reference.py).

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1): that checks their indexing,
masks, block tables, window/sink/GQA logic and split bookkeeping, not GPU numerics. With CUDA (and
TRITON_INTERPRET unset) the same tests run compiled on the GPU with looser bf16 bounds.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

# Triton picks interpreter or compiler when @triton.jit decorates, i.e. when a module is imported, and the
# interpreter reads the variable again at launch (triton 3.9 asserts it while importing gluon): so set it for
# the whole session, and re-import kernels.attention if another test module imported it first without it.
_USE_INTERPRETER = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
if _USE_INTERPRETER:
    os.environ["TRITON_INTERPRET"] = "1"
import gptoss.kernels.attention as attention  # noqa: E402

if attention._is_interpreted(attention._prefill_kernel) != _USE_INTERPRETER:
    attention = importlib.reload(attention)

from gptoss.kernels.reference import (  # noqa: E402
    paged_attention_reference,
    rope_cos_sin,
    rope_write_kv_reference,
    write_kv_reference,
    yarn_inv_freq,
)

DEVICE = "cpu" if _USE_INTERPRETER else "cuda"
# ||out - ref|| / ||ref||. Interpreter: bf16 inputs are upcast exactly, only the bf16 output rounding remains.
# GPU: bf16 probabilities feed the PV dot as well.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2 if _USE_INTERPRETER else 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class Batch:
    """A random paged batch: shuffled block ids, -1 padding in block tables, context already in the cache and
    the new tokens' keys/values written with `write_kv_reference` through a slot mapping that has -1 (padding)
    entries."""

    def __init__(
        self,
        q_lens: list[int],
        ctx_lens: list[int],
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        seed: int,
        window: int | None = None,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.q_lens, self.window = q_lens, window
        self.seq_lens_list = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
        blocks_per_seq = [-(-n // block_size) for n in self.seq_lens_list]
        num_blocks = sum(blocks_per_seq) + 3
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        table = torch.full((len(q_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
        for s, n in enumerate(blocks_per_seq):
            table[s, :n] = torch.tensor(perm[:n], dtype=torch.int32)
            perm = perm[n:]

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(dtype)

        k_cache = randn(num_blocks, num_kv_heads, block_size, head_dim)
        v_cache = randn(num_blocks, num_kv_heads, block_size, head_dim)
        num_tokens = sum(q_lens)
        # Queries and new keys come from one fused projection output: strided (non-contiguous) views.
        qkv = randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim)
        self.query = qkv[:, :num_q_heads]
        new_k, new_v = qkv[:, num_q_heads : num_q_heads + num_kv_heads], qkv[:, num_q_heads + num_kv_heads :]
        slots = []
        for s, (c, q) in enumerate(zip(ctx_lens, q_lens, strict=True)):
            for pos in range(c, c + q):
                slots.append(int(table[s, pos // block_size]) * block_size + pos % block_size)
        # Padding tokens (slot -1) carry garbage that must not land anywhere.
        pad_k = torch.full((2, num_kv_heads, head_dim), float("nan")).to(dtype)
        key = torch.cat([new_k, pad_k])
        value = torch.cat([new_v, pad_k])
        slot_mapping = torch.tensor([*slots, -1, -1], dtype=torch.int64)
        write_kv_reference(key, value, k_cache, v_cache, slot_mapping)
        self.k_cache, self.v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
        self.key, self.value, self.slot_mapping = key.to(DEVICE), value.to(DEVICE), slot_mapping.to(DEVICE)
        if window is not None:
            self._free_blocks_before_window(table, block_size)
        self.block_tables = table.to(DEVICE)
        self.query = self.query.to(DEVICE)
        self.query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                                            device=DEVICE)  # fmt: skip
        self.seq_lens = torch.tensor(self.seq_lens_list, dtype=torch.int32, device=DEVICE)
        self.sinks = (2 * torch.randn(num_q_heads, generator=gen)).to(DEVICE)
        self.scale = head_dim**-0.5

    def _free_blocks_before_window(self, table: torch.Tensor, block_size: int) -> None:
        """What the engine may do on windowed layers: blocks wholly before every query's window are freed.
        Their table entries become -1 and the freed blocks hold NaN, so any read of them shows."""
        for s, (q_len, seq_len) in enumerate(zip(self.q_lens, self.seq_lens_list, strict=True)):
            first_needed = max(0, seq_len - q_len - self.window + 1)
            for b in range(first_needed // block_size):
                freed = int(table[s, b])
                table[s, b] = -1
                self.k_cache[freed] = float("nan")
                self.v_cache[freed] = float("nan")

    def args(self, sinks: torch.Tensor | None = None) -> tuple:
        sinks = self.sinks if sinks is None else sinks
        return (self.query, self.k_cache, self.v_cache, self.block_tables, self.query_start_loc, self.seq_lens,
                sinks, self.scale, self.window)  # fmt: skip

    def alone(self, s: int) -> tuple:
        """Arguments for sequence s by itself, with a block table cut to its own blocks."""
        begin, end = int(self.query_start_loc[s]), int(self.query_start_loc[s + 1])
        num_blocks = -(-self.seq_lens_list[s] // self.k_cache.shape[2])
        qsl = torch.tensor([0, end - begin], dtype=torch.int32, device=DEVICE)
        return (self.query[begin:end], self.k_cache, self.v_cache, self.block_tables[s : s + 1, :num_blocks],
                qsl, self.seq_lens[s : s + 1], self.sinks, self.scale, self.window)  # fmt: skip


# ------------------------------------------------------------------------------------ rope_write_kv


# (num_tokens, Hq, Hkv, head_dim, block_size): ragged token counts, a non-power-of-2 GQA group, gpt-oss's
# head_dim 64 with its GQA 8.
ROPE_CASES = [(1, 4, 2, 16, 8), (7, 6, 2, 16, 16), (13, 8, 1, 64, 16), (5, 64, 8, 64, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ROPE_CASES, ids=[str(c) for c in ROPE_CASES])
def test_rope_write_kv_matches_reference(dtype: torch.dtype, case: tuple[int, int, int, int, int]) -> None:
    """RoPE (YaRN tables as the model builds them) on a fused q/k/v projection, k/v scattered to shuffled
    slots with -1 padding. Bounds: fp32 within 1e-6 (the same ops, rounded per op); bf16 within three bf16
    roundings (unit roundoff 2^-9: two products and the sum, which the reference rounds one by one and the
    interpreter once; on GPU the kernel rounds per op like torch) of values up to 2 x 1.35 x max|x|. Cache
    slots nobody writes stay as they were."""
    num_tokens, num_q_heads, num_kv_heads, head_dim, block_size = case
    gen = torch.Generator().manual_seed(sum(case))
    inv_freq, factor = yarn_inv_freq(head_dim, 150000.0, 32.0, 4096, 32.0, 1.0, False)
    cos_table, sin_table = rope_cos_sin(torch.arange(8192), inv_freq, factor, torch.float32)
    num_blocks = num_tokens // block_size + 3
    k_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=gen).to(dtype)
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 8192, (num_tokens,), generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[num_tokens // 2] = -1
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_q = rope_write_kv_reference(qkv, positions, cos_table, sin_table, expected_k, expected_v, slots,
                                         num_q_heads)  # fmt: skip
    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    q = attention.rope_write_kv(qkv.to(DEVICE), positions.to(DEVICE), cos_table.to(DEVICE), sin_table.to(DEVICE),
                                k_cache, v_cache, slots.to(DEVICE), num_q_heads).cpu()  # fmt: skip
    assert q.shape == (num_tokens, num_q_heads, head_dim) and q.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 3 * 2.0**-9 * 2 * 1.35 * qkv.float().abs().max().item()
    torch.testing.assert_close(q.float(), expected_q.float(), atol=atol, rtol=0)
    torch.testing.assert_close(k_cache.cpu().float(), expected_k.float(), atol=atol, rtol=0)
    assert torch.equal(v_cache.cpu(), expected_v)  # values are copied, not computed
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    flat = k_cache.cpu().permute(0, 2, 1, 3).reshape(num_blocks * block_size, -1)
    assert torch.equal(flat[untouched], expected_k.permute(0, 2, 1, 3).reshape(num_blocks * block_size, -1)[untouched])


def test_rope_write_kv_rejects_bad_shapes() -> None:
    cache = torch.zeros(2, 2, 8, 16, device=DEVICE)
    table = torch.zeros(64, 8, device=DEVICE)
    ids = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="qkv"):
        attention.rope_write_kv(torch.zeros(3, 100, device=DEVICE), ids, table, table, cache, cache, ids, 4)
    with pytest.raises(ValueError, match="tables"):
        attention.rope_write_kv(torch.zeros(3, 128, device=DEVICE), ids, table[:, :4], table[:, :4], cache, cache,
                                ids, 4)  # fmt: skip


# ------------------------------------------------------------------------------------------ paged_attention

# (dtype, block_size, head_dim, Hq, Hkv, window, q_lens, ctx_lens)
CASES = {
    # Mixed prefill + decode; 1-token contexts; lengths crossing block boundaries.
    "mixed-full": (torch.float32, 16, 32, 8, 2, None, [5, 1, 20, 1, 1], [0, 37, 12, 0, 16]),
    "mixed-window-mha-bs8": (torch.float32, 8, 16, 4, 4, 8, [5, 1, 20, 1, 1], [0, 37, 12, 0, 16]),
    "bf16-window-gqa8-bs32": (torch.bfloat16, 32, 64, 8, 1, 16, [33, 1, 2], [40, 100, 0]),
    "window-larger-than-context": (torch.float32, 16, 64, 16, 2, 200, [7, 1], [50, 90]),
    "decode-bf16-group3": (torch.bfloat16, 16, 16, 6, 2, None, [1, 1, 1, 1], [0, 15, 16, 31]),
    "decode-window-edges": (torch.float32, 8, 32, 6, 3, 5, [1, 1, 1, 1], [0, 4, 5, 60]),
    "decode-long-splits": (torch.float32, 16, 16, 2, 1, None, [1, 1], [700, 300]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_reference(case: str) -> None:
    dtype, block_size, head_dim, hq, hkv, window, q_lens, ctx_lens = CASES[case]
    batch = Batch(q_lens, ctx_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim, block_size=block_size,
                  dtype=dtype, seed=len(case), window=window)  # fmt: skip
    ref = paged_attention_reference(*batch.args())
    out = attention.paged_attention(*batch.args())
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any()
    assert rel_err(out, ref) < REL_TOL[dtype]


def test_engine_hints_change_nothing() -> None:
    """The engine passes max_query_len / max_seq_len (host ints it knows): same bits as without them."""
    dtype, block_size, head_dim, hq, hkv, window, q_lens, ctx_lens = CASES["mixed-full"]
    batch = Batch(q_lens, ctx_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=head_dim, block_size=block_size,
                  dtype=dtype, seed=2, window=window)  # fmt: skip
    out = attention.paged_attention(*batch.args())
    hinted = attention.paged_attention(*batch.args(), max_query_len=max(q_lens), max_seq_len=max(batch.seq_lens_list))
    assert torch.equal(out, hinted)


def test_graph_sized_split_grid_gives_the_same_bits() -> None:
    """A decode launched with a far larger max_seq_len (what CUDA graphs pass: max_model_len) has many more
    split slots than programs, so each persistent program loops over several work items: same bits."""
    batch = Batch([1] * 5, [3, 70, 130, 15, 200], num_q_heads=6, num_kv_heads=2, head_dim=16, block_size=16,
                  dtype=torch.float32, seed=12)  # fmt: skip
    exact = attention.paged_attention(*batch.args(), max_query_len=1, max_seq_len=201)
    graph_sized = attention.paged_attention(*batch.args(), max_query_len=1, max_seq_len=131072)
    assert torch.equal(exact, graph_sized)
    assert rel_err(exact, paged_attention_reference(*batch.args())) < REL_TOL[torch.float32]


def test_folded_combine_rearms_its_counters() -> None:
    """The combine runs in the split kernel, by the item that takes a (sequence, KV head)'s last ticket: in a
    mixed batch (prefill sequences take no tickets) and in a decode batch, every counter is back at 0 after
    the launch, so a second launch (a CUDA-graph replay) gives the same bits, and those match the reference."""
    from gptoss.kernels.matmul import _COUNTERS

    for q_lens, ctx_lens in (([9, 1, 1, 3], [0, 150, 20, 50]), ([1, 1, 1], [70, 3, 130])):
        batch = Batch(q_lens, ctx_lens, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                      dtype=torch.float32, seed=13)  # fmt: skip
        first = attention.paged_attention(*batch.args())
        assert int(_COUNTERS[first.device].abs().sum()) == 0
        assert torch.equal(first, attention.paged_attention(*batch.args()))
        assert rel_err(first, paged_attention_reference(*batch.args())) < REL_TOL[torch.float32]


@pytest.mark.parametrize("window", [None, 6])
def test_not_batch_invariant_mode_matches_reference(window: int | None) -> None:
    batch = Batch([4, 1, 9, 1], [3, 20, 0, 40], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                  dtype=torch.float32, seed=3, window=window)  # fmt: skip
    out = attention.paged_attention(*batch.args(), batch_invariant=False)
    assert rel_err(out, paged_attention_reference(*batch.args())) < REL_TOL[torch.float32]


@pytest.mark.parametrize("sink", [30.0, -30.0])
def test_extreme_sinks(sink: float) -> None:
    batch = Batch([6, 1, 1], [10, 0, 25], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                  dtype=torch.float32, seed=5)  # fmt: skip
    sinks = torch.full_like(batch.sinks, sink)
    ref = paged_attention_reference(*batch.args(sinks))
    out = attention.paged_attention(*batch.args(sinks))
    assert rel_err(out, ref) < REL_TOL[torch.float32]
    if sink > 0:  # the sink takes almost all the probability mass
        assert out.abs().max() < 1e-9


def test_no_sinks_is_plain_softmax() -> None:
    batch = Batch([3, 1], [5, 17], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                  dtype=torch.float32, seed=6)  # fmt: skip
    args = list(batch.args())
    args[6] = None
    out = attention.paged_attention(*args)
    args[6] = torch.full_like(batch.sinks, -1e4)  # exp(-1e4) == 0 in fp32
    assert rel_err(out, paged_attention_reference(*args)) < REL_TOL[torch.float32]


def test_each_query_head_reads_its_kv_head() -> None:
    """GQA: with values constant per KV head (h + 1) and negligible sinks, query head j must return j // G + 1."""
    hq, hkv = 8, 4
    batch = Batch([5, 1], [3, 30], num_q_heads=hq, num_kv_heads=hkv, head_dim=16, block_size=8,
                  dtype=torch.float32, seed=7)  # fmt: skip
    for h in range(hkv):
        batch.v_cache[:, h] = h + 1.0
    sinks = torch.full_like(batch.sinks, -30.0)
    out = attention.paged_attention(*batch.args(sinks))
    expected = (torch.arange(hq, device=DEVICE) // (hq // hkv) + 1.0)[None, :, None].expand_as(out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert rel_err(out, paged_attention_reference(*batch.args(sinks))) < REL_TOL[torch.float32]


@pytest.mark.parametrize("window", [None, 12])
def test_batch_invariance(window: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sequence's output is bit-identical computed alone or in a mixed batch (prefill + decode)."""
    # Small splits so the 600-token decode is split (and capped) at interpreter-friendly sizes.
    monkeypatch.setattr(attention, "DECODE_MAX_SPLITS", 8)
    monkeypatch.setattr(attention, "DECODE_MIN_SPLIT_KEYS", 64)
    batch = Batch([9, 1, 1, 3], [0, 600, 20, 50], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                  dtype=torch.float32, seed=8, window=window)  # fmt: skip
    out = attention.paged_attention(*batch.args())
    for s in range(len(batch.q_lens)):
        begin, end = int(batch.query_start_loc[s]), int(batch.query_start_loc[s + 1])
        assert torch.equal(attention.paged_attention(*batch.alone(s)), out[begin:end]), f"sequence {s}"
    # A decode-only batch goes through the decode kernels alone: same bits for the decode sequences.
    decode = Batch([1, 1], [600, 20], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                   dtype=torch.float32, seed=8, window=window)  # fmt: skip
    out_decode = attention.paged_attention(*decode.args())
    assert torch.equal(out_decode[0], attention.paged_attention(*decode.alone(0))[0])


def test_decode_split_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split counts capped by DECODE_MAX_SPLITS (rounded per-split sizes) and lengths around split sizes."""
    monkeypatch.setattr(attention, "DECODE_MAX_SPLITS", 4)
    monkeypatch.setattr(attention, "DECODE_MIN_SPLIT_KEYS", 64)
    batch = Batch([1] * 6, [0, 63, 64, 128, 256, 300], num_q_heads=2, num_kv_heads=1, head_dim=16,
                  block_size=16, dtype=torch.float32, seed=9)  # fmt: skip
    ref = paged_attention_reference(*batch.args())
    for invariant in (True, False):
        out = attention.paged_attention(*batch.args(), batch_invariant=invariant, max_query_len=1)
        assert rel_err(out, ref) < REL_TOL[torch.float32]


# ------------------------------------------------------------------------------------- Hopper compilation


def test_decode_fills_the_gpu_at_1k() -> None:
    """At gpt-oss-120b's shapes a 1k context at batch 1 runs >= 128 split programs (132 SMs), the combine
    (folded into the split kernel) reduces over a fixed BLOCK_S, and a grid bounded by a long max_model_len
    (CUDA graphs) at batch 256 stays DECODE_PROGRAMS_PER_SM programs an SM, each looping over its work items.
    (The launches compile for sm_90 without spills: tests/test_static_report.py.)"""
    from gptoss.kernels.launch_spec import ModelShape, Scenario

    specs = {spec.name: spec for spec in attention.launch_specs(ModelShape(), Scenario("d", 1, 1024, True))}
    assert specs["attn.decode_split (+combine, full)"].ctas == 128
    assert specs["attn.decode_split (+combine, sliding)"].ctas == 8 * 2  # 128 keys: 2 splits of 64
    assert specs["attn.decode_split (+combine, full)"].constants["BLOCK_S"] == attention.DECODE_MAX_SPLITS
    assert not [name for name in specs if "combine" in name and "split" not in name]  # no second launch
    long = {spec.name: spec for spec in attention.launch_specs(ModelShape(), Scenario("d", 1, 32768, True))}
    assert long["attn.decode_split (+combine, full)"].ctas == 8 * attention.DECODE_MAX_SPLITS
    *_, grid_splits = attention._decode_plan(256, 8, 64, 131072, None, True, 132)
    assert grid_splits == attention.DECODE_MAX_SPLITS  # 256 x 8 x 64 work items over 4 x 132 programs


# --------------------------------------------------------------------------------------------- benchmark


def test_bench_attention_tiny_smoke(tmp_path) -> None:
    from gptoss.benchmarks import bench_attention

    results = bench_attention.main(["--tiny", "--batches", "2", "--contexts", "40", "--prefill", "16",
                                    "--out", str(tmp_path)])  # fmt: skip
    assert {r["impl"] for r in results["decode"]} == {"triton", "triton_fast", "torch_sdpa_nosink"}
    assert {r["layer"] for r in results["prefill"]} == {"full", "sliding"}
    assert all(r["ms"] > 0 for r in results["decode"] + results["prefill"])
    assert all(r["copies"] == 2 for r in results["decode"])  # the rotation over cache copies runs
    assert (tmp_path / "bench_attention.json").exists()
