"""scripts/generate.py: JSONL in, results out in input order; bad lines skipped; resumable; batch-invariant."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gptoss.scripts import generate
from gptoss.scripts.generate import GenerateDefaults, ResultsFile, generate_jsonl, read_jobs


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_results(path: Path) -> list[dict]:
    data = path.read_text()
    assert data == "" or data.endswith("\n"), "the file must end with a whole line"
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture(scope="module")
def encoding(tiny_checkpoint: Path):
    from gptoss.engine.harmony import HarmonyEncoding

    return HarmonyEncoding.from_file(tiny_checkpoint)


@pytest.fixture(scope="module")
def llm16(tiny_checkpoint: Path):
    from gptoss.engine.llm import LLM

    return LLM(tiny_checkpoint, max_num_seqs=16)


def mixed_requests(num: int) -> list[dict]:
    """Raw and harmony requests of different lengths, so they finish out of input order."""
    rows = []
    for i in range(num):
        row: dict = {"id": f"r{i}", "max_tokens": 1 + (num - i) % 5, "temperature": 1.0}
        if i % 3 == 0:
            row["messages"] = [{"role": "user", "content": f"Tell me a story about dragon {i}"}]
        elif i % 3 == 1:
            row.update(prompt=f"The quick brown fox {i}", raw=True)
        else:
            row.update(input=f"What is {i} + {i}?", reasoning={"effort": "low"})
        rows.append(row)
    return rows


def test_bad_lines_are_reported_with_line_numbers_and_skipped(tmp_path: Path, encoding) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "ok1", "prompt": "hello"},
            "{not json",
            {"id": "unknown", "prompt": "x", "colour": "red"},
            {"id": "temp", "prompt": "x", "temperature": -0.5},
            {"id": "topp", "prompt": "x", "top_p": 1.5},
            {"id": "maxtok", "prompt": "x", "max_tokens": 0},
            {"id": "two", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            {"id": "role", "messages": [{"role": "wizard", "content": "y"}]},
            {"id": "ok1", "prompt": "duplicate"},
            "[1, 2]",
            {"id": "rawmsg", "messages": [{"role": "user", "content": "y"}], "raw": True},
            {"prompt": "no id: the line number is the id", "logprobs": True, "top_logprobs": 3},
        ],
    )
    reported = []
    jobs = read_jobs(
        path,
        lambda obj, n, rid: generate.build_generate_job(obj, n, rid, encoding, GenerateDefaults()),
        reported.append,
    )
    assert [job.id for job in jobs] == ["ok1", "12"]
    assert jobs[1].params.logprobs == 3
    messages = {bad.line_no: bad.message for bad in reported}
    assert sorted(messages) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert "invalid JSON" in messages[2]
    assert "colour" in messages[3]
    assert "temperature" in messages[4]
    assert "top_p" in messages[5]
    assert "max_tokens" in messages[6]
    assert "exactly one" in messages[7]
    assert "role" in messages[8]
    assert "duplicate" in messages[9]
    assert "object" in messages[10]
    assert "raw" in messages[11]
    assert all(str(bad).startswith(f"line {bad.line_no}:") for bad in reported)


def test_results_in_input_order_with_every_field(tmp_path: Path, encoding, llm16, monkeypatch) -> None:
    rows = mixed_requests(10)
    rows[1]["logprobs"] = True
    rows[1]["top_logprobs"] = 2
    rows[2]["metadata"] = {"k": 1}
    path = write_jsonl(tmp_path / "in.jsonl", [*rows[:5], "garbage", *rows[5:]])
    completion_order: list[str] = []
    original_append = ResultsFile.append

    def spy(self, record):
        completion_order.append(record["id"])
        original_append(self, record)

    monkeypatch.setattr(ResultsFile, "append", spy)
    out = tmp_path / "out.jsonl"
    summary = generate_jsonl(path, out, llm16, encoding, GenerateDefaults(seed=7), max_in_flight=40)
    assert (summary.num_requests, summary.num_bad_lines, summary.num_run) == (10, 1, 10)
    results = read_results(out)
    ids = [r["id"] for r in rows]
    assert [r["id"] for r in results] == ids
    assert completion_order != ids  # short requests finished first: the final file was reordered
    for row, result in zip(rows, results, strict=True):
        assert set(result) >= {"id", "text", "reasoning", "tool_calls", "finish_reason", "usage"}
        assert result["usage"]["completion_tokens"] <= row["max_tokens"]
        assert (
            result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
        )
        assert result["finish_reason"] in ("stop", "length", "tool_calls")
        if row.get("raw"):
            assert result["reasoning"] is None
    assert len(results[1]["logprobs"]) == results[1]["usage"]["completion_tokens"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in results[1]["logprobs"])
    assert results[2]["metadata"] == {"k": 1}
    # Re-running finds everything done and leaves the file as it was.
    before = out.read_bytes()
    again = generate_jsonl(
        path,
        out,
        lambda: pytest.fail("nothing to run: no model needed"),
        encoding,
        GenerateDefaults(seed=7),
        max_in_flight=40,
    )
    assert (again.num_already_done, again.num_run) == (10, 0)
    assert out.read_bytes() == before


def test_resume_after_kill(tmp_path: Path, tiny_checkpoint: Path, encoding, llm16) -> None:
    rows = [
        {"id": f"k{i}", "prompt": f"Hello number {i}", "raw": True, "max_tokens": 8, "ignore_eos": True}
        for i in range(24)
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptoss.scripts.generate",
            str(path),
            str(out),
            "--model",
            str(tiny_checkpoint),
            "--max-num-seqs",
            "1",
            "--seed",
            "3",
            "--no-progress",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed = read_results(out)  # whole lines only
    assert 2 <= len(killed) < len(rows), "the run should have been killed mid-way"
    # A process killed inside a write would leave a partial line: the resume must drop it.
    with open(out, "ab") as f:
        f.write(b'{"id": "k23", "text": "half a li')
    summary = generate_jsonl(path, out, llm16, encoding, GenerateDefaults(seed=3), max_in_flight=40)
    assert summary.num_already_done == len(killed)
    results = read_results(out)
    assert [r["id"] for r in results] == [r["id"] for r in rows]  # every id exactly once, in input order
    by_id = {r["id"]: r for r in results}
    for record in killed:  # what was finished before the kill is kept as it was
        assert by_id[record["id"]] == record
    # ... and what the rerun produced at batch 16 equals what the killed run would have at batch 1.
    assert all(r["usage"]["completion_tokens"] == 8 for r in results)


def test_same_results_at_batch_1_and_16(tmp_path: Path, tiny_checkpoint: Path, encoding, llm16) -> None:
    from gptoss.engine.llm import LLM

    rows = mixed_requests(6)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    outputs = []
    for name, llm in (("b16", llm16), ("b1", LLM(tiny_checkpoint, max_num_seqs=1))):
        out = tmp_path / f"{name}.jsonl"
        generate_jsonl(path, out, llm, encoding, GenerateDefaults(seed=11), max_in_flight=40, include_raw=True)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    tokens = [r["token_ids"] for r in read_results(tmp_path / "b1.jsonl")]
    assert len({tuple(t) for t in tokens}) > 1  # sampled (temperature 1), not all the same
    # A different run seed changes the samples.
    generate_jsonl(
        path, tmp_path / "other.jsonl", llm16, encoding, GenerateDefaults(seed=12), max_in_flight=40, include_raw=True
    )
    assert (tmp_path / "other.jsonl").read_bytes() != outputs[0]


def test_cli_registration(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="gptoss")
    generate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "generate",
            "in.jsonl",
            "out.jsonl",
            "--model",
            "m",
            "--max-num-seqs",
            "4",
            "--seed",
            "1",
            "--temperature",
            "0",
        ]
    )
    assert args.handler is generate.run_generate
    assert args.max_num_seqs == 4 and args.temperature == 0.0 and args.seed == 1


def test_ctrl_c_keeps_finished_lines_and_frees_the_engine(tmp_path: Path, encoding, llm16, monkeypatch) -> None:
    rows = [
        {"id": f"c{i}", "prompt": f"Hi {i}", "raw": True, "max_tokens": 1 + i, "ignore_eos": True} for i in range(6)
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    engine = llm16.engine
    real_step = engine.step
    calls = []

    def step_then_interrupt():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", step_then_interrupt)
    summary = generate_jsonl(path, out, llm16, encoding, GenerateDefaults(seed=5), max_in_flight=40)
    assert summary.interrupted and 0 < summary.num_finished < len(rows)
    assert len(read_results(out)) == summary.num_finished
    assert not engine.has_unfinished_requests()  # the requests in flight were aborted
    monkeypatch.setattr(engine, "step", real_step)
    again = generate_jsonl(path, out, llm16, encoding, GenerateDefaults(seed=5), max_in_flight=40)
    assert not again.interrupted and again.num_already_done == summary.num_finished
    assert [r["id"] for r in read_results(out)] == [r["id"] for r in rows]


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_tool_choice_forces_a_call(tmp_path: Path, encoding, llm16) -> None:
    pytest.importorskip("llguidance")
    rows = [
        {"id": "named", "input": "Weather?", "tools": [WEATHER_TOOL], "max_tokens": 120, "seed": 1,
         "tool_choice": {"type": "function", "name": "get_weather"}},
        {"id": "required", "messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 120, "seed": 2,
         "tools": [{"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}],
         "tool_choice": "required"},
        {"id": "unknown", "input": "x", "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "nope"}},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    bad: list = []
    generate_jsonl(
        path, tmp_path / "out.jsonl", llm16, encoding, GenerateDefaults(), max_in_flight=8, report=bad.append
    )
    assert [b.line_no for b in bad] == [3] and "tool_choice" in bad[0].message
    for result in read_results(tmp_path / "out.jsonl"):
        assert result["finish_reason"] == "tool_calls", result
        assert [call["name"] for call in result["tool_calls"]] == ["get_weather"]
        assert json.loads(result["tool_calls"][0]["arguments"])["city"] in ("Paris", "Oslo")


def test_no_progress_bar_when_not_a_terminal(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """stderr is a pipe here: no bar, but the thread count is said."""
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi", "max_tokens": 2}])
    out = subprocess.run(
        [sys.executable, "-m", "gptoss.scripts.cli", "generate", str(path), str(tmp_path / "out.jsonl"),
         "--model", str(tiny_checkpoint), "--num-threads", "1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": ""},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "cpu threads: 1 (--num-threads)" in out.stderr
    assert "%|" not in out.stderr and "it/s" not in out.stderr
