"""engine/harmony rendering: token-for-token equal to openai-harmony (the oracle) on many conversations.

The oracle tests need shared/ (the real tokenizer and tiktoken vocab) and skip without it; the tiny-tokenizer
tests always run. The helpers at the top are also used by test_harmony_parse.py / test_harmony_convert.py.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from gptoss.engine.harmony import (
    DeveloperContent,
    HarmonyEncoding,
    Message,
    ResponseFormat,
    SystemContent,
    ToolSpec,
    build_conversation,
    json_schema_to_typescript,
)
from gptoss.engine.harmony.render import messages_to_render
from gptoss.engine.harmony.schema_render import json_text, render_response_format_section
from gptoss.engine.tokenizer import build_tiny_tokenizer, load_tokenizer

# ---------------------------------------------------------------- oracle helpers (shared with other files)

_ORACLE_CACHE: dict[str, object] = {}


def load_oracle(shared_dir: Path):
    """(openai_harmony module, its gpt-oss encoding), loaded offline from shared/vocab."""
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(shared_dir / "vocab")
    oh = pytest.importorskip("openai_harmony")
    if "oracle" not in _ORACLE_CACHE:
        _ORACLE_CACHE["oracle"] = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    return oh, _ORACLE_CACHE["oracle"]


def load_real_encoding(shared_dir: Path) -> HarmonyEncoding:
    if "real" not in _ORACLE_CACHE:
        path = shared_dir / "vocab" / "o200k_harmony.tokenizer.json"
        _ORACLE_CACHE["real"] = HarmonyEncoding(load_tokenizer(path))
    return _ORACLE_CACHE["real"]  # type: ignore[return-value]


def _oracle_developer_text(oh, oracle, content: DeveloperContent) -> str:
    """openai-harmony's developer text (it has no response formats) plus our `# Response Formats` section."""
    body = ""
    if content.instructions is not None or content.tools:
        plain = DeveloperContent(content.instructions, content.tools, None)
        ids = oracle.render(to_oracle_message(oh, oracle, Message("developer", plain)))
        text = oracle.decode(ids)
        body = text[len("<|start|>developer<|message|>") : -len("<|end|>")]
    section = render_response_format_section(content.response_format)
    return body + "\n\n" + section if body else section


def to_oracle_message(oh, oracle, message: Message):
    """Our Message -> an openai_harmony.Message."""
    content = message.content
    if isinstance(content, SystemContent):
        efforts = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}
        oracle_content = oh.SystemContent(
            model_identity=content.model_identity,
            reasoning_effort=efforts[content.reasoning_effort] if content.reasoning_effort else None,
            conversation_start_date=content.current_date,
            knowledge_cutoff=content.knowledge_cutoff,
            channel_config=oh.ChannelConfig(
                valid_channels=list(content.valid_channels), channel_required=content.channel_required
            ),
        )
    elif isinstance(content, DeveloperContent):
        if content.response_format is not None:
            oracle_content = oh.TextContent(text=_oracle_developer_text(oh, oracle, content))
        else:
            oracle_content = oh.DeveloperContent(instructions=content.instructions)
            if content.tools:
                oracle_content = oracle_content.with_function_tools(
                    [
                        oh.ToolDescription(name=t.name, description=t.description, parameters=t.parameters)
                        for t in content.tools
                    ]
                )
    else:
        oracle_content = oh.TextContent(text=content)
    return oh.Message(
        author=oh.Author(role=oh.Role(message.role), name=message.name),
        content=[oracle_content],
        channel=message.channel,
        recipient=message.recipient,
        content_type=message.content_type,
    )


def oracle_prompt(oh, oracle, messages) -> list[int]:
    oracle_messages = [to_oracle_message(oh, oracle, m) for m in messages]
    # A response-format developer message is plain text to the oracle, so it would not see the function tools
    # (which add the system message's functions line): a tools-only developer message appended at the end
    # tells it, and its tokens are cut out again.
    dummy = None
    for m in messages:
        if isinstance(m.content, DeveloperContent) and m.content.response_format is not None and m.content.tools:
            dummy = to_oracle_message(oh, oracle, Message("developer", DeveloperContent(None, m.content.tools)))
            oracle_messages.append(dummy)
    conversation = oh.Conversation.from_messages(oracle_messages)
    ids = oracle.render_conversation_for_completion(conversation, oh.Role.ASSISTANT)
    if dummy is not None:
        cut = len(oracle.render(dummy))
        ids = ids[: -2 - cut] + ids[-2:]
    return ids


