"""engine/harmony parsing: full and streaming parses equal openai-harmony's; malformed output never raises."""

from __future__ import annotations

import random

import pytest
from gptoss.engine.harmony import HarmonyEncoding, Message, ToolCall, message_kind
from gptoss.engine.tokenizer import build_tiny_tokenizer
from test_harmony_render import load_oracle, load_real_encoding, to_oracle_message

# ---------------------------------------------------------------- completions to parse

COMPLETIONS: list[tuple[str, list[Message]]] = [
    ("final-only", [Message.assistant("Paris is the capital of France.")]),
    (
        "analysis-final",
        [Message.assistant('User asks: "What is 2 + 2?" Simple.', "analysis"), Message.assistant("2 + 2 = 4.")],
    ),
    (
        "analysis-toolcall",
        [
            Message.assistant("Need to use function get_weather.", "analysis"),
            Message.tool_call("get_weather", '{"location":"San Francisco"}'),
        ],
    ),
    (
        "preamble-two-calls",
        [
            Message.assistant("Plan it.", "analysis"),
            Message.assistant("**Action plan**:\n1. Look\n2. Answer", "commentary"),
            Message.tool_call("search", '{"query": "café 日本語"}'),
        ],
    ),
    ("call-on-analysis", [Message.tool_call("get_weather", "{}", channel="analysis")]),
    (
        "unicode",
        [Message.assistant("Думаю… 🤔 العربية", "analysis"), Message.assistant("答えは 42 です 🙂🇫🇷 — naïve café")],
    ),
    ("empty-analysis", [Message.assistant("", "analysis"), Message.assistant("ok")]),
    ("whitespace", [Message.assistant("  \n\n  spaced\tout  \n", "analysis"), Message.assistant("\n")]),
]

# What the model really writes (text, encoded with special tokens), not only what the renderer writes.
MODEL_TEXTS = [
    "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"location":"SF"}<|call|>',
    '<|channel|>commentary to=functions.get_weather json<|message|>{"location":"Tokyo"}<|call|>',
    '<|channel|>analysis to=functions.lookup <|constrain|>json<|message|>{"id": 7}<|call|>',
    " to=functions.f<|channel|>commentary<|constrain|>json<|message|>{}<|call|>",
    '<|channel|>commentary to=functions.f<|constrain|>json<|message|>{"a": [1, 2]}<|call|>',
    "<|channel|>analysis<|message|>Thinking.<|end|><|start|>assistant<|channel|>commentary<|message|>"
    "Checking now.<|end|><|start|>assistant to=functions.g<|channel|>commentary <|constrain|>json"
    '<|message|>{"x": "ü"}<|call|>',
    "<|channel|>final<|message|>Done: ✓<|return|>",
]


def _completion_tokens(oh, oracle, messages: list[Message]) -> list[int]:
    """openai-harmony's rendering of assistant output, minus the prompt's `<|start|>assistant`."""
    ids: list[int] = []
    for message in messages:
        ids += oracle.render(to_oracle_message(oh, oracle, message))
    prefix = [ids[0], *oracle.encode("assistant")]
    assert ids[: len(prefix)] == prefix
    ids = ids[len(prefix) :]
    if messages[-1].channel == "final" and messages[-1].recipient is None:
        ids[-1] = oracle.encode("<|return|>", allowed_special="all")[0]
    return ids


def _oracle_tuples(messages) -> list[tuple]:
    out = []
    for m in messages:
        text = "".join(c.text for c in m.content)
        out.append((m.author.role.value, m.author.name, m.channel, m.recipient, m.content_type, text))
    return out


def _our_tuples(messages: list[Message]) -> list[tuple]:
    return [(m.role, m.name, m.channel, m.recipient, m.content_type, m.text) for m in messages]


def _oracle_cases(oh, oracle) -> list[list[int]]:
    cases = [_completion_tokens(oh, oracle, msgs) for _, msgs in COMPLETIONS]
    cases += [oracle.encode(text, allowed_special="all") for text in MODEL_TEXTS]
    return cases


