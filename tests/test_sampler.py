"""Sampler: greedy, temperature, top-k/p, min-p, penalties, seeded batch invariance, logprobs, sampling."""

from __future__ import annotations

import math

import gptoss.engine.worker.sampler as sampler_module
import pytest
import torch
from gptoss.engine.sampling_params import SamplingParams
from gptoss.engine.worker.sampler import (
    Sampler,
    SamplingBatch,
    compute_prompt_logprobs,
    greedy_token_ids,
    seeded_uniform,
)

VOCAB = 512


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    outputs: list[list[int]] | None = None,
    prompts: list[list[int]] | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> sampler_module.SamplerOutput:
    outputs = outputs if outputs is not None else [[] for _ in params]
    batch = SamplingBatch.build(params, outputs, logits.shape[1], logits.device, prompt_token_ids=prompts)
    return Sampler(generator)(logits, batch, allowed_token_mask=mask)


def random_logits(rows: int, vocab: int = VOCAB, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=generator) * scale


def test_greedy_is_argmax() -> None:
    logits = random_logits(16)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 16)
    assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_greedy_ties_go_to_lowest_id() -> None:
    logits = torch.zeros(2, 10)
    logits[0, [3, 7]] = 5.0
    logits[1, [9, 1, 4]] = 2.0
    out = sample(logits, [SamplingParams(temperature=0.0)] * 2)
    assert out.sampled_token_ids.tolist() == [3, 1]


def test_greedy_token_ids_are_argmax_on_ties_and_nan() -> None:
    """`max(dim).indices` stands in for `argmax`: the same ids on ties spread over vector lanes and on NaN rows."""
    generator = torch.Generator().manual_seed(0)
    for vocab in (7, 33, 729, 4099):
        ties = torch.randint(0, 3, (8, vocab), generator=generator).float()
        assert torch.equal(greedy_token_ids(ties), ties.argmax(dim=-1))
        with_nan = torch.randn(4, vocab, generator=generator)
        with_nan[torch.arange(4), torch.randint(0, vocab, (4,), generator=generator)] = float("nan")
        assert torch.equal(greedy_token_ids(with_nan), with_nan.argmax(dim=-1))


def test_greedy_rows_in_mixed_batch() -> None:
    logits = random_logits(6)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_k=10) for i in range(6)]
    out = sample(logits, params)
    assert torch.equal(out.sampled_token_ids[::2], logits[::2].argmax(dim=-1))


def distinct_max_logits(rows: int) -> torch.Tensor:
    """Random logits whose largest value beats the second by at least 0.05."""
    logits = random_logits(rows)
    top2 = logits.topk(2, dim=-1)
    logits[torch.arange(rows), top2.indices[:, 0]] = top2.values[:, 1] + 0.05
    return logits


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-3),  # the T -> 0 limit (not the greedy shortcut: 1e-3 > 1e-5)
        SamplingParams(top_k=1),
        SamplingParams(top_k=1, temperature=5.0),
        SamplingParams(top_p=0.001),
        SamplingParams(top_p=0.001, seed=3),
        SamplingParams(min_p=1.0),
    ],
    ids=["temperature-1e-3", "top_k-1", "top_k-1-hot", "top_p-0.001", "top_p-0.001-seeded", "min_p-1"],
)
def test_limits_equal_greedy(params: SamplingParams) -> None:
    logits = distinct_max_logits(32)
    for _ in range(3):
        out = sample(logits, [params] * 32)
        assert torch.equal(out.sampled_token_ids, logits.argmax(dim=-1))


def test_penalties_change_exactly_the_expected_logits() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0, 4.0]])
    prompt = [[0, 1]]
    output = [[2, 2, 3]]
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    batch = SamplingBatch.build([params], output, 7, "cpu", prompt_token_ids=prompt)
    processed = Sampler.process_logits(logits, batch)
    expected = torch.tensor(
        [
            [
                2.0 / 2,  # prompt token, positive: divided
                -1.0 * 2,  # prompt token, negative: multiplied
                0.5 / 2 - 0.5 * 2 - 0.25,  # output twice: repetition, then frequency * 2 and presence
                -3.0 * 2 - 0.5 * 1 - 0.25,  # output once
                1.0,  # unseen
                0.0,
                4.0,
            ]
        ]
    )
    torch.testing.assert_close(processed, expected)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0, 4.0]])), "input modified"


