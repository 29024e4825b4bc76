"""Offline API on the tiny checkpoint: acceptance run, prefix reuse, scoring, stops, aborts, step errors."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from gptoss.engine.errors import InvalidRequestError, PromptTooLongError
from gptoss.engine.llm import LLM
from gptoss.engine.sampling_params import SamplingParams, SamplingParamsError
from gptoss.engine.structured_output.spec import StructuredOutputError, StructuredOutputSpec, canonical_json


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return LLM(tiny_checkpoint, num_blocks=96, max_num_seqs=32, max_num_batched_tokens=96)


def assert_pool_full(llm: LLM) -> None:
    bm = llm.engine.block_manager
    for pool in bm.pools.values():
        assert pool.num_free_blocks == pool.num_blocks
        assert all(count == 0 for count in pool.ref_counts)
    assert not llm.engine.has_unfinished_requests()


def test_32_concurrent_mixed_lengths_complete_without_leaks(llm):
    rng = random.Random(0)
    prompts: list = [[rng.randrange(700) for _ in range(rng.randrange(1, 70))] for _ in range(28)]
    prompts += ["Hello, world!", "The quick brown fox", "def main():", "Paris is the capital of France."]
    params = [SamplingParams(max_tokens=rng.randrange(1, 10), temperature=rng.choice([0.0, 0.8])) for _ in prompts]
    outs = llm.generate(prompts, params)
    assert len(outs) == 32
    for out, p in zip(outs, params, strict=True):
        assert out.finished and out.finish_reason in ("stop", "length")
        assert 1 <= len(out.token_ids) <= p.max_tokens
        assert out.finish_reason == "stop" or len(out.token_ids) == p.max_tokens
    assert outs[28].prompt_token_ids == llm.tokenizer.encode("Hello, world!", add_special_tokens=False).ids
    assert_pool_full(llm)


def capture_logits(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Record every `[N, V]` logits tensor the model computes from now on."""
    seen: list[torch.Tensor] = []
    real = llm.engine.runner.model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        logits = real(hidden)
        seen.append(logits.clone())
        return logits

    monkeypatch.setattr(llm.engine.runner.model, "compute_logits", recording)
    return seen


def test_prefix_reuse_gives_the_cold_logits(llm, tiny_checkpoint, monkeypatch):
    rng = random.Random(1)
    prompt = [rng.randrange(700) for _ in range(53)]  # 3 full blocks of 16, then 5 tokens
    params = SamplingParams(max_tokens=4, temperature=0.0)
    cold_llm = LLM(tiny_checkpoint, num_blocks=32, enable_prefix_caching=False)
    cold_logits = capture_logits(cold_llm, monkeypatch)
    warm_logits = capture_logits(llm, monkeypatch)
    cold = cold_llm.generate([prompt], params)[0]
    first = llm.generate([prompt], params)[0]
    del warm_logits[:]
    warm = llm.generate([prompt], params)[0]
    # the window (12 tokens) reaches back from position 48 into block 2 only: the sliding group held it too
    assert warm.num_cached_tokens == 48 and cold.num_cached_tokens == 0 and first.num_cached_tokens == 0
    assert cold.token_ids == first.token_ids == warm.token_ids
    assert len(cold_logits) == len(warm_logits) == 4  # one [1, V] row per generated token
    for a, b in zip(cold_logits, warm_logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # a longer prompt sharing the prefix hits too
    assert llm.generate([[*prompt, 5, 6]], params)[0].num_cached_tokens == 48
    assert llm.engine.metrics_snapshot().prefix_hit_tokens_total >= 96
    assert_pool_full(llm)


def test_score_matches_sampled_logprobs(llm):
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    gen = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, logprobs=0))[0]
    full = prompt + gen.token_ids
    # chunked (budget 4 tokens per step) and whole scoring agree; greedy tokens' logprobs match sampling's
    small = LLM(llm.engine.args.model, num_blocks=16, max_num_seqs=4, max_num_batched_tokens=4)
    for scorer in (llm, small):
        scored = scorer.score([full], num_top_logprobs=2)[0]
        assert scored.token_ids == [] and scored.finish_reason == "length"
        assert len(scored.prompt_logprobs) == len(full) and scored.prompt_logprobs[0] is None
        for i, lp in enumerate(gen.logprobs):
            entry = scored.prompt_logprobs[len(prompt) + i]
            assert entry.token_id == gen.token_ids[i]
            assert entry.logprob == pytest.approx(lp.logprob, abs=1e-4)
            assert next(iter(entry.top_logprobs)) == gen.token_ids[i]  # greedy: it is the top token
    assert_pool_full(llm)


