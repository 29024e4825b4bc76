"""Structured outputs (engine/structured_output/): a random "model" decodes under the grammar and every reply
must be well-formed harmony whose final message (or tool call) is JSON valid against its schema.

The random driver samples at temperature 1 from random logits restricted to the allowed tokens, and feeds the
token back. To keep runs short it biases toward ending: past a per-run budget of tokens since the last special
token, closers (`"`, `]`, `}` tokens) and the end tokens (`<|end|>`, `<|return|>`, `<|call|>`) get a growing
bonus, so free text ends and JSON closes as soon as the grammar allows.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import torch
from gptoss.engine.structured_output.grammar import (
    BitmaskWorker,
    StructuredOutputCompiler,
    StructuredOutputState,
    _unpack_bytes_torch,
    allocate_token_bitmask,
    allowed_token_mask_for_batch,
    fill_token_bitmasks,
    unpack_token_bitmask,
)
from gptoss.engine.structured_output.spec import StructuredOutputError, StructuredOutputSpec
from gptoss.engine.tokenizer import build_tiny_tokenizer, load_tokenizer

# The model's vocabulary is larger than the tiny tokenizer's: the padding ids must never be allowed.
TINY_PADDING = 39

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "optional_properties": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"type": "string"}},
        "required": ["b"],
        "additionalProperties": False,
    },
    "array_bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "string_enum": {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["unit"],
        "additionalProperties": False,
    },
    "mixed_enum": {"enum": [1, "two", None, True, 3.5]},
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "x": {"type": "number"}},
        "required": ["kind", "x"],
        "additionalProperties": False,
    },
    "number_bounds": {
        "type": "object",
        "properties": {
            "p": {"type": "number", "minimum": 0, "maximum": 1},
            "t": {"type": "number", "exclusiveMinimum": -10},
        },
        "required": ["p", "t"],
        "additionalProperties": False,
    },
    "integer_bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 130},
            "delta": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["age", "delta"],
        "additionalProperties": False,
    },
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "string_pattern": {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{2}$"},
    "string_length": {"type": "string", "minLength": 3, "maxLength": 6},
    "any_of_scalars": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}, {"type": "null"}]},
    "any_of_objects": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"cat": {"type": "string"}},
                "required": ["cat"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"dog": {"type": "integer"}},
                "required": ["dog"],
                "additionalProperties": False,
            },
        ]
    },
    "one_of_disjoint": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "nullable_type_list": {
        "type": "object",
        "properties": {"v": {"type": ["string", "null"]}},
        "required": ["v"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"type": "string"}, "n": {"type": "integer", "minimum": 0}},
            "required": ["k", "n"],
            "additionalProperties": False,
        },
        "maxItems": 3,
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    "recursive_tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["value"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "boolean"}],
        "items": False,
        "minItems": 2,
    },
    "nested_arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "maxItems": 3,
    },
    "additional_properties_schema": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "any_json": {},
    "date_format": {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
        "additionalProperties": False,
    },
    "unicode_keys": {
        "type": "object",
        "properties": {"café": {"type": "string"}, "日本": {"type": "integer"}},
        "required": ["café", "日本"],
        "additionalProperties": False,
    },
}

REAL_SCHEMAS = ["nested_object", "integer_bounds", "any_of_objects", "array_of_objects", "string_pattern"]

FINAL_RE = re.compile(
    r"((?:<\|channel\|>(?:analysis|commentary)<\|message\|>.*?<\|end\|><\|start\|>assistant)*)"
    r"<\|channel\|>final<\|message\|>(.*)<\|return\|>",
    re.S,
)
CALL_RE = re.compile(
    r"((?:<\|channel\|>(?:analysis|commentary)<\|message\|>.*?<\|end\|><\|start\|>assistant)*)"
    r"(?: to=functions\.(\w+)<\|channel\|>commentary|<\|channel\|>commentary to=functions\.(\w+))"
    r"(?: <\|constrain\|>json| json)?<\|message\|>(.*)<\|call\|>",
    re.S,
)


# --------------------------------------------------------------------------------------------------------
# Fixtures and the random driver
# --------------------------------------------------------------------------------------------------------


class Driver:
    """A random model over one tokenizer: closers and end tokens precomputed once."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        closers = []
        for token_id in range(tokenizer.get_vocab_size()):
            text = tokenizer.decode([token_id], skip_special_tokens=False).strip()
            if text and set(text) <= set('"]}'):
                closers.append(token_id)
        self.closers = torch.tensor(closers, dtype=torch.int64)
        self.enders = torch.tensor([tokenizer.token_to_id(t) for t in ("<|end|>", "<|return|>", "<|call|>")])
        self.specials = {i for i in range(tokenizer.get_vocab_size()) if tokenizer.id_to_token(i).startswith("<|")}

    def run(self, state: StructuredOutputState, seed: int, max_steps: int = 1500) -> list[int]:
        """Generate until the grammar says the reply is complete; returns the generated token ids."""
        # One torch thread: [V]-sized elementwise ops are too small to gain from threads, and on a shared,
        # loaded 2-core machine OpenMP threads contend badly (30x slower here).
        num_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._run(state, seed, max_steps)
        finally:
            torch.set_num_threads(num_threads)

    def _run(self, state: StructuredOutputState, seed: int, max_steps: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        budget = int(torch.randint(0, 24, (1,), generator=generator))
        token_ids: list[int] = []
        since_special = 0
        bitmask = allocate_token_bitmask(1, self.vocab_size)
        for _ in range(max_steps):
            logits = torch.randn(self.vocab_size, generator=generator)
            over = since_special - budget
            if over > 0:
                logits[self.closers] += 1.0 * over
                logits[self.enders] += 2.0 * over
            state.fill_bitmask(bitmask)
            allowed = unpack_token_bitmask(bitmask, self.vocab_size)[0]
            assert allowed.any()
            logits[~allowed] = float("-inf")
            gumbel = -torch.log(-torch.log(torch.rand(self.vocab_size, generator=generator).clamp_min(1e-20)))
            token_id = int((logits + gumbel).argmax())
            assert state.accept_token(token_id), f"allowed token {token_id} refused"
            token_ids.append(token_id)
            since_special = 0 if token_id in self.specials else since_special + 1
            if state.is_terminated():
                return token_ids
        raise AssertionError(f"no end after {max_steps} tokens: {self.decode(token_ids)!r}")

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    vocab_size = tokenizer.get_vocab_size() + TINY_PADDING
    return StructuredOutputCompiler(tokenizer, vocab_size), Driver(tokenizer, vocab_size)


@pytest.fixture(scope="module")
def real(shared_dir):
    tokenizer = load_tokenizer(shared_dir / "vocab" / "o200k_harmony.tokenizer.json")
    vocab_size = 201088
    return StructuredOutputCompiler(tokenizer, vocab_size), Driver(tokenizer, vocab_size)


def json_schema_spec(schema: dict[str, Any], strict: bool = True) -> StructuredOutputSpec:
    spec = StructuredOutputSpec.from_request(
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}
    )
    assert spec is not None
    return spec


