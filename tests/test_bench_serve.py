"""scripts/bench_serve.py: metric definitions, a sweep against a fake streaming server, and a live tiny server."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from gptoss.scripts import bench_serve
from gptoss.scripts.bench_serve import RequestInput, RequestResult, make_requests, percentile, summarize

TOKEN_DELAY_S = 0.01
METRICS = ("ttft", "tpot", "itl", "e2el")


def test_summarize_uses_vllm_definitions() -> None:
    results = [
        RequestResult(True, ttft=0.1, latency=0.4, itl=[0.1, 0.1, 0.1], prompt_tokens=10, output_tokens=4),
        RequestResult(True, ttft=0.2, latency=0.2, itl=[], prompt_tokens=10, output_tokens=1),
        RequestResult(False, error="HTTP 500"),
    ]
    inputs = [RequestInput([1] * 10, 10, 4)] * 3
    metrics = summarize(results, duration=2.0, inputs=inputs)
    assert (metrics["completed"], metrics["failed"]) == (2, 1)
    assert metrics["total_output_tokens"] == 5 and metrics["total_input_tokens"] == 20
    assert metrics["request_throughput"] == pytest.approx(1.0)
    assert metrics["output_throughput"] == pytest.approx(2.5)
    assert metrics["total_token_throughput"] == pytest.approx(12.5)
    # TPOT excludes the first token and requests with one output token: (0.4 - 0.1) / 3.
    assert metrics["mean_tpot_ms"] == pytest.approx(100.0)
    assert metrics["mean_ttft_ms"] == pytest.approx(150.0)
    assert metrics["median_itl_ms"] == pytest.approx(100.0)
    assert metrics["p99_e2el_ms"] == pytest.approx(200 + 0.99 * 200)
    assert metrics["errors"] == ["HTTP 500"]


def test_percentile_matches_numpy() -> None:
    import numpy as np

    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for p in (0, 50, 90, 99, 100):
        assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))
    assert percentile([], 50) is None


def test_random_prompts_lengths() -> None:
    fixed = make_requests(5, 12, 7, 0.0, seed=0, chat=False)
    assert all(len(r.prompt) == 12 and r.output_len == 7 for r in fixed)
    varied = make_requests(50, 100, 10, 0.5, seed=0, chat=False)
    assert all(50 <= len(r.prompt) <= 150 and 5 <= r.output_len <= 15 for r in varied)
    assert len({len(r.prompt) for r in varied}) > 5
    chat = make_requests(2, 8, 4, 0.0, seed=1, chat=True)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 8 for r in chat)
    assert (
        make_requests(3, 8, 4, 0.0, seed=2, chat=False)[0].prompt
        == make_requests(3, 8, 4, 0.0, seed=2, chat=False)[0].prompt
    )


# ---- a fake OpenAI server that streams one chunk per token, TOKEN_DELAY_S apart --------------------------


def fake_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def stream(body: dict, chat: bool):
        n_out = body["max_tokens"]
        n_in = len(body["prompt"]) if not chat else len(body["messages"][0]["content"].split())
        for i in range(n_out):
            await asyncio.sleep(TOKEN_DELAY_S)
            if chat:
                key = "reasoning" if i < n_out // 2 else "content"
                choice = {"index": 0, "delta": {key: f"t{i}"}, "finish_reason": None}
            else:
                choice = {"index": 0, "text": f" t{i}", "finish_reason": None}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        return StreamingResponse(stream(await request.json(), False), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        return StreamingResponse(stream(await request.json(), True), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    import uvicorn

    port = bench_serve.free_port()
    server = uvicorn.Server(uvicorn.Config(fake_app(), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.register(parser.add_subparsers(dest="bench_command"))
    return parser.parse_args(["serve", *argv])


def check_metrics(run: dict, num_prompts: int, output_len: int) -> None:
    assert run["completed"] == num_prompts and run["failed"] == 0, run["errors"]
    assert run["total_output_tokens"] == num_prompts * output_len
    for name in METRICS:
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            value = run[f"{stat}_{name}_ms"]
            assert math.isfinite(value) and value >= 0, (stat, name, value)
        assert run[f"mean_{name}_ms"] > 0
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "duration_s"):
        assert run[key] > 0


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_sweep_against_fake_server(tmp_path: Path, fake_server: str, endpoint: str) -> None:
    result_json, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    args = bench_args(
        "--base-url",
        fake_server,
        "--endpoint",
        endpoint,
        "--num-prompts",
        "8",
        "--input-len",
        "16",
        "--output-len",
        "6",
        "--concurrency",
        "1,4",
        "--num-warmups",
        "1",
        "--result-json",
        str(result_json),
        "--plot",
        str(plot),
        "--quiet",
    )
    assert args.handler(args) == 0
    report = json.loads(result_json.read_text())
    assert report["config"]["model"] == "fake-model"
    runs = report["runs"]
    assert [run["concurrency"] for run in runs] == [1, 4]
    for run in runs:
        check_metrics(run, 8, 6)
        # The server spaces tokens TOKEN_DELAY_S apart: TTFT covers one gap, ITL and TPOT about one each.
        assert run["median_ttft_ms"] >= 0.8 * TOKEN_DELAY_S * 1e3
        assert run["median_itl_ms"] >= 0.8 * TOKEN_DELAY_S * 1e3
        assert run["median_tpot_ms"] >= 0.8 * TOKEN_DELAY_S * 1e3
        assert run["median_e2el_ms"] >= 6 * 0.8 * TOKEN_DELAY_S * 1e3
    assert runs[1]["request_throughput"] > runs[0]["request_throughput"]  # concurrency helps a sleeping server
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_poisson_rate_and_http_errors(fake_server: str) -> None:
    args = bench_args(
        "--base-url",
        fake_server,
        "--num-prompts",
        "6",
        "--input-len",
        "4",
        "--output-len",
        "3",
        "--request-rate",
        "50",
        "--num-warmups",
        "0",
        "--quiet",
    )
    report = asyncio.run(bench_serve.sweep(args, fake_server, None))
    check_metrics(report["runs"][0], 6, 3)
    assert report["runs"][0]["request_rate"] == 50.0
    missing = bench_args(
        "--base-url", fake_server, "--num-prompts", "2", "--num-warmups", "0", "--quiet", "--served-model-name", "x"
    )
    report = asyncio.run(bench_serve.sweep(missing, fake_server + "/nothing-here", None))
    assert report["runs"][0]["failed"] == 2 and "HTTP 404" in report["runs"][0]["errors"][0]


def has_server_app() -> bool:
    try:
        return importlib.util.find_spec("gptoss.server.app") is not None
    except ModuleNotFoundError:  # no `server` package at all
        return False


@pytest.mark.slow
@pytest.mark.skipif(not has_server_app(), reason="gptoss.server.app is not there yet")
def test_live_tiny_server(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from gptoss.engine.tokenizer import load_tokenizer

    with bench_serve.LocalServer(
        tiny_checkpoint, engine_args={"max_num_seqs": 8}, env={"OMP_NUM_THREADS": "1"}
    ) as server:
        for endpoint in ("/v1/completions", "/v1/chat/completions"):
            args = bench_args(
                "--base-url",
                server.base_url,
                "--endpoint",
                endpoint,
                "--num-prompts",
                "4",
                "--input-len",
                "12",
                "--output-len",
                "4",
                "--concurrency",
                "4",
                "--ignore-eos",
                "--quiet",
            )
            report = asyncio.run(bench_serve.sweep(args, server.base_url, load_tokenizer(tiny_checkpoint)))
            run = report["runs"][0]
            assert run["completed"] == 4, (run["errors"], server.log_tail())
            assert run["total_output_tokens"] == 16
            assert run["mean_ttft_ms"] > 0 and run["mean_e2el_ms"] >= run["mean_ttft_ms"]
            if endpoint == "/v1/completions":  # token-id prompts: exact input lengths
                assert run["total_input_tokens"] == 4 * 12


def test_no_text_is_na_not_zero() -> None:
    """A level where no text arrived has no TPOT / ITL: n/a in the report, null in the JSON."""
    from gptoss.scripts.bench_serve import format_run

    results = [RequestResult(True, ttft=0.1, latency=0.1, itl=[], prompt_tokens=10, output_tokens=1)]
    metrics = summarize(results, duration=1.0, inputs=[RequestInput([1] * 10, 10, 4)])
    metrics.update(concurrency=1, request_rate="inf")
    assert metrics["mean_tpot_ms"] is None and metrics["p99_itl_ms"] is None
    text = format_run(metrics)
    tpot = next(line for line in text.splitlines() if line.startswith("TPOT"))
    assert "n/a" in tpot and "0.00" not in tpot
    assert "n/a" not in next(line for line in text.splitlines() if line.startswith("TTFT"))


def test_a_progress_bar_per_level_on_a_terminal(fake_server: str, monkeypatch, capsys) -> None:
    """Each concurrency level shows a bar of finished requests when stderr is a terminal, none otherwise."""
    import sys

    argv = ["--base-url", fake_server, "--num-prompts", "4", "--input-len", "8", "--output-len", "3"]
    argv += ["--concurrency", "1,2", "--num-warmups", "0", "--quiet"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    args = bench_args(*argv)
    assert args.handler(args) == 0
    err = capsys.readouterr().err
    assert "concurrency 1:" in err and "concurrency 2:" in err and "/4 [" in err
    args = bench_args(*argv, "--no-progress")
    assert args.handler(args) == 0
    assert "concurrency 1" not in capsys.readouterr().err
