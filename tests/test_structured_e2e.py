"""Structured outputs end to end on the tiny random checkpoint: the real model, sampler and grammar masks.

The acceptance tests of the structured-outputs issue: at temperature 1.0 with several seeds, every constrained
reply parses as JSON and validates against its schema (jsonschema), for 20+ schemas, streaming and not.

A random model picks each token about uniformly among the allowed ones, so termination has to come from the
grammar, not from the model:
- the replies start inside the final channel (the prompt ends with `FINAL_HEADER`,
  `StructuredOutputSpec(start_in_final=True)`): left to itself the model opens the analysis channel about
  half the time and then writes free text that practically never ends;
- every schema is finite: strings have maxLength, an enum or a bounded pattern, integers minimum and maximum,
  arrays maxItems, objects `additionalProperties: false`; whitespace is capped per gap (MAX_JSON_WHITESPACE).
  So every reply ends within a bounded number of tokens, below MAX_TOKENS, and every run must stop.
The sweep drives `LLMEngine` in-process (all requests in one batch: the batched grammar-bitmask path), the
streaming check goes through the live server's `AsyncEngine` (deltas concatenated), and a few seeded requests
go through the HTTP server with the `openai` client, where the grammar covers the whole harmony reply.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.llm_engine import LLMEngine
from gptoss.engine.outputs import RequestOutput
from gptoss.engine.sampling_params import SamplingParams
from gptoss.engine.structured_output.grammar import StructuredOutputCompiler
from gptoss.engine.structured_output.spec import FINAL_HEADER, StructuredOutputSpec

pytest_plugins = ["tests.server_fixtures"]

# Finite schemas: each reply ends within a bounded number of tokens whatever the model picks (see above).
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "address": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string", "maxLength": 6},
                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        },
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
    "deep_nesting": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"enum": ["x", "y"]}},
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "optional_properties": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 9},
            "b": {"type": "boolean"},
            "c": {"type": "string", "maxLength": 4},
        },
        "required": ["b"],
        "additionalProperties": False,
    },
    "all_optional": {
        "type": "object",
        "properties": {"x": {"type": "boolean"}, "y": {"type": "null"}},
        "additionalProperties": False,
    },
    "array_bounds": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 1,
        "maxItems": 4,
    },
    "array_of_enums": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3},
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "k": {"type": "string", "maxLength": 3},
                "n": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["k", "n"],
            "additionalProperties": False,
        },
        "maxItems": 3,
    },
    "nested_arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
        "maxItems": 2,
    },
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "boolean"}],
        "items": False,
        "minItems": 2,
    },
    "string_enum": {
        "type": "object",
        "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["unit"],
        "additionalProperties": False,
    },
    "mixed_enum": {"enum": [1, "two", None, True, 3.5]},
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": -10, "maximum": 10}},
        "required": ["kind", "x"],
        "additionalProperties": False,
    },
    "integer_bounds": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 18, "maximum": 130},
            "delta": {"type": "integer", "exclusiveMinimum": -6, "exclusiveMaximum": 6},
        },
        "required": ["age", "delta"],
        "additionalProperties": False,
    },
    "number_multiple_of": {"type": "number", "minimum": 0, "maximum": 2, "multipleOf": 0.25},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "string_pattern": {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{2}$"},
    "email_like_pattern": {"type": "string", "pattern": "^[a-z]{1,5}@[a-z]{1,5}\\.(com|org)$"},
    "string_length": {"type": "string", "minLength": 3, "maxLength": 6},
    "date_format": {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
        "additionalProperties": False,
    },
    "any_of_scalars": {
        "anyOf": [
            {"type": "string", "maxLength": 5},
            {"type": "integer", "minimum": 0, "maximum": 99},
            {"type": "null"},
        ]
    },
    "any_of_objects": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"cat": {"type": "string", "maxLength": 5}},
                "required": ["cat"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"dog": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["dog"],
                "additionalProperties": False,
            },
        ]
    },
    "one_of_disjoint": {"oneOf": [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 9}]},
    "nullable_type_list": {
        "type": "object",
        "properties": {"v": {"type": ["string", "null"], "maxLength": 4}},
        "required": ["v"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    "unicode_keys": {
        "type": "object",
        "properties": {
            "café": {"type": "string", "maxLength": 3},
            "日本": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["café", "日本"],
        "additionalProperties": False,
    },
}
SEEDS = (7, 1234, 99991)
# Above the longest reply any of SCHEMAS allows, so every run must stop. The worst is "array_of_objects": 31
# JSON tokens with 30 gaps of at most MAX_JSON_WHITESPACE (32) whitespace tokens, three 3-character strings of
# at most 12 tokens a character (a surrogate-pair escape, one byte a token), keys, digits: about 1,100 tokens.
# Random runs stay far below (at most about 200 tokens over 40 seeds of each schema); a batch ends with its
# longest run, so the bound costs no time.
MAX_TOKENS = 1536
STREAMING_SCHEMAS = (
    "nested_object",
    "array_of_objects",
    "any_of_objects",
    "string_pattern",
    "refs",
    "optional_properties",
)


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> LLMEngine:
    return LLMEngine(
        EngineArgs(model=str(tiny_checkpoint), num_blocks=2048, max_num_seqs=128, max_num_batched_tokens=4096)
    )


@pytest.fixture(scope="module")
def compiler(engine: LLMEngine) -> StructuredOutputCompiler:
    return engine.grammar_compiler


def final_channel_prompt(tokenizer: Any, name: str) -> list[int]:
    """A harmony prompt whose reply starts inside the final channel (reasoning skipped)."""
    text = f"<|start|>user<|message|>Answer with JSON ({name}).<|end|><|start|>assistant{FINAL_HEADER}"
    return tokenizer.encode(text, add_special_tokens=False).ids


def schema_spec(schema: dict[str, Any]) -> StructuredOutputSpec:
    spec = StructuredOutputSpec.from_request(
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        start_in_final=True,
    )
    assert spec is not None
    return spec


def sampling(
    seed: int, compiler: StructuredOutputCompiler, spec: StructuredOutputSpec, max_tokens: int = MAX_TOKENS
) -> SamplingParams:
    """Temperature 1 with a seed, ending at `<|return|>` / `<|call|>` (as the server's harmony requests do),
    constrained by `spec`."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0,
        seed=seed,
        stop_token_ids=list(compiler.stop_token_ids),
        structured_output=spec,
    )