def final_json(driver: Driver, token_ids: list[int]) -> tuple[str, Any]:
    """(the messages before the final one, the final message parsed as JSON); fails on malformed harmony."""
    text = driver.decode(token_ids)
    match = FINAL_RE.fullmatch(text)
    assert match is not None, f"not a harmony reply ending in a final message: {text!r}"
    return match.group(1), json.loads(match.group(2))


# --------------------------------------------------------------------------------------------------------
# Random decoding under schemas
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_decoding_follows_schema_tiny(tiny, name: str) -> None:
    compiler, driver = tiny
    schema = SCHEMAS[name]
    for seed in range(3):
        state = compiler.new_state(json_schema_spec(schema))
        token_ids = driver.run(state, seed=seed * 101 + len(name))
        _, value = final_json(driver, token_ids)
        jsonschema.validate(value, schema)
        assert token_ids[-1] == compiler.stop_token_ids[0]


def test_analysis_present_and_absent_tiny(tiny) -> None:
    """Over seeds the model sometimes reasons first and sometimes answers at once: both are allowed."""
    compiler, driver = tiny
    spec = json_schema_spec(SCHEMAS["flat_object"])
    prefixes = set()
    for seed in range(12):
        prefix, value = final_json(driver, driver.run(compiler.new_state(spec), seed=seed))
        jsonschema.validate(value, SCHEMAS["flat_object"])
        prefixes.add(bool(prefix))
    assert prefixes == {True, False}