def test_finish_reasons_and_stops(llm):
    prompt = [10, 20, 30, 40]
    free = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert free.finish_reason == "length" and free.stop_reason is None
    stop_token = free.token_ids[3]
    first_index = free.token_ids.index(stop_token)
    stopped = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_token]))[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_token
    assert stopped.token_ids == free.token_ids[: first_index + 1]
    text = free.text
    if len(text) >= 4:
        stop_str = text[2:4]
        cut = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_str]))[0]
        assert cut.finish_reason == "stop" and cut.stop_reason == stop_str
        assert cut.text == text[: text.index(stop_str)]
    assert_pool_full(llm)


def test_finished_only_steps_give_the_same_final_outputs(llm):
    """`step(finished_only=True)` (what `generate` drives) returns nothing for running requests and each
    finished request's output exactly as `step()` returns it: deltas, logprobs, stop strings included."""
    engine = llm.engine
    prompt = [10, 20, 30, 40]
    text = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0].text
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, stop=[text[3:5]] if len(text) >= 5 else []),
        SamplingParams(max_tokens=9, temperature=0.9, seed=3, logprobs=2),
        SamplingParams(max_tokens=5, temperature=0.0, logprobs=0, repetition_penalty=1.3),
    ]

    def final_outputs(finished_only: bool) -> dict[int, object]:
        for i, p in enumerate(params):
            engine.add_request(f"{finished_only}-{i}", [*prompt[i:], 50 + i], p)
        finals = {}
        while engine.has_unfinished_requests():
            for out in engine.step(finished_only=finished_only):
                assert out.finished or not finished_only
                if out.finished:
                    finals[int(out.request_id.split("-")[1])] = dataclasses.replace(out, request_id="")
        return finals

    streamed, finished_only = final_outputs(False), final_outputs(True)
    assert streamed == finished_only and len(streamed) == len(params)
    assert len(text) < 5 or streamed[0].finish_reason == "stop"
    assert_pool_full(llm)


def test_refusals(llm):
    with pytest.raises(PromptTooLongError):
        llm.generate([[1] * 5000], SamplingParams(max_tokens=1))
    with pytest.raises(PromptTooLongError, match="KV cache"):
        llm.generate([[1] * (96 * 16 + 1)], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError):
        llm.generate([[100000]], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError):
        llm.generate([[]], SamplingParams(max_tokens=1))
    with pytest.raises(SamplingParamsError):
        SamplingParams(temperature=-1)
    assert_pool_full(llm)


def test_abort_frees_everything(llm):
    engine = llm.engine
    rng = random.Random(3)
    for i in range(6):
        engine.add_request(f"a{i}", [rng.randrange(700) for _ in range(30)], SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks() < 96
    for i in range(6):
        out = engine.abort_request(f"a{i}")
        assert out is not None and out.finished and out.finish_reason == "abort"
    assert engine.abort_request("a0") is None
    assert_pool_full(llm)


def test_failed_step_fails_its_requests_only(llm, monkeypatch):
    engine = llm.engine
    calls = {"n": 0}
    real_execute = engine.runner.execute

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_execute(plan)

    monkeypatch.setattr(engine.runner, "execute", flaky)
    engine.add_request("bad", [1, 2, 3], SamplingParams(max_tokens=3))
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("bad", "error")]
    assert "boom" in outs[0].error
    assert_pool_full(llm)
    good = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert len(good.token_ids) == 3


