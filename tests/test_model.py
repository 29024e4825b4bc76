"""The model's logits against transformers' GptOssForCausalLM, and paged-cache consistency across schedules."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from gptoss.benchmarks.launch_count import count_step
from gptoss.engine.model.config import ModelConfig
from gptoss.engine.model.forward_batch import ForwardBatch
from gptoss.engine.model.gpt_oss import GptOssModel
from gptoss.engine.model.loader import load_weights
from gptoss.engine.worker.kv_cache import allocate_kv_caches

BLOCK_SIZE = 8  # small, so short prompts cross several blocks
NUM_BLOCKS = 64
REL_TOL = 1e-4  # fp32 against fp32: only summation order differs


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> GptOssModel:
    config = ModelConfig.from_json(tiny_checkpoint)
    model = GptOssModel.create(config, torch.float32, "cpu")
    load_weights(model, tiny_checkpoint, progress=False)
    return model


class PagedRunner:
    """Drives the model over several sequences, each with its own shuffled block table in one pool."""

    def __init__(self, model: GptOssModel, seed: int = 0) -> None:
        self.model = model
        self.caches = allocate_kv_caches(
            model.config, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu", world_size=model.world_size
        )
        free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(free)
        self.free_blocks = free
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence its next tokens; returns each sequence's logits `[len(chunk), V]`."""
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        for seq, tokens in chunks.items():
            table = self.tables.setdefault(seq, [])
            begin = self.lengths.get(seq, 0)
            end = begin + len(tokens)
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free_blocks.pop())
            for pos in range(begin, end):
                slots.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            ids.extend(tokens)
            positions.extend(range(begin, end))
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(end)
            self.lengths[seq] = end
        width = max(len(self.tables[s]) for s in chunks)
        block_tables = torch.tensor(
            [self.tables[s] + [0] * (width - len(self.tables[s])) for s in chunks], dtype=torch.int32
        )
        batch = ForwardBatch.shared_pool(
            torch.tensor(starts, dtype=torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32),
            block_tables,
            torch.tensor(slots, dtype=torch.int64),
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), batch, self.caches)
        logits = self.model.compute_logits(hidden)
        return {seq: logits[starts[i] : starts[i + 1]] for i, seq in enumerate(chunks)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=generator).tolist()


@pytest.mark.parametrize("length", [5, 37, 61])
def test_logits_match_transformers(model: GptOssModel, tiny_checkpoint: Path, length: int) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        str(tiny_checkpoint),
        quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32,
    ).eval()
    prompt = random_prompt(model.config.vocab_size, length, seed=length)
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    ours = PagedRunner(model).step({0: prompt})[0]
    # Prompts longer than the 12-token window exercise the sliding layers.
    assert rel_err(ours, expected) < REL_TOL


def test_prefill_chunked_and_token_by_token_agree(model: GptOssModel) -> None:
    prompt = random_prompt(model.config.vocab_size, 45, seed=7)
    whole = PagedRunner(model, seed=1).step({0: prompt})[0]

    chunked_runner = PagedRunner(model, seed=2)
    chunked = torch.cat([chunked_runner.step({0: prompt[i : i + 13]})[0] for i in range(0, len(prompt), 13)])

    single_runner = PagedRunner(model, seed=3)
    single = torch.cat([single_runner.step({0: [token]})[0] for token in prompt])

    assert rel_err(chunked, whole) < REL_TOL
    assert rel_err(single, whole) < REL_TOL