def test_json_object_mode_tiny(tiny) -> None:
    compiler, driver = tiny
    spec = StructuredOutputSpec.from_request({"type": "json_object"})
    assert spec is not None
    for seed in range(6):
        _, value = final_json(driver, driver.run(compiler.new_state(spec), seed=seed))
        assert isinstance(value, dict)


@pytest.mark.parametrize("name", REAL_SCHEMAS)
def test_random_decoding_follows_schema_real(real, name: str) -> None:
    compiler, driver = real
    state = compiler.new_state(json_schema_spec(SCHEMAS[name]))
    _, value = final_json(driver, driver.run(state, seed=len(name)))
    jsonschema.validate(value, SCHEMAS[name])


def test_json_object_mode_real(real) -> None:
    compiler, driver = real
    spec = StructuredOutputSpec.from_request({"type": "json_object"})
    assert spec is not None
    _, value = final_json(driver, driver.run(compiler.new_state(spec), seed=3))
    assert isinstance(value, dict)


# --------------------------------------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------------------------------------

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "location": {"type": "string"},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["location", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS, "strict": True}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},  # not strict
]


def parse_call(driver: Driver, token_ids: list[int]) -> tuple[str, str]:
    text = driver.decode(token_ids)
    match = CALL_RE.fullmatch(text)
    assert match is not None, f"not a harmony tool call: {text!r}"
    return match.group(2) or match.group(3), match.group(4)


def test_strict_tool_arguments_follow_schema(tiny) -> None:
    compiler, driver = tiny
    spec = StructuredOutputSpec.from_request(tools=TOOLS, tool_choice="required")
    assert spec is not None and not spec.allow_final
    names = set()
    for seed in range(10):
        token_ids = driver.run(compiler.new_state(spec), seed=seed)
        assert token_ids[-1] == compiler.stop_token_ids[1]  # <|call|>
        name, arguments = parse_call(driver, token_ids)
        names.add(name)
        if name == "get_weather":
            jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
        # "search" is not strict: its arguments are free text.
    assert names == {"get_weather", "search"}


def test_named_tool_choice_forces_that_tool(tiny) -> None:
    compiler, driver = tiny
    spec = StructuredOutputSpec.from_request(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert spec is not None
    for seed in range(4):
        name, arguments = parse_call(driver, driver.run(compiler.new_state(spec), seed=seed))
        assert name == "get_weather"
        jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)


def test_tools_with_response_format_allow_final_or_call(tiny) -> None:
    compiler, driver = tiny
    spec = StructuredOutputSpec.from_request(
        {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS["flat_object"], "strict": True}},
        tools=TOOLS[:1],
    )
    assert spec is not None and spec.allow_final
    kinds = set()
    for seed in range(16):
        token_ids = driver.run(compiler.new_state(spec), seed=seed)
        if token_ids[-1] == compiler.stop_token_ids[0]:
            jsonschema.validate(final_json(driver, token_ids)[1], SCHEMAS["flat_object"])
            kinds.add("final")
        else:
            _, arguments = parse_call(driver, token_ids)
            jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
            kinds.add("call")
    assert kinds == {"final", "call"}


def test_strict_tool_real(real) -> None:
    compiler, driver = real
    spec = StructuredOutputSpec.from_request(tools=TOOLS[:1], tool_choice="required")
    assert spec is not None
    name, arguments = parse_call(driver, driver.run(compiler.new_state(spec), seed=5))
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)


