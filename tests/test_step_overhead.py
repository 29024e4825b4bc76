"""Host-overhead work of the engine step: the incremental host block tables, the sampler's batch building,
the one-copy result transfer, the detokenizer's out-of-vocabulary ids and the step-overhead benchmark."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gptoss.engine.core.block_manager import BlockManager
from gptoss.engine.core.sequence import Sequence
from gptoss.engine.detokenizer import IncrementalDetokenizer
from gptoss.engine.model.config import FULL, SLIDING
from gptoss.engine.sampling_params import SamplingParams
from gptoss.engine.tokenizer import build_tiny_tokenizer
from gptoss.engine.worker.model_runner import HostBlockTables, _to_host_lists
from gptoss.engine.worker.sampler import SamplingBatch, _token_counts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BS = 4


def rebuilt_tables(seqs: list[Sequence], groups: list[str]) -> dict[str, np.ndarray]:
    """What `prepare_inputs` built before the incremental tables: zero-padded rows from the Python lists."""
    width = max(len(seq.block_tables[g]) for seq in seqs for g in groups)
    out = {}
    for g in groups:
        rows = np.zeros((len(seqs), width), dtype=np.int32)
        for i, seq in enumerate(seqs):
            rows[i, : len(seq.block_tables[g])] = seq.block_tables[g]
        out[g] = rows
    return out


ops = st.lists(
    st.tuples(st.sampled_from(["add", "step", "step", "step", "copy", "preempt", "finish"]), st.integers(0, 10**6)),
    min_size=1,
    max_size=80,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, window=st.sampled_from([None, 3, 6, 9]), num_blocks=st.integers(8, 40))
def test_incremental_block_tables_equal_rebuilt_ones(ops, window, num_blocks):
    windows = {FULL: None} if window is None else {FULL: None, SLIDING: window}
    groups = list(windows)
    bm = BlockManager(dict.fromkeys(windows, num_blocks), BS, windows)
    # Starts with one row of width 1, so that growing in both directions is exercised.
    tables = HostBlockTables(groups, num_rows=1, width=1)
    live: list[Sequence] = []
    prefixes = [[7] * 8, list(range(12)), [3, 1, 4, 1, 5, 9, 2, 6]]
    for op, r in ops:
        if op == "add":
            seq = Sequence(f"r{r}", prefixes[r % 3][: 4 + r % 9] + [r % 11 + 20] * (r % 7), None)
            live.append(seq)
        elif op == "step" and live:
            seq = live[r % len(live)]
            if seq.num_computed_tokens >= seq.num_tokens:
                seq.token_ids.append(r % 13)  # a sampled token
            n = min(1 + r % 6, seq.num_tokens - seq.num_computed_tokens)
            if bm.allocate(seq, n):  # a fresh (preempted, copied) sequence may jump forward on a prefix hit
                n = min(n, seq.num_tokens - seq.num_computed_tokens)
                if n > 0:
                    bm.mark_computed(seq, n)
        elif op == "copy" and live:  # same tokens as a live sequence: its first step takes prefix hits
            live.append(Sequence(f"c{r}", list(live[r % len(live)].token_ids), None))
        elif op == "preempt" and live:
            bm.free(live[r % len(live)])  # its next step starts afresh (often from prefix hits)
        elif op == "finish" and live:
            seq = live.pop(r % len(live))
            bm.free(seq)
            tables.release(seq.seq_id)
        # A step gathers some of the sequences that hold blocks, in any order.
        ready = [seq for seq in live if all(seq.block_tables.get(g) for g in groups)]
        if ready:
            step = ready[r % len(ready) :] + ready[: r % len(ready)]
            step = step[: 1 + r % len(step)]
            got = tables.gather(step)
            want = rebuilt_tables(step, groups)
            for g in groups:
                assert got[g].dtype == torch.int32
                np.testing.assert_array_equal(got[g].numpy(), want[g])
    for seq in live:
        tables.release(seq.seq_id)
    assert not tables.row_of


def test_gathered_tables_do_not_change_with_later_syncs():
    bm = BlockManager(16, BS)
    seq = Sequence("a", [1, 2, 3], None)
    tables = HostBlockTables([FULL])
    assert bm.allocate(seq, 3)
    first = tables.gather([seq])[FULL].clone()
    bm.mark_computed(seq, 3)
    seq.token_ids += [4, 5]
    assert bm.allocate(seq, 2)
    assert tables.gather([seq])[FULL].shape == (1, 2)
    assert torch.equal(first, torch.tensor([seq.block_tables[FULL][:1]], dtype=torch.int32))


def test_released_rows_are_reused():
    bm = BlockManager(16, BS)
    tables = HostBlockTables([FULL], num_rows=2)
    a, b = Sequence("a", list(range(9)), None), Sequence("b", [1], None)
    assert bm.allocate(a, 9) and bm.allocate(b, 1)
    tables.gather([a, b])
    row_a = tables.row_of[a.seq_id]
    bm.free(a)
    tables.release(a.seq_id)
    c = Sequence("c", [5], None)
    assert bm.allocate(c, 1)
    got = tables.gather([c, b])[FULL]
    assert tables.row_of[c.seq_id] == row_a
    np.testing.assert_array_equal(got.numpy(), rebuilt_tables([c, b], [FULL])[FULL])


# ---- sampler batch ---------------------------------------------------------------------------------


def test_all_greedy_batches_build_no_tensors():
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_k=5, top_p=0.5, seed=3)]
    batch = SamplingBatch.build(params, [[1, 2], []], 50, "cpu")
    assert batch.all_greedy
    assert batch.temperature is None and batch.greedy is None and batch.filter_rows is None
    assert batch.seeded_rows is None and batch.min_p is None and batch.output_token_counts is None
    assert not batch.want_logprobs and batch.max_num_logprobs == 0 and batch.any_greedy
    # Logprobs (or a penalty) on one greedy row: the batch says so, still without per-row tensors.
    params[1] = SamplingParams(temperature=0.0, logprobs=2)
    batch = SamplingBatch.build(params, [[1, 2], []], 50, "cpu")
    assert batch.all_greedy and batch.want_logprobs and batch.max_num_logprobs == 2 and batch.temperature is None


def test_penalty_tensors_match_the_lists():
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-0.25),
        SamplingParams(frequency_penalty=1.0),
    ]
    outputs = [[1, 1, 2], [3, 3, 3, 9], [9, 0]]
    prompts = [[4], [5, 5, 6], [7]]
    batch = SamplingBatch.build(params, outputs, 10, "cpu", prompt_token_ids=prompts)
    counts = torch.zeros(3, 10)
    for row in (1, 2):  # rows without penalties are not counted
        for token in outputs[row]:
            counts[row, token] += 1
    assert torch.equal(batch.output_token_counts, counts)
    seen = counts > 0
    seen[1, [5, 6]] = True
    assert torch.equal(batch.seen_token_mask[1], seen[1])
    assert torch.equal(batch.frequency_penalty, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(batch.presence_penalty, torch.tensor([0.0, -0.25, 0.0]))
    assert batch.repetition_penalty.tolist() == pytest.approx([1.0, 1.3, 1.0])
    assert torch.equal(batch.temperature, torch.tensor([1.0, 1.0, 1.0]))


def test_prompts_as_arrays_give_the_same_seen_mask():
    params = [SamplingParams(repetition_penalty=1.2), SamplingParams(), SamplingParams(repetition_penalty=0.5)]
    outputs, prompts = [[8], [1], []], [[2, 3, 2], [4], [9, 0]]
    from_lists = SamplingBatch.build(params, outputs, 10, "cpu", prompt_token_ids=prompts)
    arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
    from_arrays = SamplingBatch.build(params, outputs, 10, "cpu", prompt_token_ids=arrays)
    want = torch.zeros(3, 10, dtype=torch.bool)
    want[0, [2, 3, 8]] = True
    want[2, [9, 0]] = True
    assert torch.equal(from_lists.seen_token_mask, want) and torch.equal(from_arrays.seen_token_mask, want)
    seq = Sequence("a", [5, 6, 5], None)
    assert seq.prompt_token_array.tolist() == [5, 6, 5] and seq.prompt_token_array.dtype == np.int64


def test_token_counts_of_empty_and_ragged_rows():
    got = _token_counts([[], [2, 2, 0], [], [4]], 5, torch.device("cpu"))
    want = torch.tensor([[0, 0, 0, 0, 0], [1, 0, 2, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float32)
    assert torch.equal(got, want)
    assert _token_counts([(), ()], 3, torch.device("cpu")).shape == (2, 3)


def test_host_lists_in_one_go():
    ids, values, missing = _to_host_lists(torch.tensor([3, 201087]), torch.tensor([-0.5, -1.25]), None)
    assert ids == [3, 201087] and values == [-0.5, -1.25] and missing is None


# ---- detokenizer -----------------------------------------------------------------------------------


def test_ids_beyond_the_tokenizer_decode_to_nothing():
    tokenizer = build_tiny_tokenizer()
    hello = tokenizer.encode("hello", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer)
    text = detok.add_tokens([hello[0], 201_000]) + detok.add_tokens([200_999]) + detok.add_tokens(hello[1:])
    assert text + detok.flush() == "hello"


# ---- the benchmark ---------------------------------------------------------------------------------


def test_benchmark_runs(tmp_path, capsys):
    from gptoss.benchmarks.bench_step_overhead import main

    previous = torch.get_num_threads()
    try:
        main(["--batch-sizes", "1,3", "--prompt-len", "40", "--steps", "3", "--vocab-size", "1000",
              "--tokenizer", "", "--sampling", "penalties", "--json", str(tmp_path / "out.json")])  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    out = capsys.readouterr().out
    assert "prepare_inputs" in out and "B=3" in out
    assert (tmp_path / "out.json").is_file()
