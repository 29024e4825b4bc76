"""Models, health, metrics, tokenize/detokenize, auth, legacy completions and client disconnects."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest
from openai import AuthenticationError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.server_helpers import API_KEY, HARMONY_ANSWER, encode

pytest_plugins = ["tests.server_fixtures"]


def client(server, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=60)


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


def test_models(scripted):
    models = client(scripted).models.list()
    assert {m.id for m in models.data} == {"gpt-oss-120b", "@cf/openai/gpt-oss-120b"}
    assert client(scripted).models.retrieve("gpt-oss-120b").id == "gpt-oss-120b"
    assert httpx.get(scripted.v1 + "/models/@cf/openai/gpt-oss-120b").status_code == 200
    assert httpx.get(scripted.v1 + "/models/other").status_code == 404


def test_health_follows_engine(scripted):
    assert httpx.get(scripted.base_url + "/health").status_code == 200
    scripted.engine.alive = False
    assert httpx.get(scripted.base_url + "/health").status_code == 503
    scripted.engine.alive = True


def test_tokenize_detokenize(scripted):
    tok = httpx.post(scripted.base_url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["tokens"] == encode(scripted.tokenizer, "Hello world") and tok["count"] == len(tok["tokens"])
    detok = httpx.post(scripted.base_url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == "Hello world"
    messages = [{"role": "user", "content": "hi"}]
    with_prompt = httpx.post(scripted.base_url + "/tokenize", json={"messages": messages}).json()
    without = httpx.post(
        scripted.base_url + "/tokenize", json={"messages": messages, "add_generation_prompt": False}
    ).json()
    assert with_prompt["tokens"][: without["count"]] == without["tokens"]
    assert with_prompt["count"] == without["count"] + len(encode(scripted.tokenizer, "<|start|>assistant"))
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    client(scripted).chat.completions.create(model="gpt-oss-120b", messages=messages, reasoning_effort="high")
    effort = httpx.post(scripted.base_url + "/tokenize", json={"messages": messages, "reasoning_effort": "high"})
    assert effort.json()["tokens"] == scripted.engine.requests[-1][1]  # exactly what the chat request got
    assert httpx.post(scripted.base_url + "/detokenize", json={"tokens": [10**6]}).status_code == 400


def test_auth(auth_server):
    assert httpx.get(auth_server.base_url + "/health").status_code == 200  # /health is open
    with pytest.raises(AuthenticationError):
        client(auth_server, "wrong").models.list()
    assert client(auth_server, API_KEY).models.list().data
    r = httpx.post(auth_server.base_url + "/ai/run/@cf/openai/gpt-oss-120b", json={"prompt": "hi"})
    assert r.status_code == 401 and r.json()["errors"][0]["code"] == 10000
    r = httpx.get(auth_server.base_url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(auth_server.base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200


def test_serve_arguments(monkeypatch):
    import argparse

    from gptoss.server.app import add_serve_arguments

    monkeypatch.setenv("GPTOSS_API_KEY", "from-env")
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args([])
    assert (args.host, args.port, args.served_model_name, args.api_key) == (
        "127.0.0.1",
        8000,
        "gpt-oss-120b",
        "from-env",
    )


# ---- legacy completions on the real engine ----


def test_completions_echo_logprobs_real_engine(live_server):
    c = client(live_server)
    prompt = "The capital of France is Paris"
    n_prompt = len(encode(live_server.tokenizer, prompt))
    out = c.completions.create(model="gpt-oss-120b", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = out.choices[0]
    assert choice.text == prompt
    assert len(choice.logprobs.tokens) == n_prompt and choice.logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens == 0
    out = c.completions.create(
        model="gpt-oss-120b", prompt=[prompt, "Hello"], max_tokens=3, echo=True, logprobs=2, temperature=0
    )
    assert len(out.choices) == 2 and out.choices[0].text.startswith(prompt)
    assert len(out.choices[0].logprobs.tokens) == n_prompt + 3
    assert len(out.choices[1].logprobs.top_logprobs[-1]) == 2


def test_completions_stream_real_engine(live_server):
    chunks = list(
        client(live_server).completions.create(
            model="gpt-oss-120b", prompt="Hello", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


# ---- disconnects and metrics ----


def test_disconnect_mid_stream_frees_blocks(live_server):
    base = live_server.base_url
    # The server is shared by the module's tests: count this request's tokens only.
    generated_before = metric(httpx.get(base + "/metrics").text, "gptoss_engine_generation_tokens_total")
    with httpx.stream(
        "POST",
        base + "/v1/chat/completions",
        timeout=60,
        json={
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 1500,
            "stream": True,
            "temperature": 1.0,
        },
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)  # the role chunk: the request is running
        deadline = time.monotonic() + 20
        while metric(httpx.get(base + "/metrics").text, "gptoss_engine_num_running") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # The client is gone: the server aborts the request and the engine frees its blocks.
    deadline = time.monotonic() + 20
    while True:
        text = httpx.get(base + "/metrics").text
        used = sum(float(v) for v in re.findall(r"^gptoss_engine_kv_blocks_used\{[^}]*\} (\S+)$", text, re.M))
        if metric(text, "gptoss_engine_num_running") == 0 and used == 0:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    assert metric(text, "gptoss_requests_aborted_total") >= 1
    assert metric(text, "gptoss_requests_in_flight") == 0
    generated = metric(text, "gptoss_engine_generation_tokens_total") - generated_before
    assert generated < 1500  # stopped early: not run to max_tokens


def test_metrics_content(live_server):
    before = httpx.get(live_server.base_url + "/metrics").text
    for _ in range(3):
        client(live_server).chat.completions.create(
            model="gpt-oss-120b", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
        )
    r = httpx.get(live_server.base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # prometheus_client's own parser
    assert metric(text, "gptoss_requests_total", '{endpoint="/v1/chat/completions",status="200"}') >= 3
    for name in ("gptoss_time_to_first_token_seconds_count", "gptoss_request_latency_seconds_count"):
        assert metric(text, name) - metric(before, name) == 3, name
    assert metric(text, "gptoss_inter_token_latency_seconds_count") >= 1
    vllm = '{model_name="gpt-oss-120b"}'
    assert metric(text, "vllm:e2e_request_latency_seconds_count", vllm) == metric(
        text, "gptoss_request_latency_seconds_count"
    )
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits",
        "vllm:prefix_cache_queries",
    ):
        assert name in families, name
    for name in (
        "gptoss_engine_num_waiting",
        "gptoss_engine_prefix_hit_tokens_total",
        "gptoss_generation_tokens_per_second",
    ):
        assert metric(text, name) >= 0
    assert re.search(r'^gptoss_engine_kv_blocks_free\{group="[^"]+"\} \d+', text, re.M)


def test_bounded_store_capacity_and_expiry(monkeypatch):
    from gptoss.server import state as state_module

    now = [100.0]
    monkeypatch.setattr(state_module.time, "monotonic", lambda: now[0])
    store = state_module.BoundedStore(capacity=2, ttl_s=10.0)
    store.put("a", 1)
    store.put("b", 2)
    store.put("c", 3)
    assert store.get("a") is None and store.get("b") == 2 and len(store) == 2  # oldest forgotten
    now[0] += 11
    assert store.get("c") is None and len(store) == 0  # expired


def test_completions_ignore_eos_reaches_the_engine(scripted):
    scripted.engine.script = encode(scripted.tokenizer, "Hello there")
    for flag in (True, False):
        httpx.post(
            scripted.v1 + "/completions", timeout=30, json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": flag}
        ).raise_for_status()
        assert scripted.engine.requests[-1][2].ignore_eos is flag


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("POST", "/v1/responses", {"input": "hi"}),
        ("POST", "/v1/completions", {"prompt": "hi"}),
        ("GET", "/v1/models", None),
        ("POST", "/ai/run/@cf/openai/gpt-oss-120b", {"prompt": "hi", "stream": True}),
        ("POST", "/client/v4/accounts/a/ai/run/@cf/openai/gpt-oss-120b", {"prompt": "hi"}),
        ("POST", "/client/v4/accounts/a/ai/v1/responses", {"input": "hi"}),
        ("POST", "/client/v4/accounts/a/ai/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_auth_refusals_in_each_shape(auth_server, method, path, body, headers):
    r = httpx.request(method, auth_server.base_url + path, json=body, headers=headers)
    assert r.status_code == 401, r.text
    if path.startswith("/v1/"):
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    else:
        assert r.json()["success"] is False and r.json()["result"] is None
        assert r.json()["errors"][0]["code"] == 10000


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("/v1/responses", {"input": "hi", "stream": True}),
        ("/v1/completions", {"prompt": "hi", "stream": True}),
        ("/ai/run/@cf/openai/gpt-oss-120b", {"prompt": "hi", "stream": True}),
        ("/ai/run/@cf/openai/gpt-oss-120b", {"prompt": "hi", "stream": True, "raw": True}),
        ("/ai/run/@cf/openai/gpt-oss-120b", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/ai/run/@cf/openai/gpt-oss-120b", {"input": "hi"}),
    ],
)
def test_disconnect_aborts_the_request(scripted, path, body):
    engine = scripted.engine
    engine.script, engine.delay = encode(scripted.tokenizer, HARMONY_ANSWER) * 40, 0.02
    aborted = len(engine.aborted)
    if body.get("stream"):
        with httpx.stream("POST", scripted.base_url + path, json={**body, "max_tokens": 1000}, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
    else:  # hang up once the engine has the request (a client timeout could fire before it got there)
        data = json.dumps({**body, "max_tokens": 1000}).encode()
        submitted = len(engine.requests)
        with socket.create_connection(("127.0.0.1", int(scripted.base_url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            deadline = time.monotonic() + 10
            while len(engine.requests) == submitted:
                assert time.monotonic() < deadline
                time.sleep(0.01)
    deadline = time.monotonic() + 10
    while len(engine.aborted) == aborted or engine.active:
        assert time.monotonic() < deadline, (engine.aborted, engine.active)
        time.sleep(0.02)
    assert len(engine.requests[-1]) and engine.requests[-1][0] in engine.aborted
    engine.delay = 0.0


def test_completions_frames_validate_with_openai_types(scripted):
    from openai.types import Completion

    scripted.engine.script = encode(scripted.tokenizer, "Hello there")
    body = {"prompt": ["Hi", "Yo"], "max_tokens": 4, "n": 2, "logprobs": 1}
    Completion.model_validate(httpx.post(scripted.v1 + "/completions", json=body, timeout=30).json())
    frames = []
    with httpx.stream(
        "POST",
        scripted.v1 + "/completions",
        timeout=30,
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    for frame in frames[:-1]:
        chunk = json.loads(frame)
        for choice in chunk["choices"]:  # OpenAI streams finish_reason null, which the type cannot express
            choice["finish_reason"] = choice["finish_reason"] or "stop"
        Completion.model_validate(chunk)
    assert json.loads(frames[-2])["choices"] == [] and json.loads(frames[-2])["usage"]["completion_tokens"] == 12
    assert {c["index"] for f in frames[:-2] for c in json.loads(f)["choices"]} == {0, 1, 2, 3}