# Replies as a real model writes them (tokenized whole, as the tokenizer does): the grammar must accept every
# token, whatever the header order, JSON spacing, or tokenization across the grammar's literals.
NATURAL_REPLIES = [
    "<|channel|>analysis<|message|>The user wants JSON. Let me answer.<|end|><|start|>assistant"
    '<|channel|>final<|message|>{"name": "Ann", "age": 30}<|return|>',
    '<|channel|>final<|message|>{\n  "name": "Ann",\n  "age": 30\n}<|return|>',
    '<|channel|>final<|message|>{"name":"Ann","age":-3}<|return|>',
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location":"Paris","days":2}<|call|>',
    " to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    '{"location": "Paris", "unit": "c", "days": 7}<|call|>',
    '<|channel|>commentary to=functions.search json<|message|>{"q": "x"}<|call|>',
    "<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant<|channel|>commentary<|message|>Checking."
    '<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary<|message|>{"location":"P","days":1}'
    "<|call|>",
]


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_natural_replies_accepted(request: pytest.FixtureRequest, which: str) -> None:
    compiler, driver = request.getfixturevalue(which)
    spec = StructuredOutputSpec.from_request(
        {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS["flat_object"], "strict": True}},
        tools=TOOLS,
    )
    assert spec is not None
    for text in NATURAL_REPLIES:
        token_ids = driver.tokenizer.encode(text, add_special_tokens=False).ids
        state = compiler.new_state(spec)
        for i, token_id in enumerate(token_ids):
            assert state.accept_token(token_id), f"refused at {driver.decode(token_ids[: i + 1])!r}"
        assert state.is_terminated()
    # And what it must not write: properties out of the schema's order, a missing property, a wrong type.
    for bad in ('{"age": 30, "name": "Ann"}', '{"name": "Ann"}', '{"name": "Ann", "age": 3.5}'):
        token_ids = driver.tokenizer.encode(f"<|channel|>final<|message|>{bad}<|return|>", add_special_tokens=False).ids
        state = compiler.new_state(spec)
        assert not state.accept_tokens(token_ids)


@pytest.mark.parametrize("name", ["nested_object", "array_of_objects", "string_pattern"])
def test_start_in_final_reply_is_the_body_and_return(tiny, name: str) -> None:
    """A prompt ending with FINAL_HEADER: the reply is the JSON and `<|return|>`, no headers, no analysis."""
    compiler, driver = tiny
    spec = StructuredOutputSpec.from_request(
        {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS[name], "strict": True}},
        start_in_final=True,
    )
    assert spec is not None and spec.start_in_final and spec != json_schema_spec(SCHEMAS[name])
    assert "<|channel|>" not in compiler.compile(spec).grammar
    for seed in range(3):
        token_ids = driver.run(compiler.new_state(spec), seed=seed)
        assert token_ids[-1] == compiler.stop_token_ids[0]
        text = driver.decode(token_ids[:-1])
        assert "<|" not in text
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_start_in_final_json_object_and_text(tiny) -> None:
    compiler, driver = tiny
    spec = StructuredOutputSpec.from_request({"type": "json_object"}, start_in_final=True)
    assert spec is not None
    token_ids = driver.run(compiler.new_state(spec), seed=4)
    assert isinstance(json.loads(driver.decode(token_ids[:-1])), dict)
    # Free text in the final channel: anything without special tokens, then <|return|>.
    state = compiler.new_state(StructuredOutputSpec(start_in_final=True))
    assert state.accept_tokens(driver.tokenizer.encode("Hi there", add_special_tokens=False).ids)
    assert not state.accept_token(driver.tokenizer.token_to_id("<|channel|>"))
    assert state.accept_token(compiler.stop_token_ids[0]) and state.is_terminated()


def test_start_in_final_cannot_call_tools() -> None:
    with pytest.raises(StructuredOutputError, match="cannot call tools") as info:
        StructuredOutputSpec.from_request(None, TOOLS, "required", start_in_final=True)
    assert info.value.param == "tools"
    spec = StructuredOutputSpec.from_request({"type": "json_object"}, TOOLS, "none", start_in_final=True)
    assert spec is not None and spec.tools == ()


# --------------------------------------------------------------------------------------------------------
# Requests -> specs, and errors
# --------------------------------------------------------------------------------------------------------


