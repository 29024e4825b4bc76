"""engine/harmony converters: Chat Completions and Responses inputs -> harmony conversations."""

from __future__ import annotations

import json

import pytest
from gptoss.engine.harmony import (
    DeveloperContent,
    HarmonyInputError,
    Message,
    ResponseFormat,
    SystemContent,
    ToolSpec,
    conversation_from_chat,
    conversation_from_responses,
)
from test_harmony_render import load_oracle, load_real_encoding

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City"},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["location"],
}
CHAT_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a location",
        "parameters": WEATHER_PARAMS,
    },
}
FLAT_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a location",
    "parameters": WEATHER_PARAMS,
    "strict": True,
}
ARGS = '{"location":"Paris"}'

CHAT_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "User wants weather. Call tool.",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":20}'},
]
RESPONSES_INPUT = [
    {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
    {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "User wants weather. Call tool."}],
    },
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ARGS},
    {"type": "function_call_output", "call_id": "call_1", "output": '{"temp":20}'},
]
EXPECTED_TAIL = [
    Message.user("Weather in Paris?"),
    Message.assistant("User wants weather. Call tool.", "analysis"),
    Message.tool_call("get_weather", ARGS),
    Message.tool_result("get_weather", '{"temp":20}'),
]


def test_chat_conversion_structure():
    conv = conversation_from_chat(CHAT_MESSAGES, tools=[CHAT_TOOL], reasoning_effort="low", current_date="2026-11-25")
    system, developer, *rest = conv.messages
    assert system == Message.system(SystemContent(current_date="2026-11-25", reasoning_effort="low"))
    assert developer == Message.developer(
        DeveloperContent(
            "Be brief.", [ToolSpec("get_weather", "Get the current weather in a location", WEATHER_PARAMS)]
        )
    )
    assert rest == EXPECTED_TAIL


def test_responses_conversion_structure():
    conv = conversation_from_responses(
        RESPONSES_INPUT,
        instructions="Be brief.",
        tools=[FLAT_TOOL],
        reasoning={"effort": "low"},
        current_date="2026-11-25",
    )
    chat = conversation_from_chat(CHAT_MESSAGES, tools=[CHAT_TOOL], reasoning_effort="low", current_date="2026-11-25")
    assert conv.messages == chat.messages


def test_model_doc_example_matches_openai_harmony(shared_dir):
    """The shared docs' example prompt, built with openai-harmony's own API, equals both converters' output."""
    oh, oracle = load_oracle(shared_dir)
    encoding = load_real_encoding(shared_dir)
    system = (
        oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort.LOW).with_conversation_start_date("2026-11-25")
    )
    developer = (
        oh.DeveloperContent.new()
        .with_instructions("Be brief.")
        .with_function_tools(
            [oh.ToolDescription.new("get_weather", "Get the current weather in a location", WEATHER_PARAMS)]
        )
    )
    expected = oracle.render_conversation_for_completion(
        oh.Conversation.from_messages(
            [
                oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
                oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer),
                oh.Message.from_role_and_content(oh.Role.USER, "Weather in Paris?"),
                oh.Message.from_role_and_content(oh.Role.ASSISTANT, "User wants weather. Call tool.").with_channel(
                    "analysis"
                ),
                oh.Message.from_role_and_content(oh.Role.ASSISTANT, ARGS)
                .with_channel("commentary")
                .with_recipient("functions.get_weather")
                .with_content_type("<|constrain|>json"),
                oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"temp":20}')
                .with_recipient("assistant")
                .with_channel("commentary"),
            ]
        ),
        oh.Role.ASSISTANT,
    )
    chat = conversation_from_chat(CHAT_MESSAGES, tools=[CHAT_TOOL], reasoning_effort="low", current_date="2026-11-25")
    responses = conversation_from_responses(
        RESPONSES_INPUT,
        instructions="Be brief.",
        tools=[FLAT_TOOL],
        reasoning={"effort": "low"},
        current_date="2026-11-25",
    )
    assert encoding.render_chat_prompt(chat) == expected
    assert encoding.render_chat_prompt(responses) == expected


def test_multi_turn_history_drops_old_reasoning_like_openai_harmony(shared_dir):
    oh, oracle = load_oracle(shared_dir)
    encoding = load_real_encoding(shared_dir)
    conv = conversation_from_chat(
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning": "Simple arithmetic."},
            {"role": "user", "content": "Merci ! Et 3+3 ?"},
        ]
    )
    expected = oracle.render_conversation_for_completion(
        oh.Conversation.from_messages(
            [
                oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new()),
                oh.Message.from_role_and_content(oh.Role.USER, "2+2?"),
                oh.Message.from_role_and_content(oh.Role.ASSISTANT, "Simple arithmetic.").with_channel("analysis"),
                oh.Message.from_role_and_content(oh.Role.ASSISTANT, "4").with_channel("final"),
                oh.Message.from_role_and_content(oh.Role.USER, "Merci ! Et 3+3 ?"),
            ]
        ),
        oh.Role.ASSISTANT,
    )
    ids = encoding.render_chat_prompt(conv)
    assert ids == expected
    assert "Simple arithmetic" not in encoding.decode(ids)


# ---------------------------------------------------------------- Chat Completions details