CASE_IDS = [name for name, _ in COMPLETIONS] + [f"model-text-{i}" for i in range(len(MODEL_TEXTS))]


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_parse_matches_openai_harmony(shared_dir, case):
    oh, oracle = load_oracle(shared_dir)
    encoding = load_real_encoding(shared_dir)
    tokens = _oracle_cases(oh, oracle)[case]
    expected = _oracle_tuples(oracle.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT))
    result = encoding.parse_completion(tokens)
    assert _our_tuples(result.messages) == expected
    assert not result.issues and not result.truncated
    assert result.stop_token in encoding.stop_token_ids


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_streaming_matches_openai_harmony(shared_dir, case):
    oh, oracle = load_oracle(shared_dir)
    encoding = load_real_encoding(shared_dir)
    tokens = _oracle_cases(oh, oracle)[case]
    ref = oh.StreamableParser(oracle, oh.Role.ASSISTANT)
    ours = encoding.stream_parser()
    for token in tokens:
        ref.process(token)
        event = ours.process(token)
        assert ours.current_channel == ref.current_channel
        assert ours.current_recipient == ref.current_recipient
        assert ours.current_content_type == ref.current_content_type
        assert ours.last_content_delta == ref.last_content_delta
        assert (event.text or None) == ref.last_content_delta
        assert ours.current_content == ref.current_content
        assert _our_tuples(ours.messages) == _oracle_tuples(ref.messages)
    ours.finish()
    assert _our_tuples(ours.result.messages) == _oracle_tuples(ref.messages)


def test_cut_anywhere_matches_openai_harmony_or_flags_truncation(shared_dir):
    """Every prefix (max_tokens can stop anywhere): equal to the oracle where it parses, flagged where not."""
    oh, oracle = load_oracle(shared_dir)
    encoding = load_real_encoding(shared_dir)
    cases = _oracle_cases(oh, oracle)
    for tokens, cut in [
        (t, c) for t in (cases[CASE_IDS.index("preamble-two-calls")], cases[-2]) for c in range(1, len(t) + 1)
    ]:
        prefix = tokens[:cut]
        result = encoding.parse_completion(prefix)
        try:
            expected = _oracle_tuples(oracle.parse_messages_from_completion_tokens(prefix, oh.Role.ASSISTANT))
        except Exception:  # the oracle refuses output cut inside a header
            assert result.truncated and result.issues
            continue
        assert _our_tuples(result.messages) == expected
        ends_cleanly = prefix[-1] in (encoding.end_id, *encoding.stop_token_ids)
        assert result.truncated == (not ends_cleanly)


FUZZ_HEADERS = [
    "<|channel|>analysis",
    "<|channel|>final",
    "<|channel|>commentary",
    "<|channel|>commentary to=functions.f <|constrain|>json",
    " to=functions.f<|channel|>commentary json",
    "<|channel|>analysis to=functions.g",
    "<|channel|>commentary to=functions.f<|constrain|>json",
    " to=functions.f<|channel|>commentary <|constrain|>json",
    "<|channel|>final json x",
    "<|channel|>thoughts",
    "",
    " to=functions.f json",
    "<|channel|>",
]
FUZZ_CONTENT = ["hello", " world", "日本語", "🙂", "\n\n", '{"a": 1}', "<|constrain|>", " to=x", "é"]
FUZZ_ENDS = ["<|end|>", "<|return|>", "<|call|>", "<|start|>", ""]


def _fuzz_text(rng: random.Random) -> str:
    out = []
    for i in range(rng.randint(1, 4)):
        if i:
            out.append(rng.choice(["<|start|>assistant", "<|start|>assistant", "", "<|start|>"]))
        out.append(rng.choice(FUZZ_HEADERS))
        out.append(rng.choice(["<|message|>"] * 6 + [""]))
        out.append("".join(rng.choice(FUZZ_CONTENT) for _ in range(rng.randint(0, 5))))
        out.append(rng.choice(FUZZ_ENDS))
    return "".join(out)


