"""`gptoss serve --tensor-parallel-size 2` as users run it (rank 0 serves, rank 1 is a process it spawns): all three
API shapes answer; then a killed worker turns /health to 503, ends the in-flight stream with an error instead of
a hang, and the server exits non-zero (engine/worker/tp_worker.py's monitor, scripts/cli.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import assert_every_api_answers, free_port

STARTUP_TIMEOUT_S = 120.0


def children_of(pid: int) -> list[int]:
    """Child pids of `pid` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_tp2_server_answers_every_api_then_fails_fast_when_a_worker_dies(tiny_checkpoint: Path) -> None:
    if not Path("/proc/self/task").exists():
        pytest.skip("needs Linux /proc to find the worker process")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gptoss.scripts.cli", "serve", "--model", str(tiny_checkpoint)]
    command += ["--tensor-parallel-size", "2", "--port", str(port), "--num-blocks", "128", "--max-num-seqs", "4"]
    command += ["--max-num-batched-tokens", "256", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert server.poll() is None, f"server exited at startup: {server.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        [worker] = children_of(server.pid)[-1:] or pytest.fail("no worker process")

        assert_every_api_answers(base, max_tokens=4)

        body = {"prompt": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            events.append(next(lines))  # generating: now kill the worker mid-stream
            os.kill(worker, signal.SIGKILL)
            killed_at = time.monotonic()
            events.extend(lines)  # must end, not hang (the read timeout would fail the test)
        assert time.monotonic() - killed_at < 10
        errors = [event for event in events if '"error"' in event]
        assert errors and "tensor-parallel worker died" in errors[0], events[-3:]

        saw_503 = False
        while server.poll() is None and time.monotonic() - killed_at < 10 and not saw_503:
            try:
                saw_503 = httpx.get(f"{base}/health", timeout=2).status_code == 503
            except httpx.TransportError:
                break
            time.sleep(0.05)
        assert saw_503, "/health must report the dead worker"
        assert server.wait(timeout=40) == 1, "the server must exit non-zero so a supervisor restarts it"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