@pytest.mark.parametrize(
    ("temperature", "bad_value"), [(1.0, float("nan")), (0.0, float("nan")), (1.0, float("-inf")), (0.0, float("inf"))]
)
def test_non_finite_logits_fail_their_request_only(llm, monkeypatch, temperature, bad_value):
    """A row with a NaN or an infinity among its logits fails its request with a clear error (never a token id
    outside the vocabulary), greedy or not; the other rows of the step sample as usual, and one such step leaves
    the engine healthy."""
    engine = llm.engine
    real = engine.runner.model.compute_logits

    def first_row_bad(hidden):
        logits = real(hidden)
        if logits.shape[0] == 2:
            logits[0, 7] = bad_value
        return logits

    monkeypatch.setattr(engine.runner.model, "compute_logits", first_row_bad)
    engine.add_request("nan", [1, 2, 3], SamplingParams(max_tokens=1, temperature=temperature))
    engine.add_request("fine", [4, 5, 6], SamplingParams(max_tokens=1, temperature=temperature))
    outs = {o.request_id: o for o in engine.step()}
    assert outs["nan"].finish_reason == "error" and "non-finite logits" in outs["nan"].error
    assert outs["nan"].token_ids == []
    assert outs["fine"].finish_reason == "length" and 0 <= outs["fine"].token_ids[0] < engine.vocab_size
    assert engine.unhealthy_reason() is None
    assert_pool_full(llm)


def test_nan_weights_fail_every_request_and_make_the_engine_unhealthy(tiny_checkpoint, tmp_path):
    """The issue's case: NaN weights loaded with the check skipped. Each request fails with a clear error, and
    after a few steps that all failed the engine says it is unhealthy; a step that samples resets it."""
    from safetensors.torch import load_file, save_file

    for item in tiny_checkpoint.iterdir():
        shutil.copy(item, tmp_path / item.name)
    index = (tmp_path / "model.safetensors.index.json").read_text()
    name = "model.layers.3.self_attn.o_proj.weight"
    shard = tmp_path / json.loads(index)["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard))
    broken = LLM(tmp_path, num_blocks=32, check_weights=False)
    outs = broken.generate([[1, 2, 3], [4, 5], [6]], SamplingParams(max_tokens=4, temperature=1.0))
    for out in outs:
        assert out.finish_reason == "error" and "non-finite logits" in out.error
    assert broken.engine.unhealthy_reason() is None  # one step (all three prompts) failed so far
    broken.generate([[7], [8]], SamplingParams(max_tokens=1))
    broken.generate([[9]], SamplingParams(max_tokens=1))
    reason = broken.engine.unhealthy_reason()
    assert reason is not None and "3 model steps all failed" in reason and "non-finite" in reason
    # Repaired in place: the next step samples, and the engine is healthy again.
    broken.engine.runner.model.model.layers[3].self_attn.o_proj.weight[0, 0] = 0.0
    assert broken.generate([[1, 2]], SamplingParams(max_tokens=2))[0].error is None
    assert broken.engine.unhealthy_reason() is None


def test_logits_mask_constrains_and_fails_alone(llm):
    engine = llm.engine
    vocab = engine.vocab_size
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[11, 22, 33]] = True

    def broken(_output_ids: list[int]) -> torch.Tensor:
        raise KeyError("grammar state lost")

    params = SamplingParams(max_tokens=5, temperature=1.0, seed=7)
    engine.add_request("masked", [4, 5, 6], params, logits_mask_fn=lambda ids: allowed)
    engine.add_request("broken", [4, 5, 6], params, logits_mask_fn=broken)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished["masked"].token_ids) <= {11, 22, 33} and len(finished["masked"].token_ids) == 5
    assert finished["broken"].finish_reason == "error" and "grammar state lost" in finished["broken"].error
    assert_pool_full(llm)


