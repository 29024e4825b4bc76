"""`gptoss` command-line mistakes: one line naming the problem and what to do, exit 2 (usage) or 1 (runtime),
no traceback unless --debug; `--help` fast, complete and written for users."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gptoss.scripts import cli


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """(exit status, stderr) of `gptoss argv...` run in-process; argparse's exits included."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def assert_one_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("cpu threads:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def requests_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "hi", "max_tokens": 2}) + "\n")
    return path


@pytest.fixture
def checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def edit_config(checkpoint: Path, **changes: object) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (checkpoint / "config.json").write_text(json.dumps(config))


def test_missing_model_folder(capsys, requests_file, tmp_path) -> None:
    code, err = run_cli(capsys, "generate", str(requests_file), str(tmp_path / "out.jsonl"), "--model", "/no/such")
    assert code == 2
    assert_one_line(err, "--model /no/such", "no such folder", "checkpoint folder")
    assert not (tmp_path / "out.jsonl").exists()


def test_corrupted_config(capsys, requests_file, checkpoint_copy, tmp_path) -> None:
    (checkpoint_copy / "config.json").write_text('{"hidden_size": 96,')
    code, err = run_cli(
        capsys, "generate", str(requests_file), str(tmp_path / "o.jsonl"), "--model", str(checkpoint_copy)
    )
    assert code == 1
    assert_one_line(err, "config.json", "not valid JSON", "re-download")


def test_missing_input_jsonl(capsys, tmp_path) -> None:
    for command in ("generate", "score"):
        code, err = run_cli(capsys, command, str(tmp_path / "nope.jsonl"), str(tmp_path / "out.jsonl"))
        assert code == 2
        assert_one_line(err, "nope.jsonl", "no such file")


def test_wrong_tokenizer_path(capsys, requests_file, tmp_path) -> None:
    out = tmp_path / "new-checkpoint"
    code, err = run_cli(capsys, "make-checkpoint", str(out), "--tokenizer", "/no/tokenizer.json")
    assert code == 2
    assert_one_line(err, "--tokenizer /no/tokenizer.json", "no such file")
    assert not out.exists()  # no empty folder left behind
    code, err = run_cli(capsys, "generate", str(requests_file), str(tmp_path / "o.jsonl"), "--tokenizer", "/no/t")
    assert code == 2
    assert_one_line(err, "--tokenizer /no/t")


def test_unsupported_dtype(capsys, requests_file, tmp_path) -> None:
    code, err = run_cli(capsys, "generate", str(requests_file), str(tmp_path / "o.jsonl"), "--dtype", "float64")
    assert code == 2
    assert_one_line(err, "--dtype", "float64", "float16", "--help")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, requests_file, tmp_path) -> None:
    code, err = run_cli(capsys, "generate", str(requests_file), str(tmp_path / "o.jsonl"), "--device", "cuda")
    assert code == 2
    assert_one_line(err, "--device cuda", "--device cpu")
    code, err = run_cli(capsys, "generate", str(requests_file), str(tmp_path / "o.jsonl"), "--device", "gpu")
    assert code == 2
    assert_one_line(err, "'gpu' is not a device")


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"hidden_size": None}, ["missing hidden_size"]),
        ({"hidden_size": "96"}, ["hidden_size must be an integer", "'96'"]),
        ({"num_attention_heads": 0}, ["num_attention_heads must be positive"]),
        ({"rms_norm_eps": "tiny"}, ["rms_norm_eps must be a number"]),
    ],
)
def test_bad_config_values(capsys, requests_file, checkpoint_copy, tmp_path, changes, words) -> None:
    edit_config(checkpoint_copy, **changes)
    code, err = run_cli(
        capsys, "generate", str(requests_file), str(tmp_path / "o.jsonl"), "--model", str(checkpoint_copy)
    )
    assert code == 1
    assert_one_line(err, "config.json", *words)


