"""No single request can stall or kill the server: limits with clear 4xx answers, preparation off the event loop,
admission that counts every request, bounded grammar compiles, and connections that cannot exhaust it."""

from __future__ import annotations

import logging
import socket
import statistics
import threading
import time

import httpx
import pytest

from tests.server_helpers import HARMONY_ANSWER, LiveServer, encode, scripted_server_for

pytest_plugins = ["tests.server_fixtures"]

USER = [{"role": "user", "content": "hi"}]
MODEL = "@cf/openai/gpt-oss-120b"


def chat(server: LiveServer, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", json={"model": "gpt-oss-120b", **body}, timeout=60, **kwargs)


def assert_openai_400(r: httpx.Response, param: str, words: str = "") -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


# ---- request limits ------------------------------------------------------------------------------------


def test_workers_ai_body_parse_errors_are_400s_in_its_shape(scripted):
    """Deep nesting (RecursionError) and a 5000-digit integer (ValueError) answered 500 and reset the
    connection on /ai/run and its alias, where the OpenAI routes answered 400."""
    for prefix in ("", "/client/v4/accounts/abc"):
        for body in (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"prompt": 1' + b"0" * 5000 + b"}"):
            r = httpx.post(f"{scripted.base_url}{prefix}/ai/run/{MODEL}", content=body, timeout=30)
            assert r.status_code == 400, r.text
            answer = r.json()
            assert answer["success"] is False and answer["errors"][0]["code"] == 5006
            assert "Invalid JSON body" in answer["errors"][0]["message"]


def test_stop_strings_logit_bias_and_tool_names_are_checked(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    assert_openai_400(chat(scripted, {"messages": USER, "stop": ["x"] * 17}), "stop", "at most 16")
    assert_openai_400(chat(scripted, {"messages": USER, "stop": "y" * 257}), "stop", "at most 256 characters")
    assert chat(scripted, {"messages": USER, "stop": ["x"] * 16}).status_code == 200
    # logit_bias is not applied, so it is refused rather than ignored (an empty or all-zero one changes nothing).
    assert_openai_400(chat(scripted, {"messages": USER, "logit_bias": {"5": 10}}), "logit_bias")
    assert chat(scripted, {"messages": USER, "logit_bias": {"5": 0}}).status_code == 200
    # Tool names go into the prompt (`to=functions.NAME`): OpenAI's pattern only.
    for name in ("get weather", "get_weather\n", "<|call|>", "a" * 65, "caf\u00e9"):
        tool = {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        assert_openai_400(chat(scripted, {"messages": USER, "tools": [tool]}), "tools[0].name", "not a valid")
    tool = {"type": "function", "function": {"name": "get-weather_2", "parameters": {"type": "object"}}}
    assert chat(scripted, {"messages": USER, "tools": [tool]}).status_code == 200


def test_max_tokens_beyond_the_context_is_a_400_on_openai_routes_and_clamped_on_workers_ai(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    assert_openai_400(chat(scripted, {"messages": USER, "max_tokens": 10**12}), "max_tokens", "too large")
    assert_openai_400(
        chat(scripted, {"messages": USER, "max_completion_tokens": 2048}), "max_completion_tokens", "at most"
    )
    r = httpx.post(scripted.v1 + "/responses", json={"input": "hi", "max_output_tokens": 10**9}, timeout=30)
    assert_openai_400(r, "max_output_tokens")
    r = httpx.post(scripted.v1 + "/completions", json={"prompt": "hi", "max_tokens": 5000}, timeout=30)
    assert_openai_400(r, "max_tokens")
    assert chat(scripted, {"messages": USER, "max_tokens": 100}).status_code == 200
    # Workers AI's own route clamps, as Workers AI does.
    r = httpx.post(f"{scripted.base_url}/ai/run/{MODEL}", json={"messages": USER, "max_tokens": 10**12}, timeout=30)
    assert r.status_code == 200, r.text
    assert 0 < scripted.engine.requests[-1][2].max_tokens < 2048


def test_prompt_size_is_limited_before_tokenizing(scripted):
    """A prompt longer than 8 characters per context token (16,384 here) is refused without being tokenized
    or rendered (a 31 MB prompt held a CPU for a minute and left gigabytes resident, to answer 400)."""
    huge = "x" * 20_000
    for path, body, param in (
        ("/chat/completions", {"messages": [{"role": "user", "content": huge}]}, "messages"),
        ("/responses", {"input": huge}, "input"),
        ("/completions", {"prompt": huge}, "prompt"),
    ):
        r = httpx.post(scripted.v1 + path, json=body, timeout=30)
        assert_openai_400(r, param, "characters long")
    r = httpx.post(f"{scripted.base_url}/ai/run/{MODEL}", json={"prompt": huge, "raw": True}, timeout=30)
    assert r.status_code == 413 and r.json()["errors"][0]["code"] == 3006
    assert scripted.engine.requests == []


# ---- the event loop stays free -----------------------------------------------------------------------------


def test_health_answers_quickly_while_a_request_is_prepared(scripted, monkeypatch):
    """Rendering, tokenizing and grammar compiles run on a worker pool: a request whose preparation takes 2 s
    (here made slow on purpose) no longer holds /health or anyone else for that long."""
    import gptoss.server.openai_chat as openai_chat

    real = openai_chat.chat_prompt_ids

    def slow_render(*args, **kwargs):
        time.sleep(2.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(openai_chat, "chat_prompt_ids", slow_render)
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    slow = threading.Thread(target=lambda: chat(scripted, {"messages": USER}))
    slow.start()
    time.sleep(0.2)  # the slow request is being prepared
    latencies = []
    with httpx.Client() as client:
        while slow.is_alive() and len(latencies) < 10:
            start = time.perf_counter()
            assert client.get(scripted.base_url + "/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
    slow.join()
    assert len(latencies) >= 5
    assert statistics.median(latencies) < 0.1 and max(latencies) < 1.0, latencies


def test_health_is_unhealthy_when_every_step_fails_and_answers_head(live_server):
    engine = live_server.engine.engine  # the LLMEngine under the AsyncEngine
    assert httpx.head(live_server.base_url + "/health").status_code == 200
    engine.consecutive_failed_steps, engine.last_step_error = 3, "model step failed: boom"
    try:
        r = httpx.get(live_server.base_url + "/health")
        assert r.status_code == 503 and "3 model steps all failed" in r.json()["status"]
        assert httpx.head(live_server.base_url + "/health").status_code == 503
    finally:
        engine.consecutive_failed_steps = 0
    assert httpx.get(live_server.base_url + "/health").status_code == 200


def test_no_redirect_built_from_the_host_header(scripted):
    r = httpx.post(
        scripted.v1 + "/chat/completions/", json={"messages": USER}, headers={"Host": "evil.example"}, timeout=30
    )
    assert r.status_code == 404 and "location" not in r.headers


# ---- grammar compiles ----------------------------------------------------------------------------------


def test_grammar_compiles_are_bounded(scripted, monkeypatch):
    pytest.importorskip("llguidance")
    schema = {"type": "object", "properties": {"a": {"type": "array", "minItems": 10**9}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    r = chat(scripted, {"messages": USER, "response_format": fmt})
    assert_openai_400(r, "response_format.json_schema.schema", "minItems 1000000000")
    # A schema too large to render into this server's prompt is refused before rendering, naming the field.
    alternatives = [{"oneOf": [{"const": f"v{i}_{j}_{k}"} for k in range(30)]} for i in range(30) for j in range(30)]
    huge = {"type": "object", "properties": {"p": {"oneOf": alternatives}}}
    text_format = {"type": "json_schema", "name": "x", "schema": huge, "strict": True}
    r = httpx.post(scripted.v1 + "/responses", json={"input": "hi", "text": {"format": text_format}}, timeout=60)
    assert_openai_400(r, "text.format", "characters long")
    # A compile that runs past the timeout (made slow here): a 400 naming the tool, right after the timeout.
    real = scripted.engine.compile_grammar
    monkeypatch.setattr(scripted.engine, "compile_grammar", lambda spec: (time.sleep(3), real(spec)))
    monkeypatch.setattr(scripted.app.state.server, "grammar_timeout_s", 0.3)
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "object"}}}
    start = time.perf_counter()
    r = chat(scripted, {"messages": USER, "tools": [tool], "tool_choice": "required"})
    assert r.status_code == 400 and "did not compile within 0.3 s" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"].startswith("tools")
    assert time.perf_counter() - start < 2.5
    assert scripted.engine.requests == []


# ---- admission -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def queue8() -> LiveServer:
    return scripted_server_for("queue8", max_queue=8)


def run(server: LiveServer, body: dict, queue: bool = False) -> httpx.Response:
    params = {"queueRequest": "true"} if queue else None
    return httpx.post(f"{server.base_url}/ai/run/{MODEL}", json=body, params=params, timeout=60)


def test_every_admission_path_counts_per_request(queue8):
    """With --max-queue 8, six queued batches of 256 were accepted and an ordinary request then waited 41 s;
    a batch counted as one request. Now a batch of n is n requests, queued or not."""
    engine = queue8.engine
    engine.script, engine.delay = encode(queue8.tokenizer, HARMONY_ANSWER), 0.05
    state = queue8.app.state.server
    r = run(queue8, {"requests": [{"prompt": "x"}] * 9})
    assert r.status_code == 400 and "exceed this server's queue of 8" in r.json()["errors"][0]["message"]
    r = run(queue8, {"requests": [{"prompt": "x"}] * 9}, queue=True)
    assert r.status_code == 400
    queued = run(queue8, {"requests": [{"prompt": "x"}] * 6}, queue=True)
    assert queued.status_code == 200 and state.metrics.in_flight == 6
    for refused in (
        run(queue8, {"requests": [{"prompt": "x"}] * 3}, queue=True),
        run(queue8, {"requests": [{"prompt": "x"}] * 3}),
    ):
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["errors"][0]["code"] == 3040
    assert run(queue8, {"prompt": "x"}).status_code == 200  # 7 of 8: an ordinary request still fits
    request_id = queued.json()["result"]["request_id"]
    deadline = time.monotonic() + 30
    while "results" not in run(queue8, {"request_id": request_id}).json()["result"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state.metrics.in_flight == 0  # the queued batch held its admission until it had run


# ---- connections ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server():
    """A server with tiny connection limits: 8 connections, 0.5 s to send the headers."""
    import uvicorn
    from gptoss.server.app import create_app
    from gptoss.server.connections import uvicorn_config

    from tests.server_helpers import ScriptedEngine, build_tiny_tokenizer, free_port

    tokenizer = build_tiny_tokenizer()
    port = free_port()
    app = create_app(ScriptedEngine(tokenizer), tokenizer, max_model_len=2048)
    config = uvicorn_config(
        app, "127.0.0.1", port, max_connections=8, header_timeout_s=0.5, log_level="critical", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(10)


def half_sent(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # the headers never end
    return sock


def test_slow_headers_are_timed_out_and_connections_are_capped(guarded_server):
    base, port = guarded_server
    slow = [half_sent(port) for _ in range(8)]
    # Past the cap: a new connection is answered 503 at once and closed (descriptors stay bounded).
    with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
        answer = extra.recv(4096)
    assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
    # The half-sent requests are answered 408 and closed after the header timeout.
    start = time.perf_counter()
    for sock in slow:
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        assert sock.recv(4096) == b""
        sock.close()
    assert time.perf_counter() - start < 3
    # Then the server serves again, including on a kept-alive connection.
    with httpx.Client() as client:
        for _ in range(3):
            assert client.get(base + "/health").status_code == 200


def test_a_kept_alive_connection_gets_the_header_timeout_too(guarded_server):
    _, port = guarded_server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):  # the whole first response, however it is split
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the second request's headers never end
        start = time.perf_counter()
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        assert time.perf_counter() - start < 3


def test_a_burst_of_one_log_message_is_one_line():
    from gptoss.server.connections import RepeatFilter

    log = logging.getLogger("test.burst")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    repeat = RepeatFilter(window_s=0.3)
    log.addHandler(handler)
    log.addFilter(repeat)
    log.propagate = False
    try:
        for _ in range(1000):
            log.error("socket.accept() out of system resource")
        log.error("another message")
        time.sleep(0.35)
        log.error("socket.accept() out of system resource")
    finally:
        log.removeHandler(handler)
        log.removeFilter(repeat)
    assert seen == [
        "socket.accept() out of system resource",
        "another message",
        "socket.accept() out of system resource (and 999 more like it in the last 0.3 s)",
    ]


def test_large_texts_are_tokenized_in_worker_processes_with_the_same_ids():
    """`tokenizers` holds the GIL while it encodes (a 1 MB prompt on a worker thread still stalled /health for
    1-2 s), so large texts go to worker processes; the ids are exactly the in-process ones."""
    from gptoss.engine.harmony.render import HarmonyEncoding
    from gptoss.engine.tokenizer import build_tiny_tokenizer
    from gptoss.server.tokenizer_pool import PooledHarmonyEncoding

    tokenizer = build_tiny_tokenizer()
    local, pooled = HarmonyEncoding(tokenizer), PooledHarmonyEncoding(tokenizer, min_pooled_chars=100)
    try:
        texts = [
            "Hello, world! The quick brown fox. " * 40,
            "special <|end|> spellings stay text here; 日本語 and emoji 🙂 " * 20,
        ]
        for text in texts:
            assert pooled.encode_text(text) == local.encode_text(text)
            assert pooled.encode_raw(text) == tokenizer.encode(text, add_special_tokens=False).ids
        assert pooled._started == 1  # one worker process did all of it
        assert pooled.encode_text("short") == local.encode_text("short")  # small texts stay in-process
    finally:
        pooled.shutdown()
