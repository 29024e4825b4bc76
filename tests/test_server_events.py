"""The server's event conversion without a model: hand-made harmony token sequences through
`HarmonyEventStream` (server/harmony_events.py), the Responses `ResponseBuilder` (validated against the `openai`
package's own event models), and the metrics text."""

from __future__ import annotations

import json

import pytest
from gptoss.engine.harmony.render import HarmonyEncoding
from gptoss.engine.outputs import TokenLogprob
from gptoss.engine.tokenizer import build_tiny_tokenizer
from gptoss.server.events import (
    Collected,
    ContentDelta,
    Finished,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallDone,
    ToolCallStarted,
    Usage,
)
from gptoss.server.harmony_events import HarmonyEventStream
from pydantic import TypeAdapter

from tests.server_helpers import HARMONY_ANSWER, HARMONY_TOOL_CALL


@pytest.fixture(scope="module")
def encoding() -> HarmonyEncoding:
    return HarmonyEncoding(build_tiny_tokenizer())


def ids(encoding: HarmonyEncoding, text: str) -> list[int]:
    return encoding.tokenizer.encode(text, add_special_tokens=False).ids


def run(encoding, text, *, stop=(), finish="stop", logprobs=False):
    stream = HarmonyEventStream(encoding, stop)
    events = []
    for token_id in ids(encoding, text):
        lp = TokenLogprob(token_id, -0.25) if logprobs else None
        events += stream.feed(token_id, lp)
        if stream.stopped:
            break
    events += stream.finish(finish, Usage(prompt_tokens=10))
    return events


def fold(events) -> Collected:
    result = Collected()
    for event in events:
        result.add(event)
    return result


def test_reasoning_then_final(encoding):
    events = run(encoding, HARMONY_ANSWER)
    result = fold(events)
    assert result.reasoning == "think"
    assert result.content == "Hi there"
    assert result.finish_reason == "stop" and not result.tool_calls
    assert isinstance(events[-1], Finished)
    # Reasoning deltas come before any content delta.
    kinds = [type(e) for e in events]
    assert kinds.index(ReasoningDelta) < kinds.index(ContentDelta)
    usage = events[-1].usage
    assert usage.completion_tokens == len(ids(encoding, HARMONY_ANSWER))
    assert 1 <= usage.reasoning_tokens < usage.completion_tokens


def test_tool_call_events(encoding):
    events = run(encoding, HARMONY_TOOL_CALL)
    started = [e for e in events if isinstance(e, ToolCallStarted)]
    deltas = [e for e in events if isinstance(e, ToolCallArgumentsDelta)]
    done = [e for e in events if isinstance(e, ToolCallDone)]
    assert len(started) == 1 and started[0].name == "get_weather" and started[0].call_id.startswith("call_")
    assert "".join(d.delta for d in deltas) == '{"location": "Paris"}'
    assert done[0].arguments == '{"location": "Paris"}' and done[0].call_id == started[0].call_id
    assert json.loads(done[0].arguments) == {"location": "Paris"}
    assert events[-1].finish_reason == "tool_calls"
    assert fold(events).reasoning == "Need weather."


def test_recipient_before_channel_and_analysis_tool_call(encoding):
    text = '<|channel|>analysis to=functions.lookup json<|message|>{"q": 1}<|call|>'
    result = fold(run(encoding, text))
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("lookup", '{"q": 1}')]
    assert result.finish_reason == "tool_calls"


def test_truncated_by_length(encoding):
    text = "<|channel|>analysis<|message|>thinking about it"
    events = run(encoding, text, finish="length")
    assert events[-1].finish_reason == "length"
    assert fold(events).reasoning == "thinking about it"


def test_truncated_tool_call_closes(encoding):
    text = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"loc'
    result = fold(run(encoding, text, finish="length"))
    assert result.finish_reason == "length"
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", '{"loc')]


def test_noise_gives_empty_answer(encoding):
    result = fold(run(encoding, "random words without any harmony", finish="length"))
    assert result.content == "" and result.reasoning == "" and result.finish_reason == "length"


def test_stop_string_applies_to_content_only(encoding):
    text = (
        "<|channel|>analysis<|message|>STOP in reasoning<|end|><|start|>assistant<|channel|>final<|message|>"
        "one two STOP three<|return|>"
    )
    events = run(encoding, text, stop=["STOP"])
    result = fold(events)
    assert result.reasoning == "STOP in reasoning"
    assert result.content == "one two "
    assert result.finish_reason == "stop"