# ---------------------------------------------------------------- conversations to compare

TOOLS = [
    ToolSpec(
        "get_weather",
        "Get the current weather in a location",
        {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["location"],
        },
    ),
    ToolSpec("get_location", "Gets the location of the user."),
    ToolSpec(
        "search",
        "Search the web.\nReturns a list of results.\r\nUse sparingly.",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "title": "Query", "examples": ["weather", "news"]},
                "max_results": {"type": "integer", "description": "How many", "default": 10},
                "score": {"type": "number", "default": 0.5},
                "safe": {"type": "boolean", "default": True},
                "tags": {"type": "array", "items": {"type": "string"}, "description": "Tag filter"},
                "anything": {"type": "array"},
                "ids": {"type": ["integer", "string"]},
                "maybe": {"type": "string", "nullable": True},
            },
            "required": ["query"],
        },
    ),
    ToolSpec(
        "create_event",
        "Create a calendar event",
        {
            "type": "object",
            "description": "Event details",
            "properties": {
                "title": {"type": "string"},
                "when": {
                    "type": "object",
                    "description": "Start and end",
                    "properties": {
                        "start": {"type": "string", "description": "ISO time"},
                        "end": {"type": "string"},
                        "tz": {"type": "object", "properties": {"name": {"type": "string", "default": "UTC"}}},
                    },
                    "required": ["start"],
                },
                "attendees": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"email": {"type": "string"}, "role": {"type": "string", "enum": ["req", "opt"]}},
                        "required": ["email"],
                    },
                },
                "priority": {"type": "string", "enum": ["low", "high"], "default": "low", "description": "Priority"},
            },
            "required": ["title", "when"],
        },
    ),
    ToolSpec(
        "convert",
        "Convert units — café ünïcödé 日本語",
        {
            "type": "object",
            "properties": {
                "value": {
                    "description": "The value",
                    "oneOf": [
                        {"type": "number", "description": "The value"},
                        {"type": "string", "description": "As text", "default": "0"},
                        {"type": "object", "properties": {"v": {"type": "number"}}, "nullable": True},
                    ],
                },
                "mode": {
                    "oneOf": [{"type": "string", "enum": ["a", "b"], "default": "a"}, {"type": "null"}],
                    "default": "x",
                },
                "ratio": {
                    "oneOf": [{"type": "integer"}, {"type": "number", "description": "float"}],
                    "description": "Ratio",
                    "default": 1.5,
                },
                "extra": {},
                "nothing": {"type": "null"},
            },
        },
    ),
    ToolSpec("no_props", "", {"type": "object", "properties": {}}),
    ToolSpec(
        "top_one_of",
        "Top-level oneOf",
        {
            "oneOf": [
                {"type": "object", "properties": {"a": {"type": "string"}}, "description": "A form"},
                {"type": "string", "default": "b"},
            ],
        },
    ),
    ToolSpec(
        "weird",
        "Defaults of every kind",
        {
            "type": "object",
            "properties": {
                "d1": {"type": "array", "items": {"type": "integer"}, "default": [1, 2.5, 1e-7, 1e21, "x"]},
                "d2": {"type": "object", "default": {"k": 'v\n"q"', "n": None}},
                "d3": {"type": "string", "enum": ["p", "q"], "default": "p"},
                "d4": {"type": "number", "default": 100000000000000000.0},
                "d5": {"type": "number", "default": 0.00001},
                "d6": {"type": "integer", "default": -3},
            },
            "required": ["d1", "d2", "d3"],
        },
    ),
]

RESPONSE_FORMAT = ResponseFormat(
    "shopping_list",
    {
        "type": "object",
        "properties": {"items": {"type": "array", "description": "entries", "items": {"type": "string"}}},
    },
    "A shopping list — épicerie",
)