def test_from_request_shapes() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    chat = StructuredOutputSpec.from_request(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    )
    responses = StructuredOutputSpec.from_request(
        {"type": "json_schema", "name": "x", "schema": dict(schema), "strict": True},
        response_format_param="text.format",
    )
    workers_ai = StructuredOutputSpec.from_request({"type": "json_schema", "json_schema": schema})
    assert chat is not None and responses is not None and workers_ai is not None
    assert chat == responses  # one cache entry
    # Property order is kept: the grammar emits properties in the schema's order.
    assert chat.final_schema == '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}}}'
    assert responses.final_param == "text.format.schema"
    assert chat.final_param == "response_format.json_schema.schema"
    assert workers_ai.final_param == "response_format.json_schema"
    assert chat.strict and not workers_ai.strict
    assert json.loads(chat.final_schema or "") == schema
    assert StructuredOutputSpec.from_request({"type": "json_object"}).final_schema == '{"type":"object"}'
    assert StructuredOutputSpec.from_request(None) is None
    assert StructuredOutputSpec.from_request({"type": "text"}) is None
    # Tools that are not strict, with tool_choice auto, get a grammar on the call header only.
    header_only = StructuredOutputSpec.from_request(tools=[TOOLS[1]])
    assert header_only == StructuredOutputSpec.from_request(tools=[TOOLS[1]], tool_choice="auto")
    assert header_only is not None and header_only.allow_final and header_only.tools[0].schema is None
    strict_tools = StructuredOutputSpec.from_request(tools=TOOLS)
    assert strict_tools is not None and [t.name for t in strict_tools.tools] == ["get_weather", "search"]
    assert strict_tools.tools[1].schema is None
    # Responses / Workers AI tool shapes.
    flat = StructuredOutputSpec.from_request(
        tools=[
            {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True},
            {"type": "web_search"},
            {"name": "g", "parameters": {}},
        ],
        tool_choice={"type": "function", "name": "g"},
    )
    assert flat is not None and [t.name for t in flat.tools] == ["g"] and not flat.allow_final
    no_calls = StructuredOutputSpec.from_request(tools=TOOLS, tool_choice="none")
    assert no_calls is not None and no_calls.tools == () and no_calls.allow_final


@pytest.mark.parametrize(
    ("request_kwargs", "param", "needle"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
            "response_format.json_schema.schema",
            "JSON Schema object",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}},
            "response_format.json_schema.schema",
            "false",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "function tool"),
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools[0].function.name", "name"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ],
)
def test_request_errors(request_kwargs: dict[str, Any], param: str, needle: str) -> None:
    with pytest.raises(StructuredOutputError) as info:
        StructuredOutputSpec.from_request(**request_kwargs)
    assert info.value.param == param
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "foo"}, "foo"),
        ({"type": "string", "pattern": "(abc"}, "regex"),
        ({"$ref": "#/$defs/missing"}, "/$defs/missing"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"enum": []}, "nsatisfiable"),
    ],
)
def test_invalid_or_unsupported_schema_is_a_named_error(tiny, schema: dict[str, Any], needle: str) -> None:
    compiler, _ = tiny
    with pytest.raises(StructuredOutputError) as info:
        compiler.new_state(json_schema_spec(schema))
    assert info.value.param == "response_format.json_schema.schema"
    assert needle in info.value.message


def test_non_strict_schema_ignores_unsupported_keywords(tiny) -> None:
    compiler, driver = tiny
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3}
    state = compiler.new_state(json_schema_spec(schema, strict=False))
    _, value = final_json(driver, driver.run(state, seed=1))
    assert isinstance(value, list) and all(isinstance(v, int) for v in value)
    # Invalid (not merely unsupported) stays an error without strict.
    with pytest.raises(StructuredOutputError):
        compiler.new_state(json_schema_spec({"type": "foo"}, strict=False))


def test_bad_tool_schema_names_the_tool(tiny) -> None:
    compiler, _ = tiny
    tools = [
        TOOLS[0],
        {"type": "function", "function": {"name": "bad", "strict": True, "parameters": {"type": "object", "if": {}}}},
    ]
    spec = StructuredOutputSpec.from_request(tools=tools)
    assert spec is not None
    with pytest.raises(StructuredOutputError) as info:
        compiler.new_state(spec)
    assert info.value.param == "tools[1].function.parameters"
    assert "if" in info.value.message