def test_penalties_per_row_and_greedy() -> None:
    logits = torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.9, 0.0]])
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5), SamplingParams(temperature=0.0)]
    batch = SamplingBatch.build(params, [[0], [0]], 3, "cpu")
    processed = Sampler.process_logits(logits, batch)
    torch.testing.assert_close(processed, torch.tensor([[0.5, 0.9, 0.0], [1.0, 0.9, 0.0]]))
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [1, 0]


def test_repetition_penalty_zero_is_finite() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.0, 1.0]])
    batch = SamplingBatch.build([SamplingParams(repetition_penalty=0.0)], [[0, 1, 2]], 4, "cpu", [[3]])
    processed = Sampler.process_logits(logits, batch)
    assert not processed.isnan().any()
    assert processed[0, 0] > 1e5 and processed[0, 2] == 0.0


def test_repetition_penalty_needs_prompt() -> None:
    with pytest.raises(ValueError, match="prompt_token_ids"):
        SamplingBatch.build([SamplingParams(repetition_penalty=1.5)], [[]], 4, "cpu")


def test_seeded_rows_are_batch_invariant() -> None:
    logits = random_logits(6, scale=1.0, seed=1)
    seeded = [SamplingParams(seed=s, top_k=k, top_p=p) for s, k, p in [(1, -1, 1.0), (2, 50, 1.0), (3, -1, 0.9)]]
    outputs = [[5] * 4, [], [1, 2]]
    # Each seeded row alone.
    alone = [sample(logits[i : i + 1], [seeded[i]], [outputs[i]]).sampled_token_ids.item() for i in range(3)]
    # Batched with unseeded/greedy rows, in different orders and positions.
    fillers = [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_p=0.5, min_p=0.1)]
    for order in ([0, 1, 2, 3, 4, 5], [5, 2, 4, 0, 3, 1], [3, 4, 5, 2, 1, 0]):
        rows = [(logits[i], seeded[i], outputs[i]) if i < 3 else (logits[i], fillers[i - 3], [7]) for i in order]
        batch_logits = torch.stack([r[0] for r in rows])
        out = sample(batch_logits, [r[1] for r in rows], [r[2] for r in rows]).sampled_token_ids
        for position, i in enumerate(order):
            if i < 3:
                assert out[position].item() == alone[i], (order, i)
    # Independent of the global generator's state.
    torch.manual_seed(1234)
    again = sample(logits[:1], [seeded[0]], [outputs[0]]).sampled_token_ids.item()
    assert again == alone[0]


def test_seeds_and_steps_differ() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: every draw is pure noise

    def run(seed: int) -> list[int]:
        tokens: list[int] = []
        for _ in range(12):
            tokens.append(sample(logits, [SamplingParams(seed=seed)], [list(tokens)]).sampled_token_ids.item())
        return tokens

    first = run(1)
    assert first == run(1)
    assert first != run(2)
    assert len(set(first)) > 6, "the step index must change the noise"


def test_seeded_uniform_is_uniform_and_keyed() -> None:
    by_step = torch.tensor([seeded_uniform(7, step) for step in range(20_000)], dtype=torch.float64)
    by_seed = torch.tensor([seeded_uniform(seed, 0) for seed in range(1, 20_001)], dtype=torch.float64)
    for u in (by_step, by_seed):
        assert u.min().item() > 0.0 and u.max().item() <= 1.0
        assert abs(u.mean().item() - 0.5) < 0.01
        assert abs(u.std().item() - math.sqrt(1 / 12)) < 0.01
        centred = u - 0.5
        assert abs((centred[1:] * centred[:-1]).mean().item()) < 0.003  # neighbours uncorrelated
    assert seeded_uniform(7, 3) == seeded_uniform(7, 3) != seeded_uniform(8, 3)


def test_zero_probability_tokens_never_sampled() -> None:
    logits = torch.full((4000, 8), float("-inf"))
    logits[:, [1, 6]] = 0.0
    logits[:, 7] = -30.0  # tiny but non-zero
    out = sample(logits, [SamplingParams()] * 4000, generator=torch.Generator().manual_seed(1))
    assert torch.isin(out.sampled_token_ids, torch.tensor([1, 6, 7])).all()
    counts = torch.bincount(out.sampled_token_ids, minlength=8)
    assert abs(counts[1].item() - 2000) < 200 and abs(counts[6].item() - 2000) < 200


PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize(
    "params,expected",
    [
        (SamplingParams(), PROBS),
        (SamplingParams(temperature=2.0), PROBS.sqrt() / PROBS.sqrt().sum()),
        (SamplingParams(top_k=2), torch.tensor([0.0, 0.0, 3 / 7, 4 / 7])),
        (SamplingParams(top_p=0.65), torch.tensor([0.0, 0.0, 3 / 7, 4 / 7])),
        (SamplingParams(min_p=0.5), torch.tensor([0.0, 2 / 9, 3 / 9, 4 / 9])),
        (SamplingParams(top_k=3, top_p=0.7), torch.tensor([0.0, 0.0, 3 / 7, 4 / 7])),  # top_p on the top-3
    ],
    ids=["plain", "temperature-2", "top_k-2", "top_p-0.65", "min_p-0.5", "top_k-top_p"],
)
def test_distribution(params: SamplingParams, expected: torch.Tensor, seeded: bool) -> None:
    draws = 2000
    logits = PROBS.log().expand(draws, 4).contiguous()
    if seeded:  # one row per seed: exercises the seeded uniforms
        params_list = [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(1, draws + 1)]
    else:
        params_list = [params] * draws
    out = sample(logits, params_list, generator=torch.Generator().manual_seed(0))
    freqs = torch.bincount(out.sampled_token_ids, minlength=4).float() / draws
    # 4 standard deviations of a frequency estimated from 2000 draws (at most ~0.045).
    tolerance = 4 * (expected * (1 - expected) / draws).sqrt() + 1e-6
    assert ((freqs - expected).abs() <= tolerance).all(), (freqs, expected)


def test_seeded_distribution_over_steps() -> None:
    """One seed, many steps: the per-step noise must also be uniform."""
    steps = 2000
    logits = PROBS.log().expand(steps, 4).contiguous()
    params = [SamplingParams(seed=42)] * steps
    out = sample(logits, params, outputs=[[0] * n for n in range(steps)])
    freqs = torch.bincount(out.sampled_token_ids, minlength=4).float() / steps
    assert ((freqs - PROBS).abs() < 4 * (PROBS * (1 - PROBS) / steps).sqrt()).all(), freqs


def test_logprobs_are_raw_log_softmax() -> None:
    logits = random_logits(5)
    params = [
        SamplingParams(logprobs=5, temperature=0.3, top_k=3),
        SamplingParams(logprobs=0, repetition_penalty=1.5, frequency_penalty=1.0),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(),
        SamplingParams(logprobs=20, seed=9),
    ]
    out = sample(logits, params, outputs=[[1, 2]] * 5, prompts=[[3]] * 5)
    expected = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(5)
    torch.testing.assert_close(out.sampled_logprobs, expected[rows, out.sampled_token_ids])
    assert out.top_logprob_ids is not None and out.top_logprobs is not None
    assert out.top_logprob_ids.shape == (5, 20)
    top = expected.topk(20, dim=-1)
    assert torch.equal(out.top_logprob_ids, top.indices)
    torch.testing.assert_close(out.top_logprobs, top.values)


def test_no_top_logprobs_when_not_requested() -> None:
    out = sample(random_logits(2), [SamplingParams(), SamplingParams(logprobs=0)])
    assert out.top_logprob_ids is None and out.top_logprobs is None


def test_allowed_token_mask() -> None:
    logits = random_logits(64)
    mask = torch.zeros(64, VOCAB, dtype=torch.bool)
    allowed = torch.tensor([3, 17, 200])
    mask[:, allowed] = True
    params = [SamplingParams(temperature=0.0, logprobs=0)] * 8 + [
        SamplingParams(temperature=2.0, top_p=0.9, logprobs=0)
    ] * 56
    out = sample(logits, params, mask=mask)
    assert torch.isin(out.sampled_token_ids, allowed).all()
    assert torch.equal(out.sampled_token_ids[:8], allowed[logits[:8, allowed].argmax(dim=-1)])
    # Logprobs stay those of the unmasked model distribution.
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.sampled_logprobs, expected[torch.arange(64), out.sampled_token_ids])


