"""Workers AI run route (/ai/run/{model}) and the /client/v4/accounts/... aliases, driven with httpx."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.server_helpers import HARMONY_ANSWER, HARMONY_TOOL_CALL, WEATHER_TOOL, encode

pytest_plugins = ["tests.server_fixtures"]

MODEL = "@cf/openai/gpt-oss-120b"
FLAT_TOOL = {
    "name": "get_weather",
    "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
}


def run(server, body, *, model=MODEL, params=None, prefix=""):
    return httpx.post(f"{server.base_url}{prefix}/ai/run/{model}", json=body, params=params, timeout=60)


def sse_frames(server, body, *, model=MODEL) -> list:
    frames = []
    with httpx.stream("POST", f"{server.base_url}/ai/run/{model}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                frames.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return frames


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    return body["result"]


# ---- real engine ----


def test_prompt_real_engine(live_server):
    result = ok(run(live_server, {"prompt": "Hello", "max_tokens": 4}))
    assert set(result) == {"response", "usage", "tool_calls"}
    assert isinstance(result["response"], str) and result["tool_calls"] == []
    assert result["usage"]["completion_tokens"] <= 4 and result["usage"]["prompt_tokens"] > 10


def test_raw_prompt_real_engine(live_server):
    result = ok(run(live_server, {"prompt": "Hello world", "raw": True, "max_tokens": 3}))
    assert result["usage"]["prompt_tokens"] == len(encode(live_server.tokenizer, "Hello world"))
    assert result["usage"]["completion_tokens"] == 3


def test_messages_and_input_real_engine(live_server):
    chat = ok(run(live_server, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}))
    assert chat["object"] == "chat.completion" and chat["model"] == MODEL
    resp = ok(
        run(
            live_server,
            {
                "input": "Hi",
                "instructions": "Be brief",
                "max_tokens": 3,
                "reasoning": {"effort": "high", "summary": "auto"},
            },
        )
    )
    assert resp["object"] == "response" and resp["usage"]["output_tokens"] <= 3
    assert resp["reasoning"]["effort"] == "high"


def test_prompt_stream_real_engine(live_server):
    # Greedy: a sampled stop token (the random model's vocabulary has several) would end the stream early.
    frames = sse_frames(live_server, {"prompt": "Hi", "raw": True, "max_tokens": 4, "temperature": 0})
    assert frames[-1] == "[DONE]"
    trailer = frames[-2]
    assert trailer["response"] == "" and trailer["usage"]["completion_tokens"] == 4
    for frame in frames[:-2]:
        assert set(frame) == {"response", "p"} and frame["p"]


# ---- scripted engine ----


def test_prompt_format_with_tool_call(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_TOOL_CALL)
    result = ok(run(scripted, {"prompt": "Weather in Paris?", "tools": [FLAT_TOOL]}))
    assert result["tool_calls"] == [{"name": "get_weather", "arguments": {"location": "Paris"}}]
    _, prompt, params = scripted.engine.requests[-1]
    assert params.max_tokens == 256 and params.temperature == 0.6
    assert "Reasoning: medium" in scripted.tokenizer.decode(prompt, skip_special_tokens=False)


def test_prompt_format_answer(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    result = ok(run(scripted, {"prompt": "hi", "temperature": 0, "max_tokens": 100}))
    assert result["response"] == "Hi there"
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]


def test_raw_prompt_is_untemplated(scripted):
    scripted.engine.script = encode(scripted.tokenizer, "abc")
    ok(run(scripted, {"prompt": "<|start|>user<|message|>hi<|end|>", "raw": True}))
    prompt = scripted.engine.requests[-1][1]
    assert prompt == encode(scripted.tokenizer, "<|start|>user<|message|>hi<|end|>")


@pytest.mark.parametrize("tool", [FLAT_TOOL, WEATHER_TOOL])
def test_messages_tools_both_shapes(scripted, tool):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_TOOL_CALL)
    result = ok(run(scripted, {"messages": [{"role": "user", "content": "Paris?"}], "tools": [tool]}))
    assert result["object"] == "chat.completion"
    call = result["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"])
    assert "type get_weather" in scripted.tokenizer.decode(scripted.engine.requests[-1][1], skip_special_tokens=False)


def test_prompt_stream_frames(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    frames = sse_frames(scripted, {"prompt": "hi"})
    assert "".join(f["response"] for f in frames[:-2]) == "Hi there"
    assert frames[-2]["response"] == "" and frames[-2]["usage"]["completion_tokens"] == len(scripted.engine.script)
    assert frames[-1] == "[DONE]"


def test_messages_stream_frames(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    frames = sse_frames(scripted, {"messages": [{"role": "user", "content": "hi"}]})
    chunks = [f for f in frames[:-2] if f.get("object") == "chat.completion.chunk"]
    assert "".join(c["choices"][0]["delta"].get("reasoning") or "" for c in chunks if c["choices"]) == "think"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Hi there"
    assert frames[-2]["response"] == "" and "usage" in frames[-2] and frames[-1] == "[DONE]"


def test_input_stream_frames(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    frames = sse_frames(scripted, {"input": "hi"})
    types = [f["type"] for f in frames[:-2]]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert frames[-2]["response"] == "" and frames[-2]["usage"]["prompt_tokens"] > 0 and frames[-1] == "[DONE]"


def test_batch_mixed_formats_with_a_bad_item(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    body = {
        "requests": [
            {"prompt": "one", "external_reference": "a"},
            {"messages": [{"role": "user", "content": "two"}], "external_reference": "b"},
            {"input": "three"},
            {"prompt": "bad", "temperature": 9, "external_reference": "d"},
            {"nothing": True},
        ]
    }
    results = ok(run(scripted, body))["results"]
    assert len(results) == 5
    assert results[0]["response"] == "Hi there" and results[0]["external_reference"] == "a"
    assert results[1]["object"] == "chat.completion" and results[1]["external_reference"] == "b"
    assert results[2]["object"] == "response"
    # Items name the model as the direct call does: the path's.
    assert results[1]["model"] == results[2]["model"] == MODEL == ok(run(scripted, {"input": "x"}))["model"]
    assert results[3]["success"] is False and results[3]["errors"][0]["code"] == 5006
    assert "temperature" in results[3]["errors"][0]["message"] and results[3]["external_reference"] == "d"
    assert results[4]["success"] is False


def test_batch_queue_and_poll(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    scripted.engine.delay = 0.02
    queued = ok(
        run(
            scripted,
            {"requests": [{"prompt": "a"}, {"prompt": "b", "external_reference": "x"}]},
            params={"queueRequest": "true"},
        )
    )
    assert queued["status"] == "queued" and queued["model"] == MODEL
    request_id = queued["request_id"]
    statuses = set()
    deadline = time.monotonic() + 20
    while True:
        result = ok(run(scripted, {"request_id": request_id}))
        if "results" in result:
            break
        assert result["request_id"] == request_id
        statuses.add(result["status"])
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert statuses <= {"queued", "running"} and statuses
    assert [r["response"] for r in result["results"]] == ["Hi there", "Hi there"]
    assert result["results"][1]["external_reference"] == "x"


def test_account_aliases(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    base = scripted.base_url + "/client/v4/accounts/abc123/ai"
    result = ok(httpx.post(f"{base}/run/{MODEL}", json={"prompt": "hi"}))
    assert result["response"] == "Hi there"
    chat = httpx.post(
        f"{base}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 200 and chat.json()["object"] == "chat.completion"  # plain OpenAI object
    resp = httpx.post(f"{base}/v1/responses", json={"model": MODEL, "input": "hi"})
    assert resp.status_code == 200 and resp.json()["object"] == "response"
    from openai import OpenAI

    cf = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert cf.responses.create(model=MODEL, input="hi").output_text == "Hi there"
    chat = cf.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "Hi there"
    bad = httpx.post(f"{base}/v1/responses", json={"model": MODEL})
    assert bad.status_code == 400
    assert bad.json()["success"] is False and bad.json()["errors"][0]["code"] == 5006  # the envelope on error


def test_served_name_in_path(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    assert ok(run(scripted, {"prompt": "hi"}, model="gpt-oss-120b"))["response"] == "Hi there"


def test_workers_ai_response_format_schema_shape(scripted):
    scripted.engine.script = encode(scripted.tokenizer, '<|channel|>final<|message|>{"a": 1}<|return|>')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    result = ok(
        run(scripted, {"prompt": "json please", "response_format": {"type": "json_schema", "json_schema": schema}})
    )
    assert json.loads(result["response"]) == {"a": 1}
    assert scripted.engine.grammars[-1] is not None and scripted.engine.mask_violations == []
    prompt_text = scripted.tokenizer.decode(scripted.engine.requests[-1][1], skip_special_tokens=False)
    assert "# Response Formats" in prompt_text


def test_lora_is_405(scripted):
    r = run(scripted, {"prompt": "hi", "lora": "my-adapter"})
    assert r.status_code == 405 and r.json()["errors"][0]["code"] == 5005


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (f"/ai/run/{MODEL}", {"messages": [{"role": "user", "content": "hi"}], "lora": "a"}),
        (f"/ai/run/{MODEL}", {"input": "hi", "lora": "a"}),
        (f"/client/v4/accounts/abc/ai/run/{MODEL}", {"prompt": "hi", "lora": "a"}),
        (
            "/client/v4/accounts/abc/ai/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "lora": "a"},
        ),
        ("/client/v4/accounts/abc/ai/v1/responses", {"input": "hi", "lora": "a"}),
        ("/client/v4/accounts/abc/ai/v1/responses", {"input": "hi", "lora": "a", "stream": True}),
    ],
)
def test_lora_is_405_on_every_workers_ai_route(scripted, path, body):
    r = httpx.post(scripted.base_url + path, json=body)
    assert r.status_code == 405, r.text
    assert r.json()["success"] is False and r.json()["errors"][0]["code"] == 5005


def test_lora_is_refused_on_openai_routes(scripted):
    r = httpx.post(
        scripted.v1 + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "lora": "a"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
    r = httpx.post(scripted.v1 + "/responses", json={"input": "hi", "lora": "a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora"


@pytest.mark.parametrize("body", [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}, {"input": "hi"}])
def test_stream_must_be_a_boolean(scripted, body):
    r = run(scripted, {**body, "stream": "yes"})
    assert r.status_code == 400 and r.json()["errors"][0]["code"] == 5006
    assert "stream" in r.json()["errors"][0]["message"]


def test_results_and_frames_validate_with_openai_types(scripted):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    scripted.engine.script = encode(scripted.tokenizer, HARMONY_TOOL_CALL)
    messages = {"messages": [{"role": "user", "content": "Paris?"}], "tools": [FLAT_TOOL]}
    ChatCompletion.model_validate(ok(run(scripted, messages)))
    Response.model_validate(ok(run(scripted, {"input": "Paris?", "tools": [FLAT_TOOL]})))
    frames = sse_frames(scripted, messages)
    for frame in frames[:-2]:
        ChatCompletionChunk.model_validate(frame)
    assert set(frames[-2]) == {"response", "usage"} and frames[-1] == "[DONE]"
    adapter = TypeAdapter(ResponseStreamEvent)
    frames = sse_frames(scripted, {"input": "Paris?", "tools": [FLAT_TOOL]})
    for frame in frames[:-2]:
        adapter.validate_python(frame)
    usage = frames[-2]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and frames[-1] == "[DONE]"


def test_prompt_usage_equals_the_rendered_prompt(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    result = ok(run(scripted, {"prompt": "hello there"}))
    tokens = httpx.post(
        scripted.base_url + "/tokenize", json={"messages": [{"role": "user", "content": "hello there"}]}
    ).json()["tokens"]
    assert scripted.engine.requests[-1][1] == tokens and result["usage"]["prompt_tokens"] == len(tokens)
    frames = sse_frames(scripted, {"prompt": "hello there"})
    assert frames[-2]["usage"]["prompt_tokens"] == len(tokens)


@pytest.mark.parametrize("body", [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}, {"input": "hi"}])
def test_failed_stream_still_ends_with_trailer(scripted, body):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    scripted.engine.fail_after = 12
    frames = sse_frames(scripted, body)
    assert any("error" in f or f.get("type") == "response.failed" or f.get("success") is False for f in frames[:-2])
    assert set(frames[-2]) == {"response", "usage"} and frames[-2]["response"] == "" and frames[-1] == "[DONE]"


def test_batch_items_with_stream_run_whole(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    items = [
        {"prompt": "a", "stream": True},
        {"input": "b", "stream": True},
        {"prompt": "c", "stream": "yes", "external_reference": "bad"},
    ]
    results = ok(run(scripted, {"requests": items}))["results"]
    assert results[0]["response"] == "Hi there" and results[1]["object"] == "response"
    assert results[2]["success"] is False and "stream" in results[2]["errors"][0]["message"]
    assert results[2]["external_reference"] == "bad"