def run_to_completion(engine: LLMEngine) -> dict[str, RequestOutput]:
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def check_reply(name: str, schema: dict[str, Any], text: str, finish_reason: str | None) -> str | None:
    """None if the reply stopped and is JSON valid against `schema`; else what is wrong (for one report)."""
    if finish_reason != "stop":
        return f"{name}: finish_reason {finish_reason!r}, text {text!r}"
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as exc:
        return f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0]} in {text!r}"
    return None


# --------------------------------------------------------------------------------------------------------
# LLMEngine in-process: every schema x every seed, one batch
# --------------------------------------------------------------------------------------------------------


def test_every_schema_every_seed_is_valid_json(engine: LLMEngine, compiler: StructuredOutputCompiler) -> None:
    assert len(SCHEMAS) >= 20
    for name, schema in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        for seed in SEEDS:
            engine.add_request(
                f"{name}/{seed}",
                final_channel_prompt(engine.tokenizer, name),
                sampling(seed, compiler, schema_spec(schema)),
            )
    outputs = run_to_completion(engine)
    problems = []
    for name, schema in SCHEMAS.items():
        for seed in SEEDS:
            out = outputs[f"{name}/{seed}"]
            problems.append(check_reply(f"{name}/{seed}", schema, out.text, out.finish_reason))
            if out.finish_reason == "stop":
                assert out.token_ids[-1] == compiler.stop_token_ids[0]  # <|return|>, which adds no text
    assert [p for p in problems if p] == []
    # Temperature 1: seeds give different replies (not one greedy path per schema).
    texts = {outputs[f"{name}/{seed}"].text for name in SCHEMAS for seed in SEEDS}
    assert len(texts) > 2 * len(SCHEMAS)


def test_json_object_mode(engine: LLMEngine, compiler: StructuredOutputCompiler) -> None:
    """`{"type": "json_object"}` is unbounded (any keys, strings of any length): a random model ends only when
    it closes early, so the check is that every reply that stopped is a JSON object, and that some stop."""
    spec = StructuredOutputSpec.from_request({"type": "json_object"}, start_in_final=True)
    assert spec is not None
    for seed in range(1, 33):  # about one in five closes the object early (6 of these 32)
        engine.add_request(
            f"json_object/{seed}",
            final_channel_prompt(engine.tokenizer, "object"),
            sampling(seed, compiler, spec, max_tokens=64),
        )
    outputs = run_to_completion(engine)
    stopped = [out for out in outputs.values() if out.finish_reason == "stop"]
    assert len(stopped) >= 2
    for out in stopped:
        assert isinstance(json.loads(out.text), dict), out.text


# --------------------------------------------------------------------------------------------------------
# Streaming through the AsyncEngine (the live server's), deltas concatenated
# --------------------------------------------------------------------------------------------------------