def test_truncated_shard_names_the_file(capsys, requests_file, checkpoint_copy, tmp_path) -> None:
    shard = sorted(checkpoint_copy.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, err = run_cli(
        capsys, "generate", str(requests_file), str(tmp_path / "o.jsonl"), "--model", str(checkpoint_copy)
    )
    assert code == 1
    assert_one_line(err, shard.name, "truncated", "re-download")


def test_debug_shows_the_traceback(requests_file, checkpoint_copy, tmp_path) -> None:
    from gptoss.engine.model.config import ConfigError

    edit_config(checkpoint_copy, hidden_size=None)
    argv = ["generate", str(requests_file), str(tmp_path / "o.jsonl"), "--model", str(checkpoint_copy)]
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(ConfigError):
            cli.main(debug_argv)


def test_generate_refuses_to_overwrite_its_input(capsys, requests_file) -> None:
    code, err = run_cli(capsys, "generate", str(requests_file), str(requests_file))
    assert code == 2
    assert_one_line(err, "overwrite the input")


def test_make_checkpoint_overwrite_and_permissions(capsys, tmp_path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, "make-checkpoint", str(out), "--num-hidden-layers", "2")
    assert code == 2
    assert_one_line(err, "not empty", "--overwrite")
    old_umask = os.umask(0o022)
    try:
        code, err = run_cli(capsys, "make-checkpoint", str(out), "--num-hidden-layers", "2", "--overwrite")
    finally:
        os.umask(old_umask)
    assert code == 0, err
    shards = list(out.glob("*.safetensors"))
    assert shards and all(shard.stat().st_mode & 0o777 == 0o644 for shard in shards)
    assert (out / "notes.txt").read_text() == "mine"


def test_help_is_fast_and_imports_no_torch() -> None:
    code = "import sys, time; t = time.perf_counter(); import gptoss.scripts.cli as c; c.build_parser(); "
    code += "print(time.perf_counter() - t, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"  # torch (seconds to import) stays out of --help
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gptoss.scripts.cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 5  # under 1 s on an idle machine; generous for a loaded CI runner


def test_default_threads_leave_busy_cores_alone(monkeypatch) -> None:
    from gptoss.scripts import engine_flags

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert engine_flags.default_num_threads()[0] == engine_flags.MAX_DEFAULT_THREADS  # idle: capped
    monkeypatch.setattr(os, "getloadavg", lambda: (14.5, 0.0, 0.0))
    assert engine_flags.default_num_threads()[0] == 1  # 1.5 cores free
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))
    assert engine_flags.default_num_threads()[0] == 1  # overloaded: never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert engine_flags.default_num_threads() == (3, "from $OMP_NUM_THREADS")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_checks_the_port_before_loading(capsys, tmp_path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.perf_counter()
        code, err = run_cli(capsys, "serve", "--model", "/no/such/model", "--port", str(port))
    assert code == 2
    assert_one_line(err, f"127.0.0.1:{port}", "another --port")
    assert time.perf_counter() - start < 5  # nothing was loaded (the model path is not even looked at)


def test_serve_banner(tiny_checkpoint: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptoss.scripts.cli", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
         "--num-threads", "1", "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.strip().startswith("listening") or not line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    banner = "".join(lines)
    assert f"gptoss serve: checkpoint {tiny_checkpoint}" in banner
    assert "cpu, dtype float32" in banner
    assert "weights" in banner and "KV cache" in banner and "max 256 sequences" in banner
    assert f"http://127.0.0.1:{port}" in banner and "API key not required" in banner


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += all_parsers(sub)
    return found


def test_every_flag_has_help_and_shows_its_default() -> None:
    for parser in all_parsers(cli.build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest == "help":
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in parser._get_formatter()._get_help_string(action), (parser.prog, action.dest)
        assert "run_engine" not in text and "ResultsFile" not in text, parser.prog
    serve = next(p for p in all_parsers(cli.build_parser()) if p.prog.endswith(" serve") and "bench" not in p.prog)
    assert "float16" in serve.format_help()