TEXTS = [
    "What is 2 + 2?",
    "Hello, world!",
    "Tell me about café culture in Paris — naïvely.",
    "日本語で答えてください。",
    "Привет, как дела?",
    "emoji 🙂🚀 and a flag 🇫🇷",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n",
    "code:\n```python\nprint('hi')\n```",
    "text with <|end|> and <|start|> spelled out",
    "tabs\tand\r\nCRLF",
    "مرحبا بالعالم",
    "",
]


def _turns(rng: random.Random, tools: list[ToolSpec]) -> list[Message]:
    messages = [Message.user(rng.choice(TEXTS[:-1]))]
    for _ in range(rng.randint(0, 3)):
        if tools and rng.random() < 0.6:
            tool = rng.choice(tools)
            if rng.random() < 0.7:
                messages.append(Message.assistant(rng.choice(TEXTS), channel="analysis"))
            if rng.random() < 0.3:
                messages.append(Message.assistant("Let me check that.", channel="commentary"))
            args = json.dumps({"q": rng.choice(TEXTS)}, ensure_ascii=rng.random() < 0.5)
            messages.append(Message.tool_call(tool.name, args))
            messages.append(Message.tool_result(tool.name, json.dumps({"ok": True, "r": rng.choice(TEXTS)})))
        if rng.random() < 0.7:
            messages.append(Message.assistant(rng.choice(TEXTS), channel="analysis"))
        messages.append(Message.assistant(rng.choice(TEXTS), channel="final"))
        messages.append(Message.user(rng.choice(TEXTS)))
    if rng.random() < 0.2:
        # Mid-turn: reasoning then a call and its result, no final answer yet.
        messages.append(Message.assistant("Thinking about it.", channel="analysis"))
        if tools:
            messages.append(Message.tool_call(tools[0].name, "{}"))
            messages.append(Message.tool_result(tools[0].name, '{"x": 1}'))
    return messages


def generated_conversations(count: int = 48) -> list[tuple[str, list[Message]]]:
    out = []
    rng = random.Random(20261126)
    for i in range(count):
        effort = ("low", "medium", "high")[i % 3]
        date = "2026-11-26" if i % 2 else None
        tools = rng.sample(TOOLS, rng.randint(1, 4)) if i % 4 != 0 else []
        instructions = rng.choice([None, "Be brief.", "Always answer in French.\n\nUse metric units.", "Réponds."])
        response_format = RESPONSE_FORMAT if i % 7 == 3 else None
        conv = build_conversation(
            _turns(rng, tools),
            instructions=instructions,
            tools=tools,
            response_format=response_format,
            reasoning_effort=effort,
            current_date=date,
        )
        out.append((f"gen{i}-{effort}-{len(tools)}tools-{len(conv)}msgs", conv.messages))
    return out