def test_fuzz_clean_parses_agree_with_openai_harmony(shared_dir):
    """Random (often malformed) outputs: whenever we report no issue, the oracle agrees token by token."""
    oh, oracle = load_oracle(shared_dir)
    encoding = load_real_encoding(shared_dir)
    rng = random.Random(7)
    clean = 0
    for _ in range(1000):
        text = _fuzz_text(rng)
        tokens = oracle.encode(text, allowed_special="all")
        ours = encoding.stream_parser()
        deltas = []
        for token in tokens:
            ours.process(token)
            deltas.append(ours.last_content_delta)
        ours.finish()
        if ours.issues:
            continue
        clean += 1
        ref = oh.StreamableParser(oracle, oh.Role.ASSISTANT)
        for token, delta in zip(tokens, deltas, strict=True):
            ref.process(token)
            assert delta == ref.last_content_delta, text
        ref.process_eos()
        assert _our_tuples(ours.messages) == _oracle_tuples(ref.messages), text
    assert clean > 100


@pytest.mark.parametrize(
    "text",
    [
        "I must refuse<|end|><|start|>assistant<|channel|>final<|message|>Sorry.<|return|>",
        "<|channel|>analysis I must refuse<|end|><|start|>assistant<|channel|>final<|message|>No.<|return|>",
        "... Let's use the tool.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json"
        '<|message|>{"location": "Tokyo"}<|call|>',
    ],
)
def test_missing_message_token_like_non_strict_oracle(shared_dir, text):
    oh, oracle = load_oracle(shared_dir)
    encoding = load_real_encoding(shared_dir)
    tokens = oracle.encode(text, allowed_special="all")
    expected = oracle.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT, strict=False)
    result = encoding.parse_completion(tokens)
    assert _our_tuples(result.messages) == _oracle_tuples(expected)
    assert result.malformed


@pytest.mark.parametrize(
    "tokens",
    [
        [9552, 9552],  # " \xf0\x9f" twice: invalid UTF-8
        [9552, 9552, 1311],
        [9552, 1311, 9552],
    ],
    ids=["invalid", "invalid-then-text", "interleaved"],
)
def test_invalid_utf8_deltas_match_openai_harmony(shared_dir, tokens):
    oh, oracle = load_oracle(shared_dir)
    encoding = load_real_encoding(shared_dir)
    head = oracle.encode("<|channel|>final<|message|>", allowed_special="all")
    end = oracle.encode("<|return|>", allowed_special="all")
    for tail in (end, []):
        ref = oh.StreamableParser(oracle, oh.Role.ASSISTANT)
        ours = encoding.stream_parser()
        for token in head + tokens + tail:
            ref.process(token)
            ours.process(token)
            assert ours.last_content_delta == ref.last_content_delta
        ref.process_eos()
        ours.finish()
        assert _our_tuples(ours.result.messages) == _oracle_tuples(ref.messages)


def test_split_characters_stream_whole(shared_dir):
    encoding = load_real_encoding(shared_dir)
    text = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🤖🦜 ꙮ 𓀀𓀁 — done"
    content = encoding.encode_text(text)
    assert any(encoding.token_bytes(t).decode("utf-8", errors="ignore") == "" for t in content)
    _check_streaming(encoding, content, text)


# ---------------------------------------------------------------- tiny tokenizer (always runs)


@pytest.fixture(scope="module")
def tiny() -> HarmonyEncoding:
    return HarmonyEncoding(build_tiny_tokenizer())


def _header(enc: HarmonyEncoding, channel: str) -> list[int]:
    return [enc.channel_id, *enc.encode_text(channel), enc.message_id]


def _check_streaming(enc: HarmonyEncoding, content: list[int], text: str) -> None:
    parser = enc.stream_parser()
    deltas = []
    for token in [enc.channel_id, *enc.encode_text("final"), enc.message_id, *content, enc.return_id]:
        event = parser.process(token)
        deltas.append(event.text)
    assert "".join(deltas) == text
    assert parser.result.final_text == text


def _tiny_completion(enc: HarmonyEncoding, messages: list[Message]) -> list[int]:
    ids: list[int] = []
    for message in messages:
        ids += enc.render_message(message)
    prefix = [enc.start_id, *enc.encode_text("assistant")]
    assert ids[: len(prefix)] == prefix
    ids = ids[len(prefix) :]
    if messages[-1].channel == "final":
        ids[-1] = enc.return_id
    return ids


