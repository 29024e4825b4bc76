"""Structured outputs: JSON mode, JSON Schema and strict tool arguments, enforced by constrained decoding.

A request that asks for structure (`response_format` json_object / json_schema, `text.format`, strict tools,
`tool_choice` required or a named function) gets a grammar over the *whole harmony reply* the model writes
after the prompt's trailing `<|start|>assistant`:

    reply    := message* (final | call)
    message  := <|channel|>analysis<|message|> TEXT <|end|><|start|>assistant          (reasoning, free text)
              | <|channel|>commentary<|message|> TEXT <|end|><|start|>assistant        (preamble; only with tools)
    final    := <|channel|>final<|message|> BODY <|return|>                 (BODY: the schema's JSON, or TEXT)
    call     := ( to=functions.NAME<|channel|>commentary | <|channel|>commentary to=functions.NAME)
                [ <|constrain|>json |  json] <|message|> ARGS <|call|>  (ARGS: the parameters' JSON, or TEXT)

TEXT is any text without special tokens. So the analysis channel stays free and the JSON grammar takes over
when the model opens the final channel (or a tool call), whatever the model does first: a real model writes
the headers by itself (the mask then allows what it would pick anyway), a random test model is led through
them. Special tokens are grammar terminals by name (`<|channel|>`), never matched by TEXT or JSON strings.

`StructuredOutputSpec(..., start_in_final=True)` is for a prompt that already ends inside the final channel
(`...<|start|>assistant<|channel|>final<|message|>`, `FINAL_HEADER` prefilled: reasoning skipped); its grammar
is just `BODY <|return|>`. With a random test model that is what makes replies end: it picks among the allowed
tokens about uniformly, so it opens the analysis channel half the time or more and then writes free TEXT that
a one-in-hundreds `<|end|>` practically never closes. With a schema whose values are all bounded (strings with
maxLength / enum / a bounded pattern, integers with minimum and maximum, arrays with maxItems, objects with
`additionalProperties: false`) and the whitespace cap below, every reply then ends within a bounded number of
tokens (tests/test_structured_e2e.py). It cannot go with tools (a call is not a final message).

Library: llguidance (MIT; the Rust core behind Guidance, also used by vLLM, SGLang and llama.cpp), chosen over
xgrammar (Apache-2.0) because
- its Lark dialect has special tokens as terminals by name and embeds JSON schemas inline (`%json {...}`),
  so the harmony structure above is ten lines of grammar text;
- it compiles a schema in about 1-3 ms with the 201k-token vocabulary (the mask is computed lazily over a
  token trie; xgrammar precomputes per-schema token-mask caches, about 0.1 s even for a small schema on this
  CPU), so an unseen schema does not stall time-to-first-token, and a cached grammar's matcher is copied in
  about 20 us;
- it fills a batch of bitmasks in parallel with the GIL released (`LLExecutor`), so mask computation can run
  on a worker thread while the GPU runs the forward pass (`BitmaskWorker`);
- it rejects unsupported JSON Schema keywords with a named error (or ignores them when asked: `lenient`),
  which is what a 4xx naming the problem needs;
- it is one self-contained wheel with no Python dependencies (xgrammar pulls in transformers, triton and
  apache-tvm-ffi). Both run on CPU; xgrammar's per-step mask is faster (~5-100 us vs ~50-300 us per row
  here), which the worker-thread overlap hides.

JSON details: an object's properties come in the schema's order (as in OpenAI's structured outputs; the
`# Response Formats` section shows them in that order); whitespace between JSON tokens is free but at most
MAX_JSON_WHITESPACE characters per gap (a model cannot loop on it). `strict: true` makes unsupported keywords
(`uniqueItems`, `not`, `if`/`then`, unknown formats, ...) an error; without it they are ignored (best effort).
Invalid schemas (bad types, regexes, `$ref`s, unsatisfiable bounds) are errors either way.

The bitmask format is llguidance's (and xgrammar's): int32 `[rows, ceil(V / 32)]`, bit `t % 32` of word
`t // 32` set when token t is allowed. Ids of the model's vocabulary beyond the tokenizer's (padding) are never
allowed.

Usage:

    compiler = StructuredOutputCompiler(tokenizer, vocab_size)   # once per engine (2-5 s with the real vocab)
    spec = StructuredOutputSpec.from_request(response_format=..., tools=..., tool_choice=...)  # None: no grammar
    state = compiler.new_state(spec)      # per request; raises StructuredOutputError (-> HTTP 400)
    # per step, batched: sync each state with its output tokens, fill the bitmasks off-thread, apply on device
    future = worker.submit([s for s in states if s.sync(output_token_ids_of(s))])   # a BitmaskWorker
    ... forward pass ...
    mask = allowed_token_mask_for_batch(future.result().to(device, non_blocking=True), rows, N, V)
    # or one request at a time: `state(output_token_ids) -> bool [V]` (the engine's `logits_mask_fn` protocol)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llguidance
import numpy as np
import torch
from gptoss.engine.errors import RequestError
from gptoss.engine.tokenizer import special_token_id
from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Whitespace allowed between JSON tokens: JSON's four characters, at most this many in a row. Enough for
# pretty-printed output; bounded so that a model cannot loop on whitespace until max_tokens.
MAX_JSON_WHITESPACE = 32
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# The tokens the model ends a reply with: a final answer, a tool call (openai-harmony's stop tokens).
RETURN_TOKEN = "<|return|>"
CALL_TOKEN = "<|call|>"
EOS_TOKEN = "<|endoftext|>"
# What a prompt ends with when the reply starts inside the final channel (`StructuredOutputSpec.start_in_final`).
FINAL_HEADER = "<|channel|>final<|message|>"


class StructuredOutputError(RequestError):
    """An invalid or unsupported structured-output request; `param` names the field (the server answers 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    @property
    def client_message(self) -> str:
        return self.message  # the field is named in the error's `param`


# --------------------------------------------------------------------------------------------------------
# What a request asks for
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolConstraint:
    """One callable function tool. `schema` is its parameters' JSON Schema as compact JSON text when the tool
    is strict (the arguments are then constrained), None when the arguments are free text."""

    name: str
    schema: str | None = None
    param: str = field(default="tools", compare=False)  # where the tool came from, for error messages


@dataclass(frozen=True)
class StructuredOutputSpec:
    """What one request's reply must look like. Hashable: equal specs share one compiled grammar.

    `final_schema`: the final message's JSON Schema as compact JSON text (`{"type":"object"}` for JSON mode),
    or None for free text. `strict`: unsupported schema keywords are errors (True) or ignored (False; invalid
    schemas are errors either way). `tools`: the functions the model may call (empty: no tool calls).
    `allow_final`: False when a tool call is required (`tool_choice` "required" or a named function).
    `start_in_final`: the prompt ends with `FINAL_HEADER` (the caller skipped reasoning), so the reply is only
    the final message's body and `<|return|>`; no tools then.
    """

    final_schema: str | None = None
    strict: bool = True
    tools: tuple[ToolConstraint, ...] = ()
    allow_final: bool = True
    final_param: str = field(default="response_format", compare=False)
    start_in_final: bool = False

    def __post_init__(self) -> None:
        if not self.allow_final and not self.tools:
            raise StructuredOutputError("tool_choice", "a tool call is required but no function tool is given")
        if self.start_in_final and (self.tools or not self.allow_final):
            raise StructuredOutputError("tools", "a reply that starts in the final channel cannot call tools")
        names = [tool.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise StructuredOutputError("tools", f"duplicate function names in {names}")

    @classmethod
    def from_request(
        cls,
        response_format: dict[str, Any] | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        *,
        response_format_param: str = "response_format",
        tools_param: str = "tools",
        start_in_final: bool = False,
    ) -> StructuredOutputSpec | None:
        """The spec of an API request, or None when nothing needs constraining.

        `response_format` in any of the API shapes: Chat Completions' `{"type": "json_schema", "json_schema":
        {"name", "schema", "strict"}}`, Responses' `text.format` `{"type": "json_schema", "name", "schema",
        "strict"}`, Workers AI's `{"type": "json_schema", "json_schema": <the schema itself>}`, and
        `{"type": "json_object"}` / `{"type": "text"}`. `tools` as Chat Completions (`{"type": "function",
        "function": {...}}`), Responses (`{"type": "function", "name", "parameters", "strict"}`) or Workers AI
        (`{"name", "description", "parameters"}`) send them; non-function tools are skipped. `tool_choice`:
        "auto" / None, "none", "required", or `{"type": "function", "function": {"name"}}` /
        `{"type": "function", "name"}`. Raises `StructuredOutputError` naming the offending field.
        `start_in_final`: the prompt ends with `FINAL_HEADER` (see the class docstring).
        """
        final_schema, strict, final_param = parse_response_format(response_format, response_format_param)
        all_tools = parse_function_tools(tools, tools_param)
        callable_tools, allow_final = _apply_tool_choice(all_tools, tool_choice)
        constrained = (
            final_schema is not None
            or not allow_final
            or len(callable_tools) < len(all_tools)
            or any(tool.schema is not None for tool in callable_tools)
        )
        if not constrained:
            return None
        return cls(
            final_schema, strict, callable_tools, allow_final, final_param=final_param, start_in_final=start_in_final
        )


def canonical_json(value: Any) -> str:
    """Compact JSON, keys in the client's order: the cache key of a schema.

    Keys are not sorted: the grammar emits an object's properties in the order the schema lists them (as
    OpenAI's structured outputs do, and as the `# Response Formats` section shows them to the model).
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse_response_format(value: dict[str, Any] | None, param: str = "response_format") -> tuple[str | None, bool, str]:
    """-> (the final message's schema as compact JSON text or None for free text, strict, the schema's field)."""
    if value is None:
        return None, True, param
    if not isinstance(value, dict):
        raise StructuredOutputError(param, "must be an object with a 'type'")
    kind = value.get("type", "text")
    if kind == "text":
        return None, True, param
    if kind == "json_object":
        return canonical_json(JSON_OBJECT_SCHEMA), True, param
    if kind != "json_schema":
        raise StructuredOutputError(f"{param}.type", f"must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    if "json_schema" in value:
        wrapper, where = value["json_schema"], f"{param}.json_schema"
        if not isinstance(wrapper, dict):
            raise StructuredOutputError(where, "must be an object")
        if "schema" in wrapper:  # OpenAI's {"name", "schema", "strict"}; Workers AI sends the schema itself
            schema, where, strict = wrapper["schema"], f"{where}.schema", wrapper.get("strict")
        else:
            schema, strict = wrapper, value.get("strict")
    elif "schema" in value:  # Responses' text.format is flat
        schema, where, strict = value["schema"], f"{param}.schema", value.get("strict")
    else:
        raise StructuredOutputError(f"{param}.json_schema", "is required when type is 'json_schema'")
    _check_schema_type(schema, where)
    if strict is not None and not isinstance(strict, bool):
        raise StructuredOutputError(f"{param}.strict", f"must be a boolean, got {strict!r}")
    return canonical_json(schema), bool(strict), where


def _check_schema_type(schema: Any, param: str) -> None:
    if schema is False:
        raise StructuredOutputError(param, "the schema `false` matches no value")
    if not isinstance(schema, (dict, bool)):
        raise StructuredOutputError(param, f"must be a JSON Schema object, got {type(schema).__name__}")


def parse_function_tools(tools: Sequence[dict[str, Any]] | None, param: str = "tools") -> tuple[ToolConstraint, ...]:
    """Function tools in any API shape -> constraints (strict tools carry their parameters' schema)."""
    out: list[ToolConstraint] = []
    for i, tool in enumerate(tools or ()):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise StructuredOutputError(where, "must be an object")
        if tool.get("type", "function") != "function":
            continue  # built-in tools (web search, ...) are not called through the functions namespace
        function = tool.get("function", tool)
        if "function" in tool:
            where = f"{where}.function"
        if not isinstance(function, dict):
            raise StructuredOutputError(where, "must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise StructuredOutputError(f"{where}.name", "must be a non-empty string")
        schema = None
        if function.get("strict") is True:
            parameters = function.get("parameters")
            if parameters is None:
                parameters = {"type": "object", "properties": {}, "additionalProperties": False}
            _check_schema_type(parameters, f"{where}.parameters")
            schema = canonical_json(parameters)
        out.append(ToolConstraint(name, schema, param=f"{where}.parameters"))
    return tuple(out)


def _apply_tool_choice(
    tools: tuple[ToolConstraint, ...], tool_choice: str | dict[str, Any] | None
) -> tuple[tuple[ToolConstraint, ...], bool]:
    """-> (the tools the model may call, whether it may answer on the final channel instead)."""
    if tool_choice is None or tool_choice == "auto":
        return tools, True
    if tool_choice == "none":
        return (), True
    if tool_choice == "required":
        if not tools:
            raise StructuredOutputError("tool_choice", "'required' needs at least one function tool")
        return tools, False
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function", tool_choice)
        name = function.get("name") if isinstance(function, dict) else None
        chosen = tuple(tool for tool in tools if tool.name == name)
        if not chosen:
            raise StructuredOutputError("tool_choice", f"names function {name!r}, which is not among the tools")
        return chosen, False
    raise StructuredOutputError("tool_choice", f"must be 'auto', 'none', 'required' or a function, got {tool_choice!r}")


# --------------------------------------------------------------------------------------------------------
# Grammar text
# --------------------------------------------------------------------------------------------------------


def _json_with_options(schema_json: str, strict: bool) -> dict[str, Any] | bool:
    """The schema with our llguidance options (`x-guidance`; a client's own are dropped)."""
    schema = json.loads(schema_json)
    if isinstance(schema, bool):  # `true` accepts any JSON; `false` is rejected when parsing the request
        schema = {}
    schema = {key: value for key, value in schema.items() if key != "x-guidance"}
    schema["x-guidance"] = {
        "whitespace_pattern": f"[\\x20\\x0A\\x0D\\x09]{{0,{MAX_JSON_WHITESPACE}}}",
        "lenient": not strict,
    }
    return schema


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def harmony_grammar(spec: StructuredOutputSpec) -> str:
    """The Lark grammar (llguidance dialect) of a whole harmony reply under `spec`; see the module docstring."""
    rules = ["TEXT: /(?s:.*)/"]
    final_body = "TEXT"
    if spec.final_schema is not None and spec.allow_final:
        final_body = "final_json"
        rules.append(f"final_json: %json {json.dumps(_json_with_options(spec.final_schema, spec.strict))}")
    if spec.start_in_final:  # the prompt ends with FINAL_HEADER: only the body and <|return|> are left
        return "\n".join([f"start: {final_body} <|return|>", *rules]) + "\n"
    header = '<|channel|> "analysis"'
    if spec.tools:
        header = '<|channel|> ("analysis" | "commentary")'
    rules.append(f'message: {header} <|message|> TEXT <|end|> <|start|> "assistant"')
    replies = []
    if spec.allow_final:
        replies.append("final")
        # No content type on the final channel: the model needs none, and parsers read one there as a recipient.
        rules.append(f'final: <|channel|> "final" <|message|> {final_body} <|return|>')
    if spec.tools:
        rules.append('content_type: " " <|constrain|> "json" | " json"')
    for i, tool in enumerate(spec.tools):
        replies.append(f"call_{i}")
        recipient = _lark_string(f" to=functions.{tool.name}")
        body = "TEXT" if tool.schema is None else f"args_{i}"
        rules.append(
            f'call_{i}: ({recipient} <|channel|> "commentary" | <|channel|> "commentary" {recipient}) '
            f"content_type? <|message|> {body} <|call|>"
        )
        if tool.schema is not None:
            rules.append(f"args_{i}: %json {json.dumps(_json_with_options(tool.schema, True))}")
    rules.insert(0, f"start: message* ({' | '.join(replies)})")
    return "\n".join(rules) + "\n"


# --------------------------------------------------------------------------------------------------------
# Per-request matcher
# --------------------------------------------------------------------------------------------------------


class StructuredOutputState:
    """One request's grammar matcher: feed it every generated token; it says which tokens may come next.

    Not thread-safe: the engine calls `accept_token` only after the step's bitmask future has completed.
    Preemption by recompute needs nothing here (the generated tokens and so the state stay the same); `rollback`
    is for speculative decoding, `reset` + `accept_tokens` rebuilds a state from scratch.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._stop_token_ids = stop_token_ids
        self.num_accepted_tokens = 0

    def accept_token(self, token_id: int) -> bool:
        """Advance by one generated token. False (and no state change) when the grammar does not allow it."""
        if self._matcher.try_consume_tokens([token_id]) != 1:
            return False
        self.num_accepted_tokens += 1
        return True

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance by several tokens (replay); stops at the first disallowed one and returns False."""
        return all(self.accept_token(t) for t in token_ids)

    def sync(self, output_token_ids: Sequence[int]) -> bool:
        """Accept the request's output tokens this state has not seen yet; False if one is refused (the state
        then stays before it). The sequence's tokens are the truth, so the state keeps in step across
        preemption-recompute without engine hooks. Tokens after the reply's end are ignored."""
        for token_id in output_token_ids[self.num_accepted_tokens :]:
            if self.is_terminated():
                return True
            if not self.accept_token(token_id):
                return False
        return True

    def __call__(self, output_token_ids: Sequence[int]) -> torch.Tensor:
        """The engine's `logits_mask_fn` protocol: `sync`, then the bool `[V]` mask of the next token.

        A refused token is not an error here (the caller sampled it without this mask); the mask stays the one
        before it. The model runner's batched path (`fill_token_bitmasks`) is the fast way to the same masks.
        """
        if not self.sync(output_token_ids):
            logger.warning("structured output: output token refused by the grammar; mask left before it")
        return self.allowed_token_mask()

    def is_terminated(self) -> bool:
        """True once the reply is complete (`<|return|>` or `<|call|>` accepted): no more tokens are needed."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """The matcher's error, if it is in an error state (it never leaves it); None otherwise."""
        return self._matcher.get_error() if self._matcher.is_error() else None

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""
        if not 0 <= num_tokens <= self.num_accepted_tokens:
            raise ValueError(f"cannot roll back {num_tokens} of {self.num_accepted_tokens} accepted tokens")
        if num_tokens and not self._matcher.rollback(num_tokens):
            raise RuntimeError(f"grammar rollback failed: {self._matcher.get_error()}")
        self.num_accepted_tokens -= num_tokens

    def reset(self) -> None:
        """Back to the start of the reply."""
        self._matcher.reset()
        self.num_accepted_tokens = 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 `[R, ceil(V/32)]`, CPU, contiguous)."""
        _check_bitmask(bitmask, self.vocab_size)
        if not (0 <= row < bitmask.shape[0]):
            raise IndexError(f"row {row} outside a bitmask of {bitmask.shape[0]} rows")
        if self._needs_fallback():
            self._fill_fallback(bitmask[row])
            return
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def allowed_token_mask(self, vocab_size: int | None = None) -> torch.Tensor:
        """The allowed next tokens as a bool `[vocab_size]` tensor (default: the model's vocabulary size)."""
        bitmask = allocate_token_bitmask(1, self.vocab_size)
        self.fill_bitmask(bitmask)
        return unpack_token_bitmask(bitmask, vocab_size or self.vocab_size)[0]

    def _needs_fallback(self) -> bool:
        return self._matcher.is_error() or self._matcher.is_stopped()

    def _fill_fallback(self, words: torch.Tensor) -> None:
        """A finished or broken matcher allows only the stop tokens: the sampler always has a token to pick and
        the engine ends the request (its stop-token check) instead of generating unconstrained text."""
        if self._matcher.is_error():
            logger.warning("structured output matcher in error state: %s", self._matcher.get_error())
        words.zero_()
        for token_id in self._stop_token_ids:
            words[token_id // 32] |= _bit(token_id % 32)


def _bit(index: int) -> int:
    """Bit `index` of an int32 word as a Python int in int32 range (bit 31 is the sign bit)."""
    return -(1 << 31) if index == 31 else 1 << index


# --------------------------------------------------------------------------------------------------------
# Compiler with a bounded cache
# --------------------------------------------------------------------------------------------------------


@dataclass
class _CompiledGrammar:
    grammar: str
    matcher: llguidance.LLMatcher  # pristine; each request gets a deep copy


class StructuredOutputCompiler:
    """Compiles specs into matchers for one tokenizer; compiled grammars are kept in a bounded LRU cache.

    `vocab_size` is the model's (logits') vocabulary size, at least the tokenizer's: ids beyond the tokenizer
    (padding rows of the embedding) are never allowed. Thread-safe (the server may compile while the engine
    runs); compilation releases the GIL.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256) -> None:
        tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_size < tokenizer_size:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_size}")
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.stop_token_ids = (special_token_id(tokenizer, RETURN_TOKEN), special_token_id(tokenizer, CALL_TOKEN))
        # llguidance's EOS must not be a token our grammars use: it treats EOS specially (allowed in any
        # accepting state, refused by try_consume_tokens); the harmony stop tokens are ordinary terminals here.
        self.ll_tokenizer = llguidance.LLTokenizer(
            tokenizer.to_str(), n_vocab=vocab_size, eos_token=special_token_id(tokenizer, EOS_TOKEN)
        )
        self._cache: OrderedDict[StructuredOutputSpec, _CompiledGrammar] = OrderedDict()
        self._schema_errors: dict[tuple[str, bool], str | None] = {}
        self._lock = threading.Lock()
        self.num_compiled = 0  # cache misses, for tests and metrics

    def new_state(self, spec: StructuredOutputSpec) -> StructuredOutputState:
        """A fresh matcher for one request. Raises `StructuredOutputError` for an invalid/unsupported schema."""
        compiled = self.compile(spec)
        return StructuredOutputState(compiled.matcher.deep_copy(), self.vocab_size, self.stop_token_ids)

    def compile(self, spec: StructuredOutputSpec) -> _CompiledGrammar:
        """The compiled grammar of `spec` (cached by the spec's content)."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        # Check each schema on its own first, so that an error names the field it came from.
        if spec.final_schema is not None and spec.allow_final:
            self._check_schema(spec.final_schema, spec.strict, spec.final_param)
        for tool in spec.tools:
            if tool.schema is not None:
                self._check_schema(tool.schema, True, tool.param)
        grammar = harmony_grammar(spec)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(spec.final_param, f"cannot compile the grammar: {matcher.get_error()}")
        compiled = _CompiledGrammar(grammar, matcher)
        with self._lock:
            self.num_compiled += 1
            self._cache[spec] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _check_schema(self, schema_json: str, strict: bool, param: str) -> None:
        key = (schema_json, strict)
        with self._lock:
            known = key in self._schema_errors
            error = self._schema_errors.get(key)
        if not known:
            error = self._schema_error(schema_json, strict)
            with self._lock:
                if len(self._schema_errors) >= 4 * self.cache_size:
                    self._schema_errors.clear()
                self._schema_errors[key] = error
        if error is not None:
            raise StructuredOutputError(param, error)

    def _schema_error(self, schema_json: str, strict: bool) -> str | None:
        """None if llguidance accepts the schema, else a message naming what is wrong or unsupported."""
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_json_with_options(schema_json, strict))
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            detail = messages[0].split("\n")[0] if messages else "unknown error"
            detail = detail.removeprefix("failed to compile JSON schema: ")
            return f"unsupported or invalid JSON Schema: {detail}"
        if messages:
            logger.info("JSON Schema compiled leniently: %s", "; ".join(messages))
        return None


# --------------------------------------------------------------------------------------------------------
# Batched bitmasks: fill on the host (in parallel, off the main thread), apply on the device
# --------------------------------------------------------------------------------------------------------


def bitmask_width(vocab_size: int) -> int:
    """Words per bitmask row: ceil(V / 32)."""
    return (vocab_size + 31) // 32


def allocate_token_bitmask(num_rows: int, vocab_size: int, pin_memory: bool = False) -> torch.Tensor:
    """An all-allowed host bitmask, int32 `[num_rows, ceil(V/32)]` (pinned for async copies to a GPU)."""
    return torch.full((num_rows, bitmask_width(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory)


def _check_bitmask(bitmask: torch.Tensor, vocab_size: int) -> None:
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.device.type != "cpu":
        raise ValueError(f"bitmask must be a CPU int32 [rows, words] tensor, got {bitmask.dtype} {bitmask.shape}")
    if bitmask.shape[1] != bitmask_width(vocab_size) or not bitmask.is_contiguous():
        raise ValueError(f"bitmask must be contiguous with {bitmask_width(vocab_size)} words per row")


def fill_token_bitmasks(
    states: Sequence[StructuredOutputState], bitmask: torch.Tensor, executor: llguidance.LLExecutor | None = None
) -> None:
    """Row i of `bitmask` (CPU int32 `[>= len(states), W]`) <- the allowed next tokens of `states[i]`.

    With an executor, the rows are computed in parallel by llguidance's thread pool, without the GIL.
    """
    if not states:
        return
    _check_bitmask(bitmask, states[0].vocab_size)
    if bitmask.shape[0] < len(states):
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(states)} states")
    if executor is None or len(states) == 1:
        for row, state in enumerate(states):
            state.fill_bitmask(bitmask, row)
        return
    live = [(state._matcher, row) for row, state in enumerate(states) if not state._needs_fallback()]
    if live:
        executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
    for row, state in enumerate(states):
        if state._needs_fallback():
            state._fill_fallback(bitmask[row])


class BitmaskWorker:
    """Computes a step's bitmasks on a worker thread, so that it overlaps the forward pass.

    Per step: accept last step's tokens into the states, `future = worker.submit(states)`, launch the forward,
    then `bitmask = future.result()` before sampling. The result is a view of one of two pinned host buffers
    (used alternately), valid until the next-but-one `submit`; copy it to the device with `non_blocking=True`.
    """

    def __init__(self, vocab_size: int, max_rows: int = 256, num_threads: int | None = None) -> None:
        """`num_threads`: llguidance's pool for the rows (default: half the CPUs, at most 16); 1 fills the rows
        one after the other on the worker thread (on a 2-core host the pool only adds dispatch latency)."""
        self.vocab_size = vocab_size
        pin = torch.cuda.is_available()
        self._buffers = [allocate_token_bitmask(max_rows, vocab_size, pin_memory=pin) for _ in range(2)]
        self._next_buffer = 0
        if num_threads is None:
            num_threads = min(16, (os.cpu_count() or 1) // 2)
        self._executor = llguidance.LLExecutor(num_threads) if num_threads > 1 else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-bitmask")

    def submit(self, states: Sequence[StructuredOutputState]) -> Future[torch.Tensor]:
        """Start filling the bitmasks of `states` (row i for states[i]); the future gives int32 `[len(states), W]`."""
        num_rows = len(states)
        if num_rows > self._buffers[0].shape[0]:  # grow both buffers (rare: more structured rows than planned)
            pin = self._buffers[0].is_pinned()
            self._buffers = [allocate_token_bitmask(num_rows, self.vocab_size, pin_memory=pin) for _ in range(2)]
        buffer = self._buffers[self._next_buffer][:num_rows]
        self._next_buffer ^= 1
        states = list(states)

        def fill() -> torch.Tensor:
            fill_token_bitmasks(states, buffer, self._executor)
            return buffer

        return self._thread.submit(fill)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 `[R, ceil(V/32)]` bitmask (any device) -> bool `[R, vocab_size]` allowed-token mask.

    Works on the bytes of the little-endian words (1-byte temporaries, not 4): byte j of a row holds tokens
    8j .. 8j + 7, lowest bit first. On the CPU numpy's `unpackbits` does it (about 15x faster than torch ops).
    """
    if sys.byteorder != "little":  # pragma: no cover - every supported host and GPU is little-endian
        raise RuntimeError("unpack_token_bitmask assumes little-endian int32 words")
    width = bitmask.shape[1]
    if vocab_size > 32 * width:
        raise ValueError(f"a bitmask of {width} words covers {32 * width} tokens, not {vocab_size}")
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [R, 4W]
    if bitmask.device.type == "cpu":
        bits = np.unpackbits(as_bytes.numpy(), axis=-1, count=vocab_size, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    return _unpack_bytes_torch(as_bytes, vocab_size)


def _unpack_bytes_torch(as_bytes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """uint8 `[R, 4W]` -> bool `[R, vocab_size]` with tensor ops (the GPU path)."""
    shifts = _BIT_SHIFTS.get(as_bytes.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[as_bytes.device] = torch.arange(8, dtype=torch.uint8, device=as_bytes.device)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1  # [R, 4W, 8] uint8
    return bits.view(as_bytes.shape[0], -1)[:, :vocab_size].bool()


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Set disallowed logits to -inf, in place: logits `[N, V]`, bitmask int32 `[R, W]` on logits' device, rows
    `[R]` int64 (which logits row each bitmask row constrains; None: row i for i < R). Other rows are untouched.
    """
    allowed = unpack_token_bitmask(bitmask, logits.shape[-1])
    if rows is None:
        logits[: allowed.shape[0]].masked_fill_(~allowed, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def allowed_token_mask_for_batch(
    bitmask: torch.Tensor, rows: torch.Tensor, num_rows: int, vocab_size: int
) -> torch.Tensor:
    """The sampler's bool `[num_rows, V]` mask: all True, except the constrained `rows` [R] from `bitmask` [R, W]."""
    mask = torch.ones(num_rows, vocab_size, dtype=torch.bool, device=bitmask.device)
    mask[rows] = unpack_token_bitmask(bitmask, vocab_size)
    return mask