def hand_written_conversations() -> list[tuple[str, list[Message]]]:
    weather = TOOLS[0]
    return [
        ("user-only-default", [Message.system(), Message.user("Hi")]),
        ("no-system", [Message.user("Hi"), Message.assistant("Hello!")]),
        (
            "system-no-effort-no-identity",
            [
                Message.system(SystemContent(model_identity=None, reasoning_effort=None, knowledge_cutoff=None)),
                Message.user("x"),
            ],
        ),
        (
            "developer-only-instructions",
            [Message.system(), Message.developer(DeveloperContent("Use a friendly tone.")), Message.user("Hey")],
        ),
        (
            "developer-tools-no-instructions",
            [Message.system(), Message.developer(DeveloperContent(None, [weather])), Message.user("Weather in SF?")],
        ),
        (
            "response-format-only",
            [
                Message.system(),
                Message.developer(DeveloperContent(None, [], ResponseFormat("r", {"type": "object"}))),
                Message.user("json please"),
            ],
        ),
        (
            "all-tools-every-schema-shape",
            [Message.system(), Message.developer(DeveloperContent("Hi", TOOLS)), Message.user("go")],
        ),
        (
            "all-tools-and-response-format",
            [
                Message.system(SystemContent(reasoning_effort="high")),
                Message.developer(DeveloperContent(None, TOOLS, RESPONSE_FORMAT)),
                Message.user("go"),
            ],
        ),
        (
            "tool-round-trip",
            [
                Message.system(SystemContent(reasoning_effort="low", current_date="2026-11-25")),
                Message.developer(DeveloperContent("Be brief.", [weather])),
                Message.user("Weather in Paris?"),
                Message.assistant("User wants weather. Call tool.", channel="analysis"),
                Message.tool_call("get_weather", '{"location":"Paris"}'),
                Message.tool_result("get_weather", '{"temp":20}'),
            ],
        ),
        (
            "drops-analysis-before-first-final",
            [
                Message.system(),
                Message.user("2+2?"),
                Message.assistant("Simple.", "analysis"),
                Message.assistant("4", "final"),
                Message.user("and 3+3?"),
                Message.assistant("Also simple.", "analysis"),
                Message.assistant("6", "final"),
                Message.user("thanks"),
            ],
        ),
        (
            "keeps-analysis-when-last-assistant-not-final",
            [
                Message.system(),
                Message.developer(DeveloperContent(None, [weather])),
                Message.user("2+2?"),
                Message.assistant("Simple.", "analysis"),
                Message.assistant("4", "final"),
                Message.user("weather?"),
                Message.assistant("Need tool.", "analysis"),
                Message.tool_call("get_weather", "{}"),
            ],
        ),
        (
            "tool-call-on-analysis-channel",
            [
                Message.system(),
                Message.developer(DeveloperContent(None, [weather])),
                Message.user("w?"),
                Message.tool_call("get_weather", '{"location":"Oslo"}', channel="analysis"),
                Message.tool_result("get_weather", "sunny"),
            ],
        ),
        (
            "bare-json-content-type-and-names",
            [
                Message.system(),
                Message("user", "hi", name="alice"),
                Message("assistant", '{"a":1}', channel="commentary", recipient="functions.f", content_type="json"),
                Message("tool", "ok", channel="commentary", recipient="assistant", name="functions.f"),
                Message("assistant", "to all", channel="final", recipient="all"),
            ],
        ),
    ]


ALL_CONVERSATIONS = hand_written_conversations() + generated_conversations()


@pytest.mark.parametrize("messages", [c for _, c in ALL_CONVERSATIONS], ids=[n for n, _ in ALL_CONVERSATIONS])
def test_render_matches_openai_harmony(shared_dir, messages):
    oh, oracle = load_oracle(shared_dir)
    encoding = load_real_encoding(shared_dir)
    expected = oracle_prompt(oh, oracle, messages)
    got = encoding.render_chat_prompt(messages)
    if got != expected:
        assert encoding.decode(got) == oracle.decode(expected)  # shows the text difference first
    assert got == expected


def test_generated_conversations_cover_the_issue_list():
    """The generated set has every effort, tools and none, response formats, dates, tool rounds, non-ASCII."""
    convs = [c for _, c in ALL_CONVERSATIONS]
    assert len(convs) >= 40
    efforts = {m.content.reasoning_effort for c in convs for m in c if isinstance(m.content, SystemContent)}
    assert {"low", "medium", "high"} <= efforts
    developer = [m.content for c in convs for m in c if isinstance(m.content, DeveloperContent)]
    assert any(d.tools for d in developer) and any(d.response_format for d in developer)
    assert any(d.instructions for d in developer)
    assert any(not any(isinstance(m.content, DeveloperContent) for m in c) for c in convs)
    assert any(m.role == "tool" for c in convs for m in c)
    assert any(any(ord(ch) > 127 for ch in m.text) for c in convs for m in c)


def test_special_token_text_is_encoded_as_text(shared_dir):
    encoding = load_real_encoding(shared_dir)
    ids = encoding.encode_text("a <|end|> b")
    assert encoding.end_id not in ids
    assert encoding.decode(ids) == "a <|end|> b"


# ---------------------------------------------------------------- schema rendering (no tokenizer needed)


def test_schema_rendering_matches_the_format_guide():
    schema = {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["location"],
    }
    assert json_schema_to_typescript(schema) == (
        "{\n// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
        'format?: "celsius" | "fahrenheit", // default: celsius\n}'
    )