def test_streaming_deltas_concatenate_to_valid_json(live_server: Any) -> None:
    async_engine = live_server.engine
    compiler = async_engine.engine.grammar_compiler

    async def stream_one(name: str, seed: int) -> tuple[str, str | None, int]:
        stream = async_engine.add_request(
            f"stream-{name}-{seed}",
            final_channel_prompt(live_server.tokenizer, name),
            sampling(seed, compiler, schema_spec(SCHEMAS[name])),
        )
        text, finish_reason, num_outputs = "", None, 0
        async for out in stream:
            text += out.text_delta
            num_outputs += 1
            if out.finished:
                assert out.text == text
                finish_reason = out.finish_reason
        return text, finish_reason, num_outputs

    async def stream_all() -> list[tuple[str, str | None, int]]:
        return await asyncio.gather(*[stream_one(name, seed) for name in STREAMING_SCHEMAS for seed in SEEDS[:2]])

    results = asyncio.run(stream_all())
    keys = [(name, seed) for name in STREAMING_SCHEMAS for seed in SEEDS[:2]]
    problems = [
        check_reply(f"{name}/{seed}", SCHEMAS[name], text, reason)
        for (name, seed), (text, reason, _) in zip(keys, results, strict=True)
    ]
    assert [p for p in problems if p] == []
    assert all(num_outputs > 1 for _, _, num_outputs in results)  # streamed, not one final chunk


# --------------------------------------------------------------------------------------------------------
# Through the HTTP server with the openai client: the grammar covers the whole harmony reply
# --------------------------------------------------------------------------------------------------------

LIVE_MESSAGES = [{"role": "user", "content": "Describe a user as JSON."}]
LIVE_SCHEMAS = ("flat_object", "array_of_objects")
LIVE_N = 4  # choices per request (seeds seed .. seed + 3)
LIVE_MAX_TOKENS = 400


class AnswerAtOnce:
    """A `logits_mask_fn` ANDed with the request's grammar: the analysis channel's name ruled out after
    `<|channel|>`.

    A stand-in for a model that answers without reasoning. The server's prompt ends with `<|start|>assistant`
    and its grammar covers the whole harmony reply; the random model then opens the analysis channel nearly
    every time (with the server's prompt) and writes free text that an `<|end|>` practically never closes.
    Without analysis the reply is `<|channel|>final<|message|>` + JSON + `<|return|>`, bounded like the sweep's.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.channel_id = tokenizer.token_to_id("<|channel|>")
        texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.get_vocab_size())]
        self.mask = torch.ones(vocab_size, dtype=torch.bool)
        for i, text in enumerate(texts):
            if text and ("analysis".startswith(text) or text.startswith("analysis")):
                self.mask[i] = False

    def __call__(self, output_token_ids: list[int]) -> Any:
        if output_token_ids and output_token_ids[-1] == self.channel_id:
            return self.mask
        return None  # no further constraint at this step


@pytest.fixture
def answer_at_once(live_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The live server's constrained requests, with the analysis channel ruled out (for this test only)."""
    engine = live_server.engine
    add_request = engine.add_request
    answer_at_once = AnswerAtOnce(live_server.tokenizer, engine.engine.vocab_size)

    def add(request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Any:
        mask_fn = answer_at_once if params.structured_output is not None else None
        return add_request(request_id, prompt_token_ids, params, logits_mask_fn=mask_fn)

    monkeypatch.setattr(engine, "add_request", add)


def live_request(live_server: Any, name: str, seed: int, **kwargs: Any) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=live_server.v1, api_key="unused", max_retries=0, timeout=120)
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    return client.chat.completions.create(
        model="gpt-oss-120b",
        messages=LIVE_MESSAGES,
        response_format=response_format,
        temperature=1.0,
        seed=seed,
        **{"n": LIVE_N, "max_tokens": LIVE_MAX_TOKENS, **kwargs},
    )


@pytest.mark.usefixtures("answer_at_once")
@pytest.mark.parametrize("name", LIVE_SCHEMAS)
def test_live_server_response_format(live_server: Any, name: str) -> None:
    out = live_request(live_server, name, seed=5)
    problems = [
        check_reply(name, SCHEMAS[name], choice.message.content or "", choice.finish_reason) for choice in out.choices
    ]
    assert [p for p in problems if p] == []
    assert all(not choice.message.model_dump().get("reasoning_content") for choice in out.choices)


@pytest.mark.usefixtures("answer_at_once")
@pytest.mark.parametrize("name", LIVE_SCHEMAS)
def test_live_server_response_format_streaming(live_server: Any, name: str) -> None:
    contents = [""] * LIVE_N
    reasons: list[str | None] = [None] * LIVE_N
    num_chunks = [0] * LIVE_N
    for chunk in live_request(live_server, name, seed=21, stream=True):
        for choice in chunk.choices:
            contents[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
            num_chunks[choice.index] += 1
    problems = [
        check_reply(name, SCHEMAS[name], content, reason) for content, reason in zip(contents, reasons, strict=True)
    ]
    assert [p for p in problems if p] == []
    assert min(num_chunks) > 3  # streamed in pieces


def test_live_server_with_reasoning_valid_whenever_stopped(live_server: Any) -> None:
    """Without the stand-in, the random model's replies mostly reach max_tokens inside the analysis channel
    ("length", no content); any reply that stops holds valid JSON."""
    out = live_request(live_server, "string_enum", seed=5, max_tokens=64)
    for choice in out.choices:
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            assert check_reply("string_enum", SCHEMAS["string_enum"], choice.message.content or "", "stop") is None