# --------------------------------------------------------------------------------------------------------
# The matcher
# --------------------------------------------------------------------------------------------------------


def test_padding_and_special_tokens_masked(tiny) -> None:
    compiler, driver = tiny
    tokenizer = driver.tokenizer
    tokenizer_size = tokenizer.get_vocab_size()
    state = compiler.new_state(json_schema_spec(SCHEMAS["flat_object"]))
    mask = state.allowed_token_mask()
    assert mask.shape == (tokenizer_size + TINY_PADDING,)
    assert mask.nonzero().flatten().tolist() == [tokenizer.token_to_id("<|channel|>")]
    # Inside the analysis text: ordinary tokens and <|end|> only; never padding or other specials.
    prefix = tokenizer.encode("<|channel|>analysis<|message|>Let me", add_special_tokens=False).ids
    assert state.accept_tokens(prefix)
    mask = state.allowed_token_mask()
    assert not mask[tokenizer_size:].any()
    allowed_specials = [i for i in driver.specials if mask[i]]
    assert allowed_specials == [tokenizer.token_to_id("<|end|>")]
    assert mask[tokenizer.encode(" the", add_special_tokens=False).ids[0]]
    # A shorter vocab_size cuts the mask (the caller's logits width).
    assert state.allowed_token_mask(tokenizer_size).shape == (tokenizer_size,)


def test_refused_token_leaves_state_unchanged(tiny) -> None:
    compiler, driver = tiny
    tokenizer = driver.tokenizer
    state = compiler.new_state(json_schema_spec(SCHEMAS["flat_object"]))
    prefix = tokenizer.encode("<|channel|>final<|message|>", add_special_tokens=False).ids
    assert state.accept_tokens(prefix)
    before = state.allowed_token_mask()
    assert not state.accept_token(tokenizer.token_to_id("<|return|>"))  # no JSON yet
    assert state.error is None and state.num_accepted_tokens == len(prefix)
    assert torch.equal(before, state.allowed_token_mask())
    assert state.accept_token(tokenizer.encode("{", add_special_tokens=False).ids[0])