@pytest.mark.parametrize("messages", [m for _, m in COMPLETIONS], ids=[n for n, _ in COMPLETIONS])
def test_tiny_round_trip(tiny, messages):
    result = tiny.parse_completion(_tiny_completion(tiny, messages))
    assert result.messages == messages
    assert not result.issues and not result.truncated


def test_result_views(tiny):
    messages = [
        Message.assistant("think", "analysis"),
        Message.assistant("plan", "commentary"),
        Message.tool_call("get_weather", '{"location":"Paris"}'),
        Message.tool_call("lookup", "{}", channel="analysis"),
    ]
    result = tiny.parse_completion(_tiny_completion(tiny, messages))
    assert result.reasoning_text == "think"
    assert result.commentary_text == "plan"
    assert result.final_text == ""
    assert result.tool_calls == [ToolCall("get_weather", '{"location":"Paris"}'), ToolCall("lookup", "{}")]
    assert next(tuple(c) for c in result.tool_calls) == ("get_weather", '{"location":"Paris"}')
    assert result.stop_token == tiny.call_id
    assert tiny.stop_token_ids == (tiny.return_id, tiny.call_id) and tiny.end_id not in tiny.stop_token_ids


def test_message_kind():
    assert message_kind("analysis", None) == "reasoning"
    assert message_kind("analysis", "functions.f") == "tool_call"
    assert message_kind("commentary", None) == "commentary"
    assert message_kind(None, None) == "final"
    assert message_kind("final", "all") == "final"
    assert message_kind("bogus", None) == "reasoning"


def test_streaming_deltas_concatenate_and_report_headers(tiny):
    messages = [
        Message.assistant("Let me think step by step. 日本語 🙂", "analysis"),
        Message.tool_call("get_weather", '{"location": "Paris", "unit": "celsius"}'),
    ]
    parser = tiny.stream_parser()
    texts: dict[int, list[str]] = {}
    starts, dones = [], []
    for token in _tiny_completion(tiny, messages):
        event = parser.process(token)
        if event.message_started:
            starts.append((event.kind, event.channel, event.recipient, event.content_type))
        if event.text:
            texts.setdefault(len(dones), []).append(event.text)
            assert (event.channel, event.recipient) == (parser.current_channel, parser.current_recipient)
        if event.message_done is not None:
            dones.append(event.message_done)
    assert starts == [
        ("reasoning", "analysis", None, None),
        ("tool_call", "commentary", "functions.get_weather", "<|constrain|>json"),
    ]
    assert dones == messages
    assert ["".join(texts[i]) for i in range(2)] == [m.text for m in messages]
    assert event.stop and parser.finish().message_done is None


def test_utf8_split_across_tokens_only_whole_characters(tiny):
    text = "𓀀𓀁 ꙮ ψ 日本語 🙂 русский café"
    content = tiny.encode_text(text)
    assert any(len(tiny.token_bytes(t)) == 1 and tiny.token_bytes(t)[0] >= 0x80 for t in content)  # byte tokens
    parser = tiny.stream_parser()
    for token in _header(tiny, "final"):
        parser.process(token)
    deltas = [parser.process(token).text for token in content]
    assert "" in deltas  # some token held back part of a character
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_truncated_mid_character(tiny):
    content = tiny.encode_text("ok 𓀀")
    cut = next(i for i in range(1, len(content)) if tiny.decode(content[:i]).endswith("\ufffd"))
    parser = tiny.stream_parser()
    for token in _header(tiny, "final") + content[:cut]:
        parser.process(token)
    event = parser.finish()
    result = parser.result
    assert result.truncated and result.final_text.endswith("\ufffd")
    assert event.message_done is not None and event.text == "\ufffd"


def test_truncated_anywhere_never_raises(tiny):
    messages = [
        Message.assistant("Think.", "analysis"),
        Message.assistant("Pre.", "commentary"),
        Message.tool_call("f", '{"a": "ü"}'),
    ]
    tokens = _tiny_completion(tiny, messages)
    for cut in range(len(tokens) + 1):
        result = tiny.parse_completion(tokens[:cut])
        assert len(result.messages) <= len(messages)
        for got, want in zip(result.messages, messages, strict=False):
            assert (got.channel, got.recipient) == (want.channel, want.recipient)
            assert want.text.startswith(got.text.rstrip("\ufffd"))
    assert tiny.parse_completion(tokens[:-3]).truncated


