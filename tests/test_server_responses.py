"""POST /v1/responses through a live server with the `openai` client; every streamed event is validated by
the client's own models (strictly, with pydantic, not only the client's lenient parsing)."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from tests.server_helpers import HARMONY_ANSWER, HARMONY_TOOL_CALL, encode

pytest_plugins = ["tests.server_fixtures"]

EVENTS = TypeAdapter(ResponseStreamEvent)
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
}


def client(server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def raw_events(server, body: dict) -> list[dict]:
    """The SSE frames of a streamed response, as dicts (`event:` line checked against `type`)."""
    events = []
    with httpx.stream("POST", server.v1 + "/responses", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                events.append(event)
    return events


def test_responses_sync_real_engine(live_server):
    out = client(live_server).responses.create(
        model="gpt-oss-120b", input="Hello", instructions="Be brief.", max_output_tokens=5, reasoning={"effort": "low"}
    )
    assert out.object == "response" and out.status in ("completed", "incomplete")
    assert out.usage.input_tokens > 0 and out.usage.output_tokens <= 5
    assert out.usage.output_tokens_details.reasoning_tokens >= 0
    assert out.reasoning.effort == "low"


def test_responses_stream_real_engine(live_server):
    events = list(
        client(live_server).responses.create(model="gpt-oss-120b", input="Hello", max_output_tokens=4, stream=True)
    )
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_stream_events_validate(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    events = raw_events(scripted, {"model": "gpt-oss-120b", "input": "hi"})
    for event in events:
        EVENTS.validate_python(event)
    types = [e["type"] for e in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.reasoning_text.delta"] * types.count("response.reasoning_text.delta"),
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * types.count("response.output_text.delta"),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hi there"
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]


def test_responses_client_parses_stream_with_tool_call(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_TOOL_CALL)
    events = list(
        client(scripted).responses.create(model="gpt-oss-120b", input="Weather in Paris?", tools=[TOOL], stream=True)
    )
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments) == {"location": "Paris"}
    final = events[-1].response
    call = final.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")


def test_responses_sync_items_and_previous_response(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_TOOL_CALL)
    c = client(scripted)
    first = c.responses.create(model="gpt-oss-120b", input="Weather in Paris?", tools=[TOOL])
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    assert first.usage.output_tokens_details.reasoning_tokens >= 1
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    second = c.responses.create(
        model="gpt-oss-120b",
        previous_response_id=first.id,
        tools=[TOOL],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 20}'}],
    )
    assert second.output_text == "Hi there"
    prompt_text = scripted.tokenizer.decode(scripted.engine.requests[-1][1], skip_special_tokens=False)
    assert "Weather in Paris?" in prompt_text
    assert "to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>" in prompt_text
    assert "functions.get_weather to=assistant" in prompt_text
    assert c.responses.retrieve(second.id).id == second.id


def test_responses_input_items_text_format_and_named_tool(scripted):
    call = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location": "Rome"}<|call|>'
    scripted.engine.script = encode(scripted.tokenizer, call)
    out = client(scripted).responses.create(
        model="gpt-oss-120b",
        tools=[TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        input=[
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Rome?"}]},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "earlier thought"}],
            },
        ],
        text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
        temperature=0.2,
        top_p=0.5,
        max_output_tokens=60,
    )
    assert out.output[0].type == "function_call" and json.loads(out.output[0].arguments) == {"location": "Rome"}
    assert scripted.engine.grammars[-1] is not None and scripted.engine.mask_violations == []
    _, prompt, params = scripted.engine.requests[-1]
    text = scripted.tokenizer.decode(prompt, skip_special_tokens=False)
    assert "Use tools." in text and "# Response Formats" in text and "earlier thought" in text
    assert params.temperature == 0.2 and params.top_p == 0.5 and params.max_tokens == 60


def test_responses_top_logprobs(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    events = raw_events(scripted, {"input": "hi", "top_logprobs": 2})
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    for event in deltas:
        EVENTS.validate_python(event)
    entries = [lp for e in deltas for lp in e["logprobs"]]
    assert "".join(lp["token"] for lp in entries) == "Hi there"
    assert all(lp["logprob"] == -0.5 and len(lp["top_logprobs"]) == 2 for lp in entries)
    final = events[-1]["response"]["output"][-1]["content"][0]
    assert len(final["logprobs"]) == len(entries)


def test_responses_unknown_previous_id(scripted):
    r = httpx.post(scripted.v1 + "/responses", json={"input": "hi", "previous_response_id": "resp_nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"


@pytest.mark.parametrize("store", [False])
def test_responses_store_false_not_kept(scripted, store):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    out = client(scripted).responses.create(model="gpt-oss-120b", input="hi", store=store)
    r = httpx.get(scripted.v1 + f"/responses/{out.id}")
    assert r.status_code == 404


def without_ids(value):
    """`value` with the per-response ids and timestamps blanked (they differ between two runs)."""
    if isinstance(value, dict):
        return {k: None if k in ("id", "call_id", "created_at") else without_ids(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("script", "max_output_tokens"), [(HARMONY_ANSWER, None), (HARMONY_TOOL_CALL, None), (HARMONY_ANSWER, 12)]
)
def test_responses_stream_agrees_with_sync(scripted, script, max_output_tokens):
    from openai.types.responses import Response

    scripted.engine.script = encode(scripted.tokenizer, script)
    body = {"model": "gpt-oss-120b", "input": "hi", "tools": [TOOL], "max_output_tokens": max_output_tokens}
    sync = httpx.post(scripted.v1 + "/responses", json=body, timeout=60).json()
    Response.model_validate(sync)
    events = raw_events(scripted, body)
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]
    if max_output_tokens is None:
        assert final["type"] == "response.completed" and final["response"]["status"] == "completed"
    else:
        assert final["type"] == "response.incomplete" and sync["status"] == "incomplete"
        assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert without_ids(final["response"]) == without_ids(sync)
    # output_index / content_index: each item's events carry its place in the final output.
    output = final["response"]["output"]
    for event in events:
        if "output_index" in event:
            index = event["output_index"]
            item_id = event.get("item_id") or event["item"]["id"]
            assert output[index]["id"] == item_id
            if "content_index" in event:
                assert event["content_index"] == 0 and output[index]["type"] in ("reasoning", "message")
    added = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    done = [e["output_index"] for e in events if e["type"] == "response.output_item.done"]
    assert added == done == list(range(len(output)))


def test_responses_previous_id_prompt_equals_explicit_history(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_TOOL_CALL)
    first = httpx.post(
        scripted.v1 + "/responses", json={"input": "Weather?", "tools": [TOOL], "instructions": "Be nice."}
    ).json()
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    new = [{"type": "function_call_output", "call_id": first["output"][-1]["call_id"], "output": "20C"}]
    chained = httpx.post(
        scripted.v1 + "/responses", json={"previous_response_id": first["id"], "input": new, "tools": [TOOL]}
    ).json()
    chained_prompt = scripted.engine.requests[-1][1]
    assert chained["usage"]["input_tokens"] == len(chained_prompt)
    httpx.post(
        scripted.v1 + "/responses",
        json={"input": [{"role": "user", "content": "Weather?"}, *first["output"], *new], "tools": [TOOL]},
    )
    assert scripted.engine.requests[-1][1] == chained_prompt  # instructions are not carried over (as OpenAI)


def test_responses_engine_failure_mid_stream_is_response_failed(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    scripted.engine.fail_after = 12
    events = raw_events(scripted, {"input": "hi"})
    for event in events:
        EVENTS.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"


@pytest.mark.parametrize("seed", [1, 2])
def test_noise_streams_validate_real_engine(live_server, seed):
    """Whatever the (random) model emits, every frame of every shape parses with the openai types."""
    from openai.types.chat import ChatCompletionChunk

    body = {"max_tokens": 24, "temperature": 1.5, "seed": seed}
    events = raw_events(live_server, {"input": "Hello", **body})
    for event in events:
        EVENTS.validate_python(event)
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    with httpx.stream(
        "POST",
        live_server.v1 + "/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": "Hello"}], "stream": True, **body},
    ) as r:
        frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    for frame in frames[:-1]:
        ChatCompletionChunk.model_validate_json(frame)


def test_function_call_cut_by_max_output_tokens_is_incomplete(scripted):
    """A client trusting item status must not run a tool with arguments cut short."""
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_TOOL_CALL)
    whole = len(scripted.engine.script)
    body = {"model": "gpt-oss-120b", "input": "hi", "tools": [TOOL], "max_output_tokens": whole - 3}
    sync = httpx.post(scripted.v1 + "/responses", json=body, timeout=60).json()
    assert sync["status"] == "incomplete"
    calls = [item for item in sync["output"] if item["type"] == "function_call"]
    assert calls and all(call["status"] == "incomplete" for call in calls)
    events = raw_events(scripted, body)
    done = [
        e["item"] for e in events if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"
    ]
    assert done and all(item["status"] == "incomplete" for item in done)
    final_calls = [item for item in events[-1]["response"]["output"] if item["type"] == "function_call"]
    assert final_calls and all(call["status"] == "incomplete" for call in final_calls)
    # Not cut: completed.
    body["max_output_tokens"] = None
    sync = httpx.post(scripted.v1 + "/responses", json=body, timeout=60).json()
    assert [item["status"] for item in sync["output"] if item["type"] == "function_call"] == ["completed"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_tool_choice_always_calls_real_engine(live_server, tool_choice):
    """Even the random model calls (never an empty message item instead), and only a declared function."""
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}  # not strict
    for seed in (1, 2, 3):
        body = {"input": "Weather?", "tools": [tool], "tool_choice": tool_choice, "seed": seed, "max_output_tokens": 64}
        out = httpx.post(live_server.v1 + "/responses", json=body, timeout=120).json()
        types = [item["type"] for item in out["output"]]
        assert types == ["function_call"], out["output"]
        assert out["output"][0]["name"] == "get_weather"
