"""Bad input on every API: a 4xx in that API's own error shape naming the field, never a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.server_helpers import HARMONY_ANSWER, encode, scripted_server_for

pytest_plugins = ["tests.server_fixtures"]

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
LONG = "word " * 2500  # > the scripted server's 2048-token context

CHAT_CASES = [
    # (body, status, param)
    ({"messages": USER, "temperature": 9}, 400, "temperature"),
    ({"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ({"messages": USER, "top_p": 0}, 400, "top_p"),
    ({"messages": USER, "top_k": -2}, 400, "top_k"),
    ({"messages": USER, "seed": 2**63}, 400, "seed"),
    ({"messages": USER, "seed": -(2**63) - 1}, 400, "seed"),
    ({"messages": USER, "temperature": 2.5}, 400, "temperature"),
    ({"messages": USER, "repetition_penalty": -1}, 400, "repetition_penalty"),
    ({"messages": USER, "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"messages": USER, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": USER, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ({"messages": USER, "n": 0}, 400, "n"),
    ({"messages": USER, "stream": "yes"}, 400, "stream"),
    ({"messages": USER, "top_logprobs": 30, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": USER, "stop": [""]}, 400, "stop"),
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": [*USER, {"role": "tool", "tool_call_id": "nope", "content": "x"}]}, 400, "messages[1].tool_call_id"),
    ({"messages": USER, "model": "gpt-5"}, 404, "model"),
    ({"messages": USER, "tools": {"a": 1}}, 400, "tools"),
    (
        {"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
        400,
        "tools[0].parameters",
    ),
    ({"messages": USER, "tools": [{"type": "function", "function": {"description": "no name"}}]}, 400, "tools[0].name"),
    (
        {"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        400,
        "tool_choice",
    ),
    ({"messages": USER, "tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    (
        {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        400,
        "response_format.json_schema.schema",
    ),
    ({"messages": USER, "reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ({"messages": USER, "reasoning": {"effort": "extreme"}}, 400, "reasoning.effort"),
    (
        {
            "messages": USER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "strict": True,
                    "schema": {"type": "object", "properties": {"a": {"minimum": "low"}}},
                },
            },
        },
        400,
        "response_format.json_schema.schema",
    ),
    ({"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
]


@pytest.mark.parametrize(("body", "status", "param"), CHAT_CASES)
def test_chat_bad_input(scripted, body, status, param):
    r = httpx.post(scripted.v1 + "/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": ""}, "input"),
        ({"input": 5}, "input"),
        ({"input": [{"type": "telepathy"}]}, "input[0].type"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "reasoning": {"effort": "max"}}, "reasoning.effort"),
        ({"input": "hi", "tools": [{"type": "function", "parameters": {}}]}, "tools[0].name"),
        ({"input": "hi", "temperature": -1}, "temperature"),
    ],
)
def test_responses_bad_input(scripted, body, param):
    r = httpx.post(scripted.v1 + "/responses", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "logprobs": 25}, "logprobs"),
        ({"prompt": [1, 2, 99999]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": LONG}, "prompt"),
    ],
)
def test_completions_bad_input(scripted, body, param):
    r = httpx.post(scripted.v1 + "/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("content", [b"{not json", b"", b"[1, 2]", b'"text"'])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/completions", "/tokenize"])
def test_openai_invalid_json(scripted, path, content):
    r = httpx.post(scripted.base_url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def check_envelope(r, status: int, code: int, contains: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["result"] is None and body["messages"] == []
    assert body["errors"][0]["code"] == code
    if code == 5006:
        assert body["errors"][0]["message"].startswith("AiError: Bad input: ")
    if contains is not None:
        assert contains in body["errors"][0]["message"]


@pytest.mark.parametrize(
    ("body", "contains"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "temperature": 6}, "temperature"),
        ({"prompt": "hi", "top_k": 100}, "top_k"),
        ({"prompt": "hi", "seed": 0}, "seed"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "raw": "yes"}, "raw"),
        ({"prompt": "hi", "messages": USER}, "messages"),
        ({"messages": [{"role": "alien", "content": "x"}]}, "messages[0].role"),
        ({"input": "hi", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
        ({"prompt": "hi", "reasoning": {"effort": "huge"}}, "reasoning.effort"),
        ({"requests": []}, "requests"),
        ({"request_id": "no-such-id"}, "request_id"),
    ],
)
def test_workers_ai_bad_input(scripted, body, contains):
    r = httpx.post(scripted.base_url + "/ai/run/@cf/openai/gpt-oss-120b", json=body)
    check_envelope(r, 400, 5006, contains)


def test_workers_ai_invalid_json_and_unknown_model(scripted):
    r = httpx.post(scripted.base_url + "/ai/run/@cf/openai/gpt-oss-120b", content=b"{oops")
    check_envelope(r, 400, 5006)
    r = httpx.post(scripted.base_url + "/ai/run/@cf/meta/llama-3", json={"prompt": "hi"})
    check_envelope(r, 400, 5007)
    r = httpx.post(scripted.base_url + "/client/v4/accounts/x/ai/run/@cf/meta/llama-3", json={"prompt": "hi"})
    check_envelope(r, 400, 5007)


def test_workers_ai_prompt_too_long(scripted):
    r = httpx.post(scripted.base_url + "/ai/run/@cf/openai/gpt-oss-120b", json={"prompt": LONG})
    check_envelope(r, 413, 3006)


def test_unknown_route_and_method(scripted):
    r = httpx.get(scripted.base_url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(scripted.v1 + "/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_engine_overloaded_is_503_with_retry_after(scripted):
    scripted.engine.overloaded = True
    r = httpx.post(scripted.v1 + "/chat/completions", json={"messages": USER, "stream": True})
    assert r.status_code == 503 and r.headers["retry-after"]
    r = httpx.post(scripted.base_url + "/ai/run/@cf/openai/gpt-oss-120b", json={"prompt": "hi"})
    check_envelope(r, 429, 3040)


@pytest.fixture(scope="module")
def small_server():
    return scripted_server_for("small", max_queue=1, max_body_bytes=10_000)


def test_full_queue_is_429(small_server):
    small_server.engine.script = encode(small_server.tokenizer, HARMONY_ANSWER) * 20
    small_server.engine.delay = 0.02
    with httpx.stream(
        "POST",
        small_server.v1 + "/chat/completions",
        json={"messages": USER, "stream": True, "max_tokens": 400},
        timeout=30,
    ) as first:
        assert first.status_code == 200
        r = httpx.post(small_server.v1 + "/chat/completions", json={"messages": USER})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        r = httpx.post(small_server.base_url + "/ai/run/@cf/openai/gpt-oss-120b", json={"prompt": "hi"})
        check_envelope(r, 429, 3040)
    small_server.engine.delay = 0.0


def test_body_too_large_is_413(small_server):
    r = httpx.post(small_server.v1 + "/chat/completions", json={"messages": [{"role": "user", "content": "x" * 20000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(small_server.base_url + "/ai/run/@cf/openai/gpt-oss-120b", json={"prompt": "x" * 20000})
    check_envelope(r, 413, 3006)

    def chunked():  # no Content-Length: the limit is applied while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(small_server.v1 + "/chat/completions", content=chunked())
    assert r.status_code == 413


OUT_OF_RANGE = [  # every parameter of the api.md table, just outside its range on both kinds of route
    ("temperature", -0.1),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("repetition_penalty", -0.1),
    ("frequency_penalty", -2.1),
    ("frequency_penalty", 2.1),
    ("presence_penalty", -2.1),
    ("presence_penalty", 2.1),
    ("max_tokens", 0),
    ("max_tokens", 1.5),
    ("stream", "yes"),
    ("raw", "yes"),
]
# Out of the Workers AI table's range, within OpenAI's (api.md: OpenAI routes take OpenAI's ranges).
WORKERS_AI_ONLY = [
    ("temperature", 5.1),  # above OpenAI's 2 as well
    ("top_p", 0.0005),
    ("top_k", 0),
    ("top_k", 51),
    ("seed", 0),
    ("seed", 10_000_000_000),
    ("repetition_penalty", 2.1),
]
WAI_BODIES = {"prompt": {"prompt": "hi"}, "messages": {"messages": USER}, "input": {"input": "hi"}}
WAI_URL = "/ai/run/@cf/openai/gpt-oss-120b"


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE + WORKERS_AI_ONLY)
def test_out_of_range_on_every_shape(scripted, field, value):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    openai_rejects = (field, value) in OUT_OF_RANGE or field == "temperature"
    if field != "raw":
        r = httpx.post(scripted.v1 + "/chat/completions", json={"messages": USER, field: value})
        assert r.status_code == (400 if openai_rejects else 200), r.text
        if openai_rejects:
            assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
        responses_field = "max_output_tokens" if field == "max_tokens" else field
        r = httpx.post(scripted.v1 + "/responses", json={"input": "hi", responses_field: value})
        assert r.status_code == (400 if openai_rejects else 200), r.text
        if openai_rejects:
            assert r.json()["error"]["param"] == responses_field
    for kind, body in WAI_BODIES.items():
        if field == "raw" and kind != "prompt":
            continue
        r = httpx.post(scripted.base_url + WAI_URL, json={**body, field: value})
        check_envelope(r, 400, 5006, field)
    # A batch item is validated with the run route's ranges too, and fails alone.
    r = httpx.post(scripted.base_url + WAI_URL, json={"requests": [{"prompt": "a", field: value}, {"prompt": "b"}]})
    assert r.status_code == 200, r.text
    results = r.json()["result"]["results"] if "results" in r.json()["result"] else r.json()["result"]
    assert len(results) == 2


def test_openai_ranges_on_openai_routes(scripted):
    """What eval harnesses and OpenAI clients send: seed 0 (or negative), top_k above 50, temperature up to 2."""
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    for extra in ({"seed": 0}, {"seed": -5}, {"seed": 2**63 - 1}, {"top_k": 200}, {"top_k": -1}, {"temperature": 2}):
        r = httpx.post(scripted.v1 + "/chat/completions", json={"messages": USER, **extra})
        assert r.status_code == 200, (extra, r.text)
        r = httpx.post(scripted.v1 + "/completions", json={"prompt": "hi", "max_tokens": 2, **extra})
        assert r.status_code == 200, (extra, r.text)
        r = httpx.post(scripted.base_url + "/client/v4/accounts/a/ai/v1/responses", json={"input": "hi", **extra})
        assert r.status_code == 200, (extra, r.text)
    r = httpx.post(scripted.v1 + "/chat/completions", json={"messages": USER, "temperature": 2.01})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(scripted.base_url + WAI_URL, json={"prompt": "hi", "temperature": 4})
    assert r.status_code == 200, r.text


def test_edges_of_the_ranges_are_accepted(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    edges = {
        "temperature": 5,
        "top_p": 0.001,
        "top_k": 50,
        "seed": 9_999_999_999,
        "repetition_penalty": 0,
        "frequency_penalty": -2,
        "presence_penalty": 2,
        "max_tokens": 1,
    }
    for body in WAI_BODIES.values():
        r = httpx.post(scripted.base_url + "/ai/run/@cf/openai/gpt-oss-120b", json={**body, **edges})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/v1/responses",
        "/ai/run/@cf/openai/gpt-oss-120b",
        "/client/v4/accounts/a/ai/v1/responses",
        "/client/v4/accounts/a/ai/v1/chat/completions",
    ],
)
def test_wrong_content_type_bad_bytes_and_non_objects(scripted, path):
    for kwargs in (
        {"data": {"messages": "hi"}},
        {"content": b"\xff\xfe", "headers": {"content-type": "text/plain"}},
        {"content": b"<xml/>", "headers": {"content-type": "application/xml"}},
        {"content": b"[1, 2]"},
        {"content": b"null"},
        {"content": b'"text"'},
    ):
        r = httpx.post(scripted.base_url + path, **kwargs)
        assert r.status_code == 400, r.text
        body = r.json()
        if path.startswith("/v1/"):
            assert set(body["error"]) == {"message", "type", "param", "code"}
        else:
            assert body["success"] is False and body["errors"][0]["code"] == 5006


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/responses", {"input": LONG}, 400),
        ("/v1/responses", {"input": LONG, "stream": True}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}], "stream": True}, 400),
        ("/ai/run/@cf/openai/gpt-oss-120b", {"messages": [{"role": "user", "content": LONG}]}, 413),
        ("/ai/run/@cf/openai/gpt-oss-120b", {"input": LONG}, 413),
        ("/ai/run/@cf/openai/gpt-oss-120b", {"prompt": LONG, "stream": True}, 413),
        ("/ai/run/@cf/openai/gpt-oss-120b", {"prompt": LONG, "raw": True}, 413),
        ("/client/v4/accounts/a/ai/v1/responses", {"input": LONG}, 413),
    ],
)
def test_prompt_longer_than_the_context(scripted, path, body, status):
    r = httpx.post(scripted.base_url + path, json=body)
    assert r.status_code == status, r.text
    if path.startswith("/v1/"):
        assert r.json()["error"]["code"] == "context_length_exceeded"
    else:
        check_envelope(r, 413, 3006)


def test_edges_of_the_ranges_real_engine(live_server):
    edges = {
        "temperature": 5,
        "top_p": 0.001,
        "top_k": 50,
        "seed": 9_999_999_999,
        "repetition_penalty": 0,
        "frequency_penalty": -2,
        "presence_penalty": 2,
        "max_tokens": 2,
    }
    r = httpx.post(
        live_server.base_url + "/ai/run/@cf/openai/gpt-oss-120b", json={"prompt": "hi", **edges}, timeout=120
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        live_server.v1 + "/chat/completions", timeout=120, json={"messages": USER, **edges, "temperature": 0, "n": 2}
    )
    assert r.status_code == 200, r.text
    openai_edges = {"temperature": 2, "top_k": 1000, "seed": 0, "top_p": 1e-9, "max_tokens": 2, "n": 2}
    r = httpx.post(live_server.v1 + "/chat/completions", timeout=120, json={"messages": USER, **openai_edges})
    assert r.status_code == 200, r.text