def test_malformed_outputs_are_flagged_not_raised(tiny):
    enc = tiny
    txt = enc.encode_text
    cases = {
        "unknown-channel": _header(enc, "thoughts") + txt("hmm") + [enc.end_id],
        "missing-message": [enc.channel_id, *txt("final Hello there"), enc.return_id],
        "start-inside-content": _header(enc, "analysis")
        + txt("a")
        + [enc.start_id]
        + txt("assistant")
        + _header(enc, "final")
        + txt("b")
        + [enc.return_id],
        "start-inside-header": [
            enc.channel_id,
            *txt("fin"),
            enc.start_id,
            *txt("assistant"),
            *_header(enc, "final"),
            *txt("b"),
            enc.return_id,
        ],
        "stray-after-end": _header(enc, "analysis")
        + txt("a")
        + [enc.end_id]
        + txt("junk")
        + [enc.start_id]
        + txt("assistant")
        + _header(enc, "final")
        + txt("b")
        + [enc.return_id],
        "channel-without-start": _header(enc, "analysis")
        + txt("a")
        + [enc.end_id]
        + _header(enc, "final")
        + txt("b")
        + [enc.return_id],
        "empty-channel": [enc.channel_id, enc.message_id, *txt("x"), enc.return_id],
        "header-words-left": [
            enc.channel_id,
            *txt("commentary to=functions.f json extra"),
            enc.message_id,
            *txt("{}"),
            enc.call_id,
        ],
        "unknown-role": [
            enc.channel_id,
            *txt("analysis"),
            enc.message_id,
            enc.end_id,
            enc.start_id,
            *txt("wizard"),
            *_header(enc, "final"),
            *txt("b"),
            enc.return_id,
        ],
    }
    for name, tokens in cases.items():
        result = enc.parse_completion(tokens)
        assert result.malformed, name
        assert not result.truncated, name
    assert enc.parse_completion(cases["unknown-channel"]).reasoning_text == "hmm"
    assert enc.parse_completion(cases["missing-message"]).messages == [Message("assistant", "Hello there", "final")]
    assert enc.parse_completion(cases["start-inside-content"]).final_text == "b"
    assert enc.parse_completion(cases["start-inside-header"]).final_text == "b"
    assert enc.parse_completion(cases["stray-after-end"]).final_text == "b"
    assert enc.parse_completion(cases["channel-without-start"]).final_text == "b"
    assert enc.parse_completion(cases["header-words-left"]).tool_calls == [ToolCall("f", "{}")]
    assert enc.parse_completion(cases["unknown-role"]).final_text == "b"


def test_random_tokens_never_raise(tiny):
    rng = random.Random(0)
    vocab = tiny.tokenizer.get_vocab_size()
    specials = [
        tiny.start_id,
        tiny.end_id,
        tiny.message_id,
        tiny.channel_id,
        tiny.return_id,
        tiny.call_id,
        tiny.constrain_id,
    ]
    for _ in range(200):
        tokens = [
            rng.choice(specials) if rng.random() < 0.3 else rng.randrange(vocab + 5) for _ in range(rng.randint(0, 40))
        ]
        parser = tiny.stream_parser(role=rng.choice(["assistant", None]))
        for token in tokens:
            parser.process(token)
        parser.finish()
        assert isinstance(parser.result.final_text, str)


def test_lone_content_type_on_final_is_not_a_recipient() -> None:
    from gptoss.engine.harmony import HarmonyEncoding
    from gptoss.engine.tokenizer import build_tiny_tokenizer

    enc = HarmonyEncoding(build_tiny_tokenizer())
    for header in ("<|channel|>final <|constrain|>json", "<|channel|>final json"):
        ids = enc.tokenizer.encode(header + '<|message|>{"a": 1}<|return|>', add_special_tokens=False).ids
        result = enc.parse_completion(ids)
        assert result.tool_calls == []
        assert result.final_text == '{"a": 1}'
        assert result.messages[0].recipient is None