def test_batch_of_different_lengths_equals_each_alone(model: GptOssModel) -> None:
    vocab = model.config.vocab_size
    prompts = {seq: random_prompt(vocab, length, seed=100 + seq) for seq, length in enumerate([3, 29, 17, 1])}
    alone = {seq: PagedRunner(model, seed=seq).step({seq: p})[seq] for seq, p in prompts.items()}
    batched_runner = PagedRunner(model, seed=99)
    batched = batched_runner.step(prompts)
    for seq in prompts:
        assert rel_err(batched[seq], alone[seq]) < REL_TOL

    # Then a mixed step: decode tokens for some sequences, a prefill chunk for another, in one batch.
    next_tokens = {0: [5], 1: [9], 2: random_prompt(vocab, 6, seed=5), 3: [11]}
    mixed = batched_runner.step(next_tokens)
    for seq, tokens in next_tokens.items():
        runner = PagedRunner(model, seed=50 + seq)
        expected = runner.step({seq: prompts[seq] + tokens})[seq][-len(tokens) :]
        assert rel_err(mixed[seq], expected) < REL_TOL


# --------------------------------------------------------------------- the Triton path (kernel_backend)

# On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1 without a GPU); with a
# GPU the Triton path is the default one, run by the GPU tests.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton path on CPU needs TRITON_INTERPRET=1"
)


@pytest.fixture(scope="module")
def triton_model(tiny_checkpoint: Path) -> GptOssModel:
    """The tiny model in fp32 on CPU with every op on its Triton kernel (the interpreter)."""
    config = ModelConfig.from_json(tiny_checkpoint)
    model = GptOssModel.create(config, torch.float32, "cpu")
    model.kernel_backend = "triton"  # before loading: the MoE weights are re-laid for the Triton kernel
    load_weights(model, tiny_checkpoint, progress=False)
    assert model.model.layers[0].mlp.experts.packed is not None
    return model


@needs_interpreter
def test_triton_path_logits_match_transformers(triton_model: GptOssModel, tiny_checkpoint: Path) -> None:
    """The whole forward through the Triton kernels (fused norms, fused q/k/v + RoPE + KV write, paged
    prefill and split decode attention, MXFP4 MoE, batch-invariant GEMMs): a 13-token prefill (past the
    12-token window, so the sliding layers drop keys) and one decode step, against transformers in fp32."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        str(tiny_checkpoint), quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    tokens = random_prompt(triton_model.config.vocab_size, 14, seed=14)
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    runner = PagedRunner(triton_model)
    prefill = runner.step({0: tokens[:13]})[0]
    decode = runner.step({0: tokens[13:]})[0]
    assert rel_err(prefill, expected[:13]) < REL_TOL
    assert rel_err(decode, expected[13:]) < REL_TOL


# Launch budget of one decode step on the Triton path, per layer (issue #15: at most 12): add+norm, q/k/v GEMM,
# RoPE + KV write, attention (split kernel with the combine folded in), o_proj, add+norm, router GEMM, MoE
# route + 2 matmuls + combine.
LAUNCHES_PER_LAYER = 11


def decode_step_launches(model: GptOssModel) -> dict[int, list[str]]:
    """Per layer, what one decode step of two sequences (after their prefill) launches."""
    vocab = model.config.vocab_size
    runner = PagedRunner(model)
    runner.step({0: random_prompt(vocab, 5, seed=1), 1: random_prompt(vocab, 3, seed=2)})
    per_layer = count_step(model, lambda: runner.step({0: [7], 1: [9]}))
    assert len(per_layer) == model.config.num_hidden_layers
    return per_layer


@needs_interpreter
def test_decode_step_launch_budget(model: GptOssModel, triton_model: GptOssModel) -> None:
    """One decode step on the Triton path launches at most 11 kernels per layer, counting Triton launches and
    non-view torch ops (benchmarks/launch_count.py): nothing runs between the kernels but views. The counter
    itself is checked on the torch path, whose unfused norms, RoPE and adds it must see."""
    for layer, launches in decode_step_launches(triton_model).items():
        assert len(launches) <= LAUNCHES_PER_LAYER, (layer, launches)
        assert not [name for name in launches if name.startswith("torch:")], (layer, launches)
        assert launches.count("triton:_add_rms_norm_kernel") == 2, launches
    torch_path = decode_step_launches(model)
    assert min(len(launches) for launches in torch_path.values()) > 3 * LAUNCHES_PER_LAYER
