"""POST /v1/chat/completions through a live server, driven by the official `openai` client.

The real engine (tiny random checkpoint) checks the plumbing; the scripted engine replays hand-made harmony
so reasoning, content and tool calls are checked end to end."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from tests.server_helpers import (
    HARMONY_ANSWER,
    HARMONY_TOOL_CALL,
    WEATHER_TOOL,
    encode,
)

pytest_plugins = ["tests.server_fixtures"]

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


def client(server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


# ---- real engine ----


def test_chat_sync_real_engine(live_server):
    c = client(live_server)
    out = c.chat.completions.create(model="gpt-oss-120b", messages=MESSAGES, max_tokens=6, temperature=0)
    assert out.object == "chat.completion" and out.model == "gpt-oss-120b"
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.role == "assistant"
    tokens = httpx.post(live_server.base_url + "/tokenize", json={"messages": MESSAGES}).json()
    assert out.usage.prompt_tokens == tokens["count"]
    assert out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.completion_tokens_details.reasoning_tokens >= 0
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_prompt_tokens_equal_harmony_render(live_server):
    from gptoss.engine.harmony import HarmonyEncoding, conversation_from_chat
    from gptoss.server.serving import today

    encoding = HarmonyEncoding(live_server.tokenizer)
    conversation = conversation_from_chat(MESSAGES, tools=[WEATHER_TOOL], reasoning_effort="high", current_date=today())
    expected = encoding.render_chat_prompt(conversation)
    out = client(live_server).chat.completions.create(
        model="@cf/openai/gpt-oss-120b",
        messages=MESSAGES,
        tools=[WEATHER_TOOL],
        reasoning_effort="high",
        max_completion_tokens=2,
    )
    assert out.usage.prompt_tokens == len(expected)
    assert out.model == "@cf/openai/gpt-oss-120b"
    tokens = httpx.post(
        live_server.base_url + "/tokenize",
        json={"messages": MESSAGES, "tools": [WEATHER_TOOL], "reasoning_effort": "high"},
    ).json()
    assert tokens["tokens"] == expected


def test_chat_stream_real_engine(live_server):
    c = client(live_server)
    chunks = list(
        c.chat.completions.create(
            model="gpt-oss-120b",
            messages=MESSAGES,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            seed=7,
            top_p=0.9,
            extra_body={"top_k": 20},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 5


def test_chat_prefix_cache_hits_are_reported(live_server):
    messages = [{"role": "user", "content": "A longer question that is asked twice, word for word, " * 3}]
    c = client(live_server)
    c.chat.completions.create(model="gpt-oss-120b", messages=messages, max_tokens=1)
    again = c.chat.completions.create(model="gpt-oss-120b", messages=messages, max_tokens=1)
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens


def test_chat_n_logprobs_real_engine(live_server):
    out = client(live_server).chat.completions.create(
        model="gpt-oss-120b",
        messages=MESSAGES,
        max_tokens=3,
        n=2,
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.5,
        frequency_penalty=0.1,
        stop=["\n\n"],
    )
    assert [c.index for c in out.choices] == [0, 1]
    for choice in out.choices:
        assert choice.logprobs is not None


# ---- scripted engine: real harmony structure ----


def test_chat_reasoning_and_content(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    out = client(scripted).chat.completions.create(model="gpt-oss-120b", messages=MESSAGES, reasoning_effort="low")
    message = out.choices[0].message
    assert message.content == "Hi there"
    assert message.model_extra["reasoning_content"] == "think" and message.model_extra["reasoning"] == "think"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens_details.reasoning_tokens >= 1
    _, prompt, params = scripted.engine.requests[-1]
    assert "Reasoning: low" in scripted.tokenizer.decode(prompt, skip_special_tokens=False)
    assert params.max_tokens == 256 and params.temperature == 0.6  # the seed's defaults
    assert set(params.stop_token_ids) == set(encode(scripted.tokenizer, "<|return|><|call|>"))


def test_chat_tool_call(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_TOOL_CALL)
    out = client(scripted).chat.completions.create(model="gpt-oss-120b", messages=MESSAGES, tools=[WEATHER_TOOL])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"location": "Paris"}
    prompt_text = scripted.tokenizer.decode(scripted.engine.requests[-1][1], skip_special_tokens=False)
    assert "type get_weather" in prompt_text


def test_chat_tool_round_trip_renders_history(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Need weather.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
    ]
    out = client(scripted).chat.completions.create(model="gpt-oss-120b", messages=history, tools=[WEATHER_TOOL])
    assert out.choices[0].message.content == "Hi there"
    prompt_text = scripted.tokenizer.decode(scripted.engine.requests[-1][1], skip_special_tokens=False)
    call_header = "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    assert call_header in prompt_text
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>" in prompt_text
    assert "Need weather." in prompt_text


def test_chat_stream_deltas(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    chunks = list(
        client(scripted).chat.completions.create(
            model="gpt-oss-120b", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    reasoning = "".join(ch.choices[0].delta.model_extra.get("reasoning_content") or "" for ch in chunks if ch.choices)
    also = "".join(ch.choices[0].delta.model_extra.get("reasoning") or "" for ch in chunks if ch.choices)
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert reasoning == also == "think" and content == "Hi there"
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) >= 2  # streamed, not at once
    assert chunks[-1].usage.completion_tokens == len(scripted.engine.script)


def test_chat_stream_tool_call_deltas(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_TOOL_CALL)
    chunks = list(
        client(scripted).chat.completions.create(
            model="gpt-oss-120b", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True
        )
    )
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"location": "Paris"}
    assert len(calls) > 2
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert reasons == ["tool_calls"]


OSLO_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location": "Oslo"}<|call|>'
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_chat_tool_choice_is_enforced_by_the_grammar(scripted, tool_choice):
    scripted.engine.script = encode(scripted.tokenizer, OSLO_CALL)
    out = client(scripted).chat.completions.create(
        model="gpt-oss-120b", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice=tool_choice
    )
    prompt_text = scripted.tokenizer.decode(scripted.engine.requests[-1][1], skip_special_tokens=False)
    assert prompt_text.endswith("<|start|>assistant")  # no prefill: the reasoning stays possible
    assert scripted.engine.grammars[-1] is not None and scripted.engine.mask_violations == []
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"location": "Oslo"}
    assert out.choices[0].finish_reason == "tool_calls"
    # A final answer is not what the grammar allows here.
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    client(scripted).chat.completions.create(
        model="gpt-oss-120b", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice=tool_choice
    )
    assert scripted.engine.mask_violations


def test_chat_tool_choice_none_drops_tools(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    client(scripted).chat.completions.create(
        model="gpt-oss-120b", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="none"
    )
    prompt_text = scripted.tokenizer.decode(scripted.engine.requests[-1][1], skip_special_tokens=False)
    assert "get_weather" not in prompt_text and scripted.engine.mask_violations == []


def test_chat_tool_choice_required_real_engine(live_server):
    strict_tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
                "additionalProperties": False,
            },
        },
    }
    out = client(live_server).chat.completions.create(
        model="gpt-oss-120b", messages=MESSAGES, tools=[strict_tool], tool_choice="required", max_tokens=40, seed=3
    )
    # Even the random model is led into a call of the one tool, arguments starting as the schema's JSON.
    calls = out.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].function.arguments.lstrip().startswith("{")


def test_chat_response_format_json_schema(scripted):
    scripted.engine.script = encode(scripted.tokenizer, '<|channel|>final<|message|>{"a": 1}<|return|>')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = client(scripted).chat.completions.create(
        model="gpt-oss-120b",
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}},
    )
    assert json.loads(out.choices[0].message.content) == {"a": 1}
    assert scripted.engine.mask_violations == []
    prompt_text = scripted.tokenizer.decode(scripted.engine.requests[-1][1], skip_special_tokens=False)
    assert "# Response Formats" in prompt_text and "thing" in prompt_text


def test_chat_stop_string_and_logprobs(scripted):
    scripted.engine.script = encode(scripted.tokenizer, "<|channel|>final<|message|>one two three<|return|>")
    out = client(scripted).chat.completions.create(
        model="gpt-oss-120b", messages=MESSAGES, stop="three", logprobs=True, top_logprobs=2
    )
    choice = out.choices[0]
    assert choice.message.content == "one two " and choice.finish_reason == "stop"
    assert choice.logprobs.content[0].logprob == -0.5 and len(choice.logprobs.content[0].top_logprobs) == 2
    assert scripted.engine.active == set()


def test_chat_stream_n_choices(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    chunks = list(
        client(scripted).chat.completions.create(
            model="gpt-oss-120b", messages=MESSAGES, n=3, seed=11, stream=True, stream_options={"include_usage": True}
        )
    )
    for index in range(3):
        text = "".join(
            ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == index
        )
        assert text == "Hi there"
    assert chunks[-1].usage.completion_tokens == 3 * len(scripted.engine.script)
    seeds = sorted(params.seed for _, _, params in scripted.engine.requests[-3:])
    assert seeds == [11, 12, 13]


def test_chat_length_finish(scripted):
    scripted.engine.script = encode(scripted.tokenizer, HARMONY_ANSWER)
    out = client(scripted).chat.completions.create(model="gpt-oss-120b", messages=MESSAGES, max_tokens=3)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


# ---- wire format: every frame parses with the openai package's own models ----


def raw_chunks(server, body: dict) -> list:
    """The `data:` payloads of a streamed chat answer (dicts, and the final "[DONE]")."""
    frames = []
    with httpx.stream("POST", server.v1 + "/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                frames.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return frames


@pytest.mark.parametrize("script", [HARMONY_ANSWER, HARMONY_TOOL_CALL])
def test_chat_frames_validate_with_openai_types(scripted, script):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    scripted.engine.script = encode(scripted.tokenizer, script)
    body = {"model": "gpt-oss-120b", "messages": MESSAGES, "tools": [WEATHER_TOOL], "n": 2}
    r = httpx.post(scripted.v1 + "/chat/completions", json=body, timeout=60)
    ChatCompletion.model_validate(r.json())
    frames = raw_chunks(scripted, {**body, "stream_options": {"include_usage": True}})
    assert frames[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(f) for f in frames[:-1]]
    assert len({c.id for c in chunks}) == 1
    first = chunks[0]
    assert sorted(ch.index for ch in first.choices) == [0, 1]
    assert all(ch.delta.role == "assistant" for ch in first.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == r.json()["usage"]["prompt_tokens"]
    reasons = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    expected = "tool_calls" if script == HARMONY_TOOL_CALL else "stop"
    assert reasons == {0: expected, 1: expected}
    for index in (0, 1):
        calls = [tc for c in chunks for ch in c.choices if ch.index == index for tc in ch.delta.tool_calls or []]
        if script != HARMONY_TOOL_CALL:
            assert calls == []
            continue
        head, rest = calls[0], calls[1:]
        assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
        assert head.function.name == "get_weather"
        assert rest and all(
            tc.index == 0 and tc.id is None and tc.type is None and tc.function.name is None and tc.function.arguments
            for tc in rest
        )
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"location": "Paris"}