def test_rollback_reset_and_replay(tiny) -> None:
    compiler, driver = tiny
    spec = json_schema_spec(SCHEMAS["nested_object"])
    state = compiler.new_state(spec)
    token_ids = driver.run(state, seed=7)
    assert state.is_terminated()
    replay = compiler.new_state(spec)
    masks = []
    for token_id in token_ids:
        masks.append(replay.allowed_token_mask())
        assert replay.accept_token(token_id)
    assert replay.is_terminated()
    # Roll back to every few positions: the mask matches what it was there.
    for keep in (len(token_ids) - 1, len(token_ids) // 2, 3, 0):
        replay.rollback(replay.num_accepted_tokens - keep)
        assert torch.equal(replay.allowed_token_mask(), masks[keep])
    replay.accept_tokens(token_ids[:5])
    replay.reset()
    assert replay.num_accepted_tokens == 0 and torch.equal(replay.allowed_token_mask(), masks[0])
    with pytest.raises(ValueError):
        replay.rollback(1)


def test_terminated_state_allows_only_stop_tokens(tiny) -> None:
    compiler, driver = tiny
    state = compiler.new_state(StructuredOutputSpec.from_request({"type": "json_object"}))
    driver.run(state, seed=2)
    assert state.is_terminated()
    assert set(state.allowed_token_mask().nonzero().flatten().tolist()) == set(compiler.stop_token_ids)


def test_compile_cache_is_lru_and_bounded() -> None:
    tokenizer = build_tiny_tokenizer()
    compiler = StructuredOutputCompiler(tokenizer, tokenizer.get_vocab_size(), cache_size=2)
    specs = [json_schema_spec(SCHEMAS[name]) for name in ("boolean", "null", "string_length")]
    for spec in specs[:2]:
        compiler.new_state(spec)
    compiler.new_state(json_schema_spec(dict(SCHEMAS["boolean"])))  # equal spec: a hit (and now most recent)
    assert compiler.num_compiled == 2
    compiler.new_state(specs[2])  # evicts "null", the least recently used
    compiler.new_state(specs[0])
    assert compiler.num_compiled == 3
    compiler.new_state(specs[1])
    assert compiler.num_compiled == 4
    with pytest.raises(ValueError):
        StructuredOutputCompiler(tokenizer, tokenizer.get_vocab_size() - 1)


# --------------------------------------------------------------------------------------------------------
# Batched bitmasks
# --------------------------------------------------------------------------------------------------------


def _states_in_various_places(compiler: StructuredOutputCompiler, driver: Driver) -> list[StructuredOutputState]:
    states = []
    for i, name in enumerate(("flat_object", "array_of_objects", "string_pattern", "refs", "boolean")):
        spec = json_schema_spec(SCHEMAS[name])
        token_ids = driver.run(compiler.new_state(spec), seed=i)
        state = compiler.new_state(spec)
        state.accept_tokens(token_ids[: (i * 7) % len(token_ids)])
        states.append(state)
    states.append(compiler.new_state(json_schema_spec(SCHEMAS["boolean"])))
    return states


def test_batched_bitmasks_match_single_masks(tiny) -> None:
    compiler, driver = tiny
    states = _states_in_various_places(compiler, driver)
    expected = torch.stack([state.allowed_token_mask() for state in states])
    import llguidance

    bitmask = allocate_token_bitmask(len(states) + 2, compiler.vocab_size)
    fill_token_bitmasks(states, bitmask, llguidance.LLExecutor(2))
    assert torch.equal(unpack_token_bitmask(bitmask[: len(states)], compiler.vocab_size), expected)
    assert (bitmask[len(states) :] == -1).all()  # untouched rows

    worker = BitmaskWorker(compiler.vocab_size, max_rows=2, num_threads=2)  # grows past max_rows
    try:
        first = worker.submit(states).result(timeout=30)
        assert torch.equal(unpack_token_bitmask(first, compiler.vocab_size), expected)
        second = worker.submit(states[:2]).result(timeout=30)
        assert second.data_ptr() != first.data_ptr()  # double-buffered
        assert torch.equal(unpack_token_bitmask(second, compiler.vocab_size), expected[:2])
    finally:
        worker.shutdown()
    serial_worker = BitmaskWorker(compiler.vocab_size, max_rows=8, num_threads=1)  # no llguidance pool
    try:
        assert torch.equal(
            unpack_token_bitmask(serial_worker.submit(states).result(timeout=30), compiler.vocab_size), expected
        )
    finally:
        serial_worker.shutdown()


def test_batch_mask_from_bitmask_rows(tiny) -> None:
    compiler, driver = tiny
    states = _states_in_various_places(compiler, driver)[:3]
    vocab_size = compiler.vocab_size
    bitmask = allocate_token_bitmask(len(states), vocab_size)
    fill_token_bitmasks(states, bitmask)
    rows = torch.tensor([4, 0, 2])
    mask = allowed_token_mask_for_batch(bitmask, rows, 5, vocab_size)
    assert mask[[1, 3]].all()
    assert torch.equal(mask[rows], unpack_token_bitmask(bitmask, vocab_size))
    for state, row in zip(states, rows.tolist(), strict=True):
        assert torch.equal(mask[row], state.allowed_token_mask())


def test_unpack_bit_order() -> None:
    vocab_size = 70  # not a multiple of 32
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    allowed = [0, 7, 8, 31, 32, 63, 69]
    for token_id in allowed:
        word = bitmask[0, token_id // 32].item() | (1 << (token_id % 32))
        bitmask[0, token_id // 32] = word - (1 << 32) if word >= 1 << 31 else word
    bitmask[1] = -1
    mask = unpack_token_bitmask(bitmask, vocab_size)
    assert mask.shape == (2, vocab_size)
    assert mask[0].nonzero().flatten().tolist() == allowed
    assert mask[1].all()
    # The tensor-op path (used on GPUs) agrees with the numpy one, on random words too.
    assert torch.equal(_unpack_bytes_torch(bitmask.view(torch.uint8), vocab_size), mask)
    words = torch.randint(-(2**31), 2**31 - 1, (3, 7), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_unpack_bytes_torch(words.view(torch.uint8), 200), unpack_token_bitmask(words, 200))


def test_sync_and_mask_fn_protocol(tiny) -> None:
    """`state(output_token_ids)` is the engine's logits_mask_fn: it catches up on new tokens, then masks."""
    compiler, driver = tiny
    spec = json_schema_spec(SCHEMAS["flat_object"])
    token_ids = driver.run(compiler.new_state(spec), seed=4)
    reference = compiler.new_state(spec)
    state = compiler.new_state(spec)
    for n in (0, 1, 5, len(token_ids) - 1):
        reference.accept_tokens(token_ids[reference.num_accepted_tokens : n])
        assert torch.equal(state(token_ids[:n]), reference.allowed_token_mask())
        assert state.num_accepted_tokens == n
    assert state.sync(token_ids) and state.is_terminated()
    assert state.sync([*token_ids, 5, 6])  # tokens past the reply's end are not the grammar's business
    # A refused token: sync says so and the state stays before it.
    fresh = compiler.new_state(spec)
    bad = driver.tokenizer.token_to_id("<|return|>")
    assert not fresh.sync([bad])
    assert fresh.num_accepted_tokens == 0
    assert torch.equal(fresh([bad]), compiler.new_state(spec).allowed_token_mask())


def test_schemas_past_the_compile_limits_are_refused_naming_the_field(tiny) -> None:
    """A schema whose grammar passes llguidance's size limit, and absurd minimum counts, are 400s (a 35 KB
    schema of nested oneOf constants held the engine 91 s; minItems 10^9 was accepted)."""
    alternatives = [{"oneOf": [{"const": f"v{i}_{j}_{k}"} for k in range(30)]} for i in range(30) for j in range(30)]
    for schema, words in (
        ({"type": "object", "properties": {"p": {"oneOf": alternatives}}}, "too large"),
        ({"type": "array", "items": {"type": "string", "minLength": 10**9}}, "minLength 1000000000"),
        ({"type": "object", "properties": {"a": {"type": "array", "minItems": 20_000}}}, "minItems 20000"),
    ):
        spec = StructuredOutputSpec.from_request(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
        )
        with pytest.raises(StructuredOutputError) as err:
            tiny[0].new_state(spec)
        assert err.value.param == "response_format.json_schema.schema" and words in err.value.message


def test_undeclared_function_cannot_be_called(tiny) -> None:
    """tool_choice auto, non-strict tools: the grammar holds the header alone, so a call can only name a
    declared function (never `analysis$location` or a tool the request did not declare)."""
    compiler, driver = tiny
    spec = StructuredOutputSpec.from_request(tools=[TOOLS[1]])
    assert spec is not None
    for text in (
        " to=functions.search<|channel|>commentary<|message|>anything at all<|call|>",
        "<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>free<|return|>",
    ):
        state = compiler.new_state(spec)
        assert state.accept_tokens(driver.tokenizer.encode(text, add_special_tokens=False).ids), text
        assert state.is_terminated()
    for text in (" to=functions.get_weather", "<|channel|>commentary to=functions.nope", "<|channel|>analysis$"):
        state = compiler.new_state(spec)
        assert not state.accept_tokens(driver.tokenizer.encode(text, add_special_tokens=False).ids), text


def test_forced_call_is_the_whole_reply(tiny) -> None:
    """tool_choice required / named: the reply starts with the call (no reasoning that could run to max_tokens),
    so even a random model always calls."""
    compiler, driver = tiny
    for tool_choice in ("required", {"type": "function", "name": "search"}):
        spec = StructuredOutputSpec.from_request(tools=TOOLS, tool_choice=tool_choice)
        assert spec is not None
        state = compiler.new_state(spec)
        assert not state.accept_tokens(driver.tokenizer.encode("<|channel|>analysis", add_special_tokens=False).ids)
        for seed in range(6):
            name, _ = parse_call(driver, driver.run(compiler.new_state(spec), seed=seed))
            assert name in ("get_weather", "search") if tool_choice == "required" else name == "search"