def test_chat_instructions_parts_and_flat_tools():
    conv = conversation_from_chat(
        [
            {"role": "system", "content": "A."},
            {"role": "developer", "content": [{"type": "text", "text": "B."}]},
            {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        ],
        tools=[{"name": "f", "parameters": {"type": "object", "properties": {}}}],
    )
    developer = conv.messages[1].content
    assert developer.instructions == "A.\n\nB."
    assert developer.tools == [ToolSpec("f", "", {"type": "object", "properties": {}})]
    assert conv.messages[2] == Message.user("one\ntwo")
    assert conv.messages[0].content.reasoning_effort == "medium"


def test_chat_no_developer_message_without_instructions_or_tools():
    conv = conversation_from_chat([{"role": "user", "content": "hi"}], reasoning_effort="HIGH")
    assert [m.role for m in conv.messages] == ["system", "user"]
    assert conv.messages[0].content.reasoning_effort == "high"


def test_chat_assistant_variants():
    conv = conversation_from_chat(
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "Checking.",
                "reasoning": "think",
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                    {"id": "b", "type": "function", "function": {"name": "g"}},
                ],
            },
            {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "G!"}]},
            {"role": "tool", "tool_call_id": "a", "content": "F!"},
            {"role": "tool", "tool_call_id": "zzz", "name": "h", "content": "H!"},
            {"role": "assistant", "content": "Answer."},
        ]
    )
    assert conv.messages[1:] == [
        Message.user("q"),
        Message.assistant("think", "analysis"),
        Message.assistant("Checking.", "commentary"),
        Message.tool_call("f", '{"x": 1}'),
        Message.tool_call("g", "{}"),
        Message.tool_result("g", "G!"),
        Message.tool_result("f", "F!"),
        Message.tool_result("h", "H!"),
        Message.assistant("Answer.", "final"),
    ]


def test_chat_response_formats():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    conv = conversation_from_chat(
        [{"role": "user", "content": "x"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "thing", "description": "A thing", "schema": schema},
        },
    )
    assert conv.messages[1].content == DeveloperContent(None, [], ResponseFormat("thing", schema, "A thing"))
    for fmt in ({"type": "json_object"}, {"type": "text"}, None):
        conv = conversation_from_chat([{"role": "user", "content": "x"}], response_format=fmt)
        assert [m.role for m in conv.messages] == ["system", "user"]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "r"}]},
            "messages[1].tool_call_id",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
            "messages[0].tool_calls[0].function.name",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, "reasoning_effort"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]},
            "tools[0].name",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "parameters": "x"}]},
            "tools[0].parameters",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
    ],
)
def test_chat_invalid_input(kwargs, param):
    messages = kwargs.pop("messages")
    with pytest.raises(HarmonyInputError) as info:
        conversation_from_chat(messages, **kwargs)
    assert info.value.param == param
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- Responses details


def test_responses_string_input_and_defaults():
    conv = conversation_from_responses("Hello")
    assert conv.messages == [Message.system(), Message.user("Hello")]


def test_responses_items():
    schema = {"type": "object"}
    conv = conversation_from_responses(
        [
            {"type": "message", "role": "system", "content": "Sys."},
            {"role": "developer", "content": [{"type": "input_text", "text": "Dev."}]},
            {"role": "user", "content": "q"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "summary only"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a1"}]},
            {"type": "reasoning", "summary": [], "content": []},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "out"}]},
        ],
        instructions="Inst.",
        tools=[FLAT_TOOL, CHAT_TOOL],
        reasoning={"effort": "high", "summary": "auto"},
        text={"format": {"type": "json_schema", "name": "o", "schema": schema}},
    )
    system, developer, *rest = conv.messages
    assert system.content.reasoning_effort == "high"
    assert developer.content.instructions == "Inst.\n\nSys.\n\nDev."
    assert [t.name for t in developer.content.tools] == ["get_weather", "get_weather"]
    assert developer.content.response_format == ResponseFormat("o", schema)
    assert rest == [
        Message.user("q"),
        Message.assistant("summary only", "analysis"),
        Message.assistant("a1"),
        Message.tool_call("f", "{}"),
        Message.tool_result("f", "out"),
    ]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"input": []}, "input"),
        ({"input": 3}, "input"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "function_call_output", "call_id": "x", "output": "o"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call", "call_id": "x", "arguments": "{}"}]}, "input[0].name"),
        ({"input": [{"type": "input_image"}]}, "input[0].type"),
        ({"input": "x", "instructions": 5}, "instructions"),
        ({"input": "x", "reasoning": {"effort": "max"}}, "reasoning.effort"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
        ({"input": "x", "tools": [{"type": "file_search"}]}, "tools[0].type"),
    ],
)
def test_responses_invalid_input(kwargs, param):
    input_ = kwargs.pop("input")
    with pytest.raises(HarmonyInputError) as info:
        conversation_from_responses(input_, **kwargs)
    assert info.value.param == param


def test_arguments_objects_are_serialised():
    conv = conversation_from_responses(
        [
            {"role": "user", "content": "q"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": {"city": "Zürich"}},
        ]
    )
    assert json.loads(conv.messages[-1].text) == {"city": "Zürich"}