def test_stop_string_held_back_then_released(encoding):
    text = "<|channel|>final<|message|>a ST b<|return|>"
    result = fold(run(encoding, text, stop=["STOP"]))
    assert result.content == "a ST b"


def test_content_logprobs_follow_content_tokens(encoding):
    events = run(encoding, HARMONY_ANSWER, logprobs=True)
    content_ids = ids(encoding, "Hi there")
    logprobs = [lp for e in events if isinstance(e, ContentDelta) for lp in e.logprobs]
    assert [lp.token_id for lp in logprobs] == content_ids


def test_usage_objects():
    usage = Usage(prompt_tokens=7, completion_tokens=5, reasoning_tokens=2, cached_tokens=3)
    chat = usage.openai()
    assert chat["total_tokens"] == 12 and chat["completion_tokens_details"]["reasoning_tokens"] == 2
    assert chat["prompt_tokens_details"]["cached_tokens"] == 3
    responses = usage.responses()
    assert responses["input_tokens"] == 7 and responses["output_tokens_details"]["reasoning_tokens"] == 2


# ---- Responses events, validated by the openai package's models ----


def builder_events(encoding, text, finish="stop"):
    from gptoss.server.openai_responses import ResponseBuilder, ResponsesPlan
    from gptoss.server.protocol_openai import ResponsesRequest

    req = ResponsesRequest.model_validate_json('{"input": "hi"}')
    from gptoss.engine.sampling_params import SamplingParams

    plan = ResponsesPlan("gpt-oss-120b", [1, 2], SamplingParams(), [], req, [], [], "medium")
    builder = ResponseBuilder(plan)
    out = builder.start()
    for event in run(encoding, text, finish=finish):
        out += builder.feed(event)
    out += builder.finish()
    return out


@pytest.mark.parametrize("text", [HARMONY_ANSWER, HARMONY_TOOL_CALL])
def test_response_events_parse_with_openai_models(encoding, text):
    from openai.types.responses import Response, ResponseStreamEvent

    adapter = TypeAdapter(ResponseStreamEvent)
    events = builder_events(encoding, text)
    for event in events:
        adapter.validate_python(event)  # strict: every field the client's models require is there
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    final = Response.model_validate(events[-1]["response"])
    kinds = [item.type for item in final.output]
    if text == HARMONY_ANSWER:
        assert kinds == ["reasoning", "message"]
        assert final.output[1].content[0].text == "Hi there"
        assert final.output[0].content[0].text == "think"
        for needed in (
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.added",
            "response.content_part.done",
        ):
            assert needed in types
    else:
        assert kinds == ["reasoning", "function_call"]
        call = final.output[1]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"location": "Paris"}
        assert "response.function_call_arguments.delta" in types
        assert "response.function_call_arguments.done" in types
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens >= 1


def test_response_incomplete_on_length(encoding):
    from openai.types.responses import ResponseStreamEvent

    events = builder_events(encoding, "<|channel|>final<|message|>partial answer", finish="length")
    TypeAdapter(ResponseStreamEvent).validate_python(events[-1])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


# ---- metrics text ----


def test_metrics_text_format():
    from gptoss.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.count_request("/v1/chat/completions", 200)
    metrics.ttft.observe(0.03)
    metrics.itl.observe(0.002)
    metrics.observe_tokens(5)
    text = metrics.render(
        {
            "num_running": 2,
            "kv_blocks_used": {"full_attention": 3, "sliding_attention": 1},
            "requests_finished_total": {"stop": 4},
            "name": "ignored",
        }
    )
    assert 'gptoss_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert 'gptoss_time_to_first_token_seconds_bucket{le="0.05"} 1' in text
    assert 'gptoss_time_to_first_token_seconds_bucket{le="+Inf"} 1' in text
    assert "gptoss_inter_token_latency_seconds_count 1" in text
    assert 'gptoss_engine_kv_blocks_used{group="full_attention"} 3' in text
    assert 'gptoss_engine_requests_finished_total{reason="stop"} 4' in text
    assert "gptoss_engine_num_running 2" in text and "ignored" not in text
    assert "gptoss_generation_tokens_per_second 0.5" in text
    for line in text.splitlines():  # every sample line: name{labels} value
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