def test_generate_feeds_a_bounded_waiting_queue(llm, monkeypatch):
    monkeypatch.setattr(llm.engine.args, "max_num_waiting", 2)
    monkeypatch.setattr(llm.engine.scheduler, "max_num_waiting", 2)
    outs = llm.generate([[i + 1, 2, 3] for i in range(7)], SamplingParams(max_tokens=2, temperature=0.0))
    assert [len(o.token_ids) for o in outs] == [2] * 7
    assert llm.generate([], SamplingParams()) == []
    assert_pool_full(llm)


def test_grammar_constrains_generation(llm):
    pytest.importorskip("llguidance")  # optional on the GPU image (benchmarks/gpu_check.sh)
    engine = llm.engine
    compiler = engine.grammar_compiler
    spec = StructuredOutputSpec(final_schema=canonical_json({"type": "object"}))
    engine.add_request(
        "json", [5, 6, 7], SamplingParams(max_tokens=24, temperature=1.0, seed=3, structured_output=spec)
    )
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    final = outs[-1]
    assert final.finish_reason in ("stop", "length") and final.error is None
    # every sampled token was one the grammar allowed: a fresh state accepts the whole output
    assert compiler.new_state(spec).accept_tokens(final.token_ids)
    assert_pool_full(llm)


def test_invalid_structured_output_is_refused_at_add(llm):
    pytest.importorskip("llguidance")  # optional on the GPU image (benchmarks/gpu_check.sh)
    engine = llm.engine
    bad = StructuredOutputSpec(final_schema=canonical_json({"type": "foo"}), strict=False)
    with pytest.raises(StructuredOutputError) as info:
        engine.add_request("bad-schema", [5, 6], SamplingParams(max_tokens=4, structured_output=bad))
    assert info.value.param == "response_format" and info.value.http_status == 400
    assert "bad-schema" not in engine.requests and not engine.has_unfinished_requests()
    with pytest.raises(SamplingParamsError, match="structured_output"):
        SamplingParams(structured_output={"type": "json_object"})  # type: ignore[arg-type]


def test_grammar_rows_batched_like_per_row_masks(llm):
    """A request's `structured_output` takes the model runner's batched bitmask path; the same grammar state as
    a plain `logits_mask_fn` the per-row one. With seeded sampling both give the same tokens, in steps that mix
    them with free rows."""
    pytest.importorskip("llguidance")  # optional on the GPU image (benchmarks/gpu_check.sh)
    engine = llm.engine
    compiler = engine.grammar_compiler
    specs = [
        StructuredOutputSpec.from_request({"type": "json_object"}),
        StructuredOutputSpec.from_request(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "strict": True,
                        "parameters": {"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"]},
                    },
                }
            ],
            tool_choice="required",
        ),
    ]
    allowed = torch.zeros(engine.vocab_size, dtype=torch.bool)
    allowed[100:200] = True

    def run(batched: bool) -> dict[str, list[int]]:
        for i, spec in enumerate(specs * 2):
            stop_ids = list(compiler.stop_token_ids)
            if batched:
                params = SamplingParams(
                    max_tokens=16, temperature=1.0, seed=10 + i, stop_token_ids=stop_ids, structured_output=spec
                )
                engine.add_request(f"g{i}", [5, 6, 7 + i], params)
            else:
                state = compiler.new_state(spec)
                params = SamplingParams(max_tokens=16, temperature=1.0, seed=10 + i, stop_token_ids=stop_ids)
                engine.add_request(f"g{i}", [5, 6, 7 + i], params, logits_mask_fn=state)
        engine.add_request(
            "plain", [4, 5], SamplingParams(max_tokens=8, temperature=1.0, seed=1), logits_mask_fn=lambda ids: allowed
        )
        engine.add_request("free", [4, 5, 6], SamplingParams(max_tokens=8, temperature=1.0, seed=2))
        finished = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    assert out.error is None, out.error
                    finished[out.request_id] = out.token_ids
        return finished

    batched, per_row = run(True), run(False)
    assert batched == per_row
    for i, spec in enumerate(specs * 2):
        assert compiler.new_state(spec).accept_tokens(batched[f"g{i}"])
    assert all(100 <= t < 200 for t in batched["plain"])
    assert_pool_full(llm)


