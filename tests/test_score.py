"""scripts/score.py: continuation log-probabilities, the lm-evaluation-harness token split, is_greedy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from gptoss.scripts import score
from gptoss.scripts.score import score_jsonl, split_tokens


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Path):
    from gptoss.engine.llm import LLM

    return LLM(tiny_checkpoint, max_num_seqs=8)


def test_split_moves_trailing_space_to_the_continuation(llm) -> None:
    tok = llm.tokenizer
    context_ids, continuation_ids = split_tokens(tok, "The capital of France is ", "Paris", None)
    assert context_ids == tok.encode("The capital of France is").ids
    assert context_ids + continuation_ids == tok.encode("The capital of France is Paris").ids
    # Token ids pass through; an empty context stands on <|startoftext|>.
    assert split_tokens(tok, [1, 2], [3], None) == ([1, 2], [3])
    start = tok.token_to_id("<|startoftext|>")
    assert split_tokens(tok, "", "Hello", start) == ([start], tok.encode("Hello").ids)


def test_scores_match_prompt_logprobs_and_greedy(tmp_path: Path, llm) -> None:
    from gptoss.engine.sampling_params import SamplingParams

    tok = llm.tokenizer
    context = tok.encode("Tell me a story about a dragon").ids
    greedy = llm.generate([context], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0].token_ids
    rows = [
        {"id": "mc", "context": "What is the capital of France? ", "continuations": ["Paris", "London", "a dragon"]},
        {"id": "greedy", "context": context, "continuations": [list(greedy), [(greedy[0] + 1) % 500]]},
        {"id": "bad", "context": "x", "continuations": []},
        {"id": "empty", "context": "", "continuations": ["Hello, world!"], "metadata": {"n": 1}},
        "not json",
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    reported = []
    summary = score_jsonl(path, out, llm, max_in_flight=16, report=reported.append)
    assert sorted(bad.line_no for bad in reported) == [3, 5]
    assert (summary.num_lines, summary.num_run) == (3, 3)
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["mc", "greedy", "empty"]
    mc = results[0]
    assert len(mc["logprobs"]) == 3 and mc["num_tokens"] == [len(t) for t in mc["token_logprobs"]]
    for total, per_token in zip(mc["logprobs"], mc["token_logprobs"], strict=True):
        assert total == pytest.approx(sum(per_token)) and total < 0
    # The same number from LLM.score on the whole text.
    whole = tok.encode("What is the capital of France? Paris").ids
    n_context = len(tok.encode("What is the capital of France?").ids)
    expected = sum(lp.logprob for lp in llm.score([whole])[0].prompt_logprobs[n_context:])
    assert mc["logprobs"][0] == pytest.approx(expected, abs=1e-4)
    assert results[1]["is_greedy"] == [True, False]
    assert results[2]["metadata"] == {"n": 1} and math.isfinite(results[2]["logprobs"][0])


def test_cli_registration() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="gptoss")
    score.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["score", "in.jsonl", "out.jsonl", "--model", "m"])
    assert args.handler is score.run_score
