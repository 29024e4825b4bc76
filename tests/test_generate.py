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


def invariance_requests(num: int) -> list[dict]:
    """Sampled requests with logprobs whose prompts differ in length (a few tokens to a few hundred), so batches
    mix prefill and decode rows and long prompts are prefilled in chunks."""
    rows = []
    for i in range(num):
        row: dict = {"id": f"v{i}", "max_tokens": 2 + i % 5, "temperature": 1.0, "logprobs": 2}
        text = " ".join(f"word{j * (i + 1) % 97}" for j in range(1 + (i * 37) % 70))
        if i % 2:
            row["messages"] = [{"role": "user", "content": text}]
        else:
            row.update(prompt=text, raw=True)
        rows.append(row)
    return rows


def test_same_results_whatever_the_batch(tmp_path: Path, tiny_checkpoint: Path, encoding, llm16) -> None:
    """The README's and --help's claim: with --batch-invariant (the default on CUDA; asked for here, on CPU),
    identical files (tokens and logprobs, bit for bit) at any --max-num-seqs, here 1, 3 and 16, with chunked
    prefill (a 64-token step budget) in one of them."""
    from gptoss.engine.llm import LLM

    rows = invariance_requests(16)
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    outputs = []
    llms = (
        ("b16", LLM(tiny_checkpoint, max_num_seqs=16, batch_invariant=True)),
        ("b3", LLM(tiny_checkpoint, max_num_seqs=3, max_num_batched_tokens=64, batch_invariant=True)),
        ("b1", LLM(tiny_checkpoint, max_num_seqs=1, batch_invariant=True)),
    )
    for name, llm in llms:
        out = tmp_path / f"{name}.jsonl"
        generate_jsonl(path, out, llm, encoding, GenerateDefaults(seed=11), max_in_flight=40, include_raw=True)
        outputs.append(out.read_bytes())
    results = read_results(tmp_path / "b1.jsonl")
    prompt_lengths = [r["usage"]["prompt_tokens"] for r in results]
    assert min(prompt_lengths) < 16 and max(prompt_lengths) > 128  # one-tile prompts and chunked ones
    assert outputs[0] == outputs[1] == outputs[2]
    assert len({tuple(r["token_ids"]) for r in results}) > 1  # sampled (temperature 1), not all the same
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