def test_no_sort_without_top_k_top_p(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("top-k/top-p path must not run")

    monkeypatch.setattr(sampler_module, "apply_top_k_top_p", forbidden)
    params = [SamplingParams(), SamplingParams(min_p=0.1, seed=1), SamplingParams(temperature=0.0, top_k=5)]
    sample(random_logits(3), params)


def test_top_k_alone_uses_topk_not_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("full sort must not run for top_k only")

    monkeypatch.setattr(torch.Tensor, "sort", forbidden)
    out = sample(random_logits(4), [SamplingParams(top_k=1)] * 4)
    assert out.sampled_token_ids.shape == (4,)


def test_filtering_subset_matches_rows_alone() -> None:
    """Rows filtered through the subset path equal the same rows processed alone."""
    logits = random_logits(5)
    params = [
        SamplingParams(top_k=7),
        SamplingParams(),
        SamplingParams(top_p=0.8),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=20, top_p=0.5, min_p=0.05),
    ]
    batch = SamplingBatch.build(params, [[]] * 5, VOCAB, "cpu")
    processed = Sampler.process_logits(logits, batch)
    for i in (0, 1, 2, 4):
        alone = Sampler.process_logits(logits[i : i + 1], SamplingBatch.build([params[i]], [[]], VOCAB, "cpu"))
        torch.testing.assert_close(processed[i : i + 1], alone)
    assert torch.isfinite(processed[0]).sum() == 7
    assert torch.isfinite(processed[1]).all()


def test_compute_prompt_logprobs() -> None:
    logits = random_logits(11)
    targets = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(3))
    result = compute_prompt_logprobs(logits, targets, num_top_logprobs=4, chunk_size=3)
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(result.token_logprobs, expected[torch.arange(11), targets])
    assert result.top_logprob_ids is not None and result.top_logprobs is not None
    top = expected.topk(4, dim=-1)
    assert torch.equal(result.top_logprob_ids, top.indices)
    torch.testing.assert_close(result.top_logprobs, top.values)
    plain = compute_prompt_logprobs(logits.to(torch.bfloat16), targets)
    assert plain.top_logprob_ids is None and plain.token_logprobs.dtype == torch.float32
    with pytest.raises(ValueError):
        compute_prompt_logprobs(logits, targets[:5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    logits = random_logits(8, vocab=4096)
    params = [SamplingParams(seed=s, top_k=(s % 3) * 20, top_p=0.9 if s % 2 else 1.0) for s in range(1, 9)]
    cpu = sample(logits, params).sampled_token_ids
    cuda = sample(logits.cuda(), params).sampled_token_ids.cpu()
    assert torch.equal(cpu, cuda)


def test_sampling_reads_nothing_back_from_the_device(monkeypatch) -> None:
    """The sampler runs in the decode step: a device-to-host read (`.item()`, `int(t)`, `.tolist()`) would
    stall the host on the forward; only the model runner's one batched read at the end may wait."""
    params = [
        SamplingParams(temperature=0.7, top_k=5, seed=1),  # top_k without top_p: the `torch.topk` path
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=3, top_p=0.9, min_p=0.1),
    ]
    logits = random_logits(3)
    batch = SamplingBatch.build(params[:1], [[]], VOCAB, "cpu")
    expected = sample(logits, params)

    def refuse(*args, **kwargs):
        raise AssertionError("the sampler read a tensor back to the host")

    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = Sampler()(logits[:1], batch)
    got = sample(logits, params)
    monkeypatch.undo()
    assert out.sampled_token_ids.shape == (1,)
    assert torch.equal(got.sampled_token_ids, expected.sampled_token_ids)


def test_no_vocabulary_reduction_without_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """No row asks for logprobs: no logsumexp over the vocabulary, and no logprob comes back."""
    calls = []
    real = torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = sample(random_logits(4), [SamplingParams(temperature=0.0), SamplingParams(seed=3)] * 2)
    assert out.sampled_logprobs is None and out.top_logprob_ids is None and not calls
    out = sample(random_logits(4), [SamplingParams(temperature=0.0), SamplingParams(logprobs=0)] * 2)
    assert out.sampled_logprobs is not None and calls