LONG_PROMPT_CHILD = """
import resource, sys
import torch
torch.set_num_threads(1)
from gptoss.engine.llm import LLM
from gptoss.engine.sampling_params import SamplingParams
llm = LLM(sys.argv[1], max_model_len=2048, num_blocks=136)
params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
llm.generate([[5] * 32], params)  # warm: everything a step allocates once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = llm.generate([[(i * 7) % 700 for i in range(2040)]], params)[0]
assert len(out.token_ids) == 2 and out.error is None
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_prompt_near_max_model_len_in_bounded_memory(tiny_checkpoint):
    """A 2040-token prompt (max_model_len 2048, one prefill step) raises the process's peak RSS by a few MB.
    Attention that materialised its fp32 scores (6 heads x 2040^2, then masked, concatenated, softmaxed) took
    ~400 MB here, and the same shape at gpt-oss-120b's 64 heads and 12k tokens took the server past 8 GB."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", LONG_PROMPT_CHILD, str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    peak_growth_mb = int(child.stdout.split()[-1])
    assert peak_growth_mb < 64, f"peak RSS grew {peak_growth_mb} MB for one long prompt"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU: the Triton kernels in the interpreter")
def test_triton_kernel_backend_on_cpu_generates_what_the_torch_path_does(llm, tiny_checkpoint):
    """`kernel_backend="triton"` runs the engine's steps through the Triton kernels on CPU (interpreter): two
    prompts, greedy, the same tokens as the torch references give."""
    triton_llm = LLM(tiny_checkpoint, num_blocks=32, max_num_seqs=4, kernel_backend="triton")
    assert triton_llm.engine.runner.model.kernel_backend == "triton"
    prompts = [[5, 17, 99, 3, 250], [42, 7]]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)  # a prefill and a decode step
    got = [out.token_ids for out in triton_llm.generate(prompts, params)]
    assert got == [out.token_ids for out in llm.generate(prompts, params)]


def test_kernel_backend_is_checked(tiny_checkpoint) -> None:
    import argparse

    from gptoss.engine.engine_args import EngineArgs
    from gptoss.scripts.engine_flags import add_engine_arguments, engine_args_from_cli

    with pytest.raises(ValueError, match="kernel_backend"):
        EngineArgs(model="x", kernel_backend="cuda")
    parser = add_engine_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(tiny_checkpoint), "--kernel-backend", "triton"])
    assert engine_args_from_cli(args).kernel_backend == "triton"
    assert engine_args_from_cli(parser.parse_args(["--model", str(tiny_checkpoint)])).kernel_backend == "auto"


def test_batch_invariance_default_follows_the_device() -> None:
    """On by default with CUDA (the Triton kernels cost nothing for it); off on CPU, where it means fixed-shape
    row tiles in every matmul; asked for either way with `batch_invariant=True` / `--batch-invariant`."""
    import torch
    from gptoss.engine import EngineArgs

    assert EngineArgs(model="m").resolve_batch_invariant(torch.device("cuda"))
    assert not EngineArgs(model="m").resolve_batch_invariant(torch.device("cpu"))
    assert EngineArgs(model="m", batch_invariant=True).resolve_batch_invariant(torch.device("cpu"))
    assert not EngineArgs(model="m", batch_invariant=False).resolve_batch_invariant(torch.device("cuda"))