def test_schema_nested_arrays_and_unknowns():
    assert json_schema_to_typescript({"type": "array", "items": {"type": "integer"}}) == "number[]"
    assert json_schema_to_typescript({"type": "array"}) == "Array<any>"
    assert json_schema_to_typescript({"enum": ["a"]}) == "any"
    assert json_schema_to_typescript({"type": ["integer", "null"]}) == "number | null"
    nested = json_schema_to_typescript(
        {
            "type": "object",
            "properties": {"p": {"type": "object", "properties": {"q": {"type": "boolean"}}, "required": ["q"]}},
        }
    )
    assert nested == "{\np?: {\n    q: boolean,\n    },\n}"


def test_json_text_is_serde_style():
    assert (
        json_text([1, 2.5, 1e-7, 1e21, 1e16, 0.00001, 1.0, -0.0, True, None, "é\n"])
        == '[1,2.5,1e-7,1e21,1e16,0.00001,1.0,-0.0,true,null,"é\\n"]'
    )


# ---------------------------------------------------------------- tiny tokenizer (always runs)


@pytest.fixture(scope="module")
def tiny() -> HarmonyEncoding:
    return HarmonyEncoding(build_tiny_tokenizer())


def test_tiny_render_structure(tiny):
    conv = build_conversation(
        [Message.user("Hello, world!")],
        instructions="Be brief.",
        tools=TOOLS[:1],
        reasoning_effort="high",
        current_date="2026-11-26",
    )
    ids = tiny.render_chat_prompt(conv)
    text = tiny.decode(ids)
    assert text.startswith(
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2026-11-26\n\nReasoning: high\n\n"
    )
    assert "Calls to these tools must go to the commentary channel: 'functions'.<|end|>" in text
    assert "<|start|>developer<|message|># Instructions\n\nBe brief.\n\n# Tools\n\n## functions\n\n" in text
    assert text.endswith("<|start|>user<|message|>Hello, world!<|end|><|start|>assistant")
    assert ids.count(tiny.start_id) == 4
    assert ids[-1 - len(tiny.encode_text("assistant"))] == tiny.start_id


def test_tiny_tool_call_rendering(tiny):
    ids = tiny.render_message(Message.tool_call("get_weather", '{"location":"Paris"}'))
    assert tiny.decode(ids) == (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"location":"Paris"}<|call|>'
    )
    assert tiny.constrain_id in ids and ids[-1] == tiny.call_id
    ids = tiny.render_message(Message.tool_result("get_weather", "20C"))
    assert tiny.decode(ids) == "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>20C<|end|>"


def test_no_functions_line_without_tools(tiny):
    text = tiny.decode(tiny.render_chat_prompt(build_conversation([Message.user("x")])))
    assert "Calls to these tools" not in text and "developer" not in text
    assert "Reasoning: medium" in text


def test_drop_rule():
    msgs = [
        Message.user("q"),
        Message.assistant("think", "analysis"),
        Message.assistant("a", "final"),
        Message.user("q2"),
        Message.assistant("think2", "analysis"),
        Message.tool_call("f", "{}"),
    ]
    assert messages_to_render(msgs) == msgs  # last assistant message is a call: keep everything
    msgs2 = [*msgs, Message.tool_result("f", "1"), Message.assistant("a2", "final")]
    kept = messages_to_render(msgs2)
    assert Message.assistant("think", "analysis") not in kept and Message.assistant("think2", "analysis") in kept
    assert messages_to_render(msgs2, auto_drop_analysis=False) == msgs2


def test_response_format_section():
    text = render_response_format_section(RESPONSE_FORMAT)
    assert text.startswith("# Response Formats\n\n## shopping_list\n\n// A shopping list — épicerie\n{")
    assert json.loads(text.split("\n")[-1]) == RESPONSE_FORMAT.schema


def test_module_does_not_use_openai_harmony():
    """openai-harmony is the tests' oracle only: the engine must run without it."""
    package = Path(__file__).resolve().parents[1] / "engine" / "harmony"
    for path in package.glob("*.py"):
        assert "openai_harmony" not in path.read_text(), path.name