def test_resume_refuses_results_of_other_requests_or_flags(tmp_path: Path, encoding, llm16) -> None:
    """Only ids were matched before: input B onto A's output kept A's results and exited 0, a changed
    max_tokens was ignored, a short input onto a long output left the extra lines."""
    rows = [{"id": f"f{i}", "prompt": f"Hello {i}", "raw": True, "max_tokens": 2} for i in range(4)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    out = tmp_path / "out.jsonl"
    generate_jsonl(a, out, llm16, encoding, GenerateDefaults(seed=1), max_in_flight=8)
    finished = out.read_bytes()
    assert all(len(r["fingerprint"]) == 32 for r in read_results(out))
    no_model = lambda: pytest.fail("a refused resume must not load a model")  # noqa: E731

    def refused(path: Path, defaults: GenerateDefaults, match: str) -> None:
        with pytest.raises(generate.GenerateError, match=match):
            generate_jsonl(path, out, no_model, encoding, defaults, max_in_flight=8)
        assert out.read_bytes() == finished  # untouched

    # The same ids with another prompt on one line.
    changed = write_jsonl(tmp_path / "b.jsonl", [*rows[:2], {**rows[2], "prompt": "Goodbye"}, rows[3]])
    refused(changed, GenerateDefaults(seed=1), r"1 of its 4 finished results .* id 'f2' \(line 3\)")
    # The same input under another run flag (the default max_tokens, the seed).
    refused(a, GenerateDefaults(seed=2), "4 of its 4 finished results")
    refused(a, GenerateDefaults(seed=1, max_tokens=5), "4 of its 4 finished results")
    # A shorter input: results of requests it does not have.
    refused(write_jsonl(tmp_path / "c.jsonl", rows[:3]), GenerateDefaults(seed=1), "id 'f3' is not a request of")
    # A file written without fingerprints (another tool, an older version).
    out.write_bytes(b"".join(json.dumps({"id": r["id"], "text": ""}).encode() + b"\n" for r in rows))
    finished = out.read_bytes()
    refused(a, GenerateDefaults(seed=1), "has no fingerprint")
    # --overwrite starts over; then the same command resumes with nothing to do.
    summary = generate_jsonl(a, out, llm16, encoding, GenerateDefaults(seed=1), max_in_flight=8, overwrite=True)
    assert (summary.num_already_done, summary.num_run) == (0, 4)
    again = generate_jsonl(a, out, no_model, encoding, GenerateDefaults(seed=1), max_in_flight=8)
    assert (again.num_already_done, again.num_run) == (4, 0)
    # Key order and spacing of a line are not its content.
    reordered = write_jsonl(tmp_path / "d.jsonl", [dict(reversed(list(row.items()))) for row in rows])
    assert generate_jsonl(reordered, out, no_model, encoding, GenerateDefaults(seed=1), max_in_flight=8).num_run == 0


def test_unwritable_output_is_one_line_and_leaves_no_temporary_file(
    tmp_path: Path, tiny_checkpoint: Path, encoding, llm16, monkeypatch, capsys
) -> None:
    import errno

    rows = [{"id": f"w{i}", "prompt": f"Hi {i}", "raw": True, "max_tokens": 1 + i} for i in range(5)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    # A folder that cannot be made (a file is in the way): the command says so in one line, exit status 1.
    (tmp_path / "blocker").write_text("")
    blocked = str(tmp_path / "blocker" / "out.jsonl")
    status = generate.main([str(path), blocked, "--model", str(tiny_checkpoint), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1 and err[0].startswith("gptoss generate: cannot write ")
    assert "blocker" in err[0] and "Traceback" not in err[0]

    # The disk fills after two results: the finished lines stay whole, the engine is freed.
    out = tmp_path / "out.jsonl"
    real_append = ResultsFile.append
    appended: list[str] = []

    def append_until_full(self, record):
        if len(appended) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        appended.append(record["id"])
        real_append(self, record)

    monkeypatch.setattr(ResultsFile, "append", append_until_full)
    with pytest.raises(OSError, match="No space left"):
        generate_jsonl(path, out, llm16, encoding, GenerateDefaults(seed=2), max_in_flight=8)
    assert [r["id"] for r in read_results(out)] == appended
    assert not llm16.engine.has_unfinished_requests()
    monkeypatch.setattr(ResultsFile, "append", real_append)

    # Full while rewriting in input order: no stale temporary file, and the appended file still resumes.
    def fsync_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(generate.os, "fsync", fsync_full)
    with pytest.raises(OSError, match="No space left"):
        generate_jsonl(path, out, llm16, encoding, GenerateDefaults(seed=2), max_in_flight=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "in.jsonl", "out.jsonl"]
    monkeypatch.undo()
    summary = generate_jsonl(path, out, llm16, encoding, GenerateDefaults(seed=2), max_in_flight=8)
    assert summary.num_already_done == 5 and [r["id"] for r in read_results(out)] == [r["id"] for r in rows]


def test_failed_requests_make_the_exit_status_1(tmp_path: Path, tiny_checkpoint: Path, monkeypatch, capsys) -> None:
    """The issue's run with NaN weights exited 0; a request that fails in the engine now counts."""
    from gptoss.engine.outputs import RequestOutput

    def failing_run(engine, jobs, on_finished, **kwargs):
        for job in jobs:
            on_finished(job, RequestOutput(job.id, job.prompt_token_ids, [], "", True, "error", error="broken"))

    monkeypatch.setattr(generate, "run_engine", failing_run)
    monkeypatch.setattr(generate, "make_llm", lambda args: type("FakeLLM", (), {"engine": None})())
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "x", "prompt": "hi", "raw": True}])
    out = tmp_path / "out.jsonl"
    status = generate.main([str(path), str(out), "--model", str(tiny_checkpoint), "--no-progress"])
    assert status == 1 and "1 requests failed" in capsys.readouterr().err
    assert read_results(out)[0]["finish_reason"] == "error"


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
