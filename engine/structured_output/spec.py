"""What a structured-output request asks for, and the grammar text of it (plain Python, no llguidance).

`StructuredOutputSpec.from_request(response_format=..., tools=..., tool_choice=...)` reads the API fields
(raising `StructuredOutputError`, a 400 naming the field); `harmony_grammar(spec)` is the Lark grammar of the
whole harmony reply (see the package docstring).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gptoss.engine.errors import RequestError

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

    def __reduce__(self) -> tuple:
        # Picklable (it crosses to the server from a data-parallel replica's process).
        return (type(self), (self.param, self.message))

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
        # Any function tool constrains the reply: at least the call header, so only declared names come out
        # (whatever `strict` says; a non-strict tool's arguments stay free text).
        if final_schema is None and not all_tools:
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


def json_with_options(schema_json: str, strict: bool) -> dict[str, Any] | bool:
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
        rules.append(f"final_json: %json {json.dumps(json_with_options(spec.final_schema, spec.strict))}")
    if spec.start_in_final:  # the prompt ends with FINAL_HEADER: only the body and <|return|> are left
        return "\n".join([f"start: {final_body} <|return|>", *rules]) + "\n"
    header = '<|channel|> "analysis"'
    if spec.tools:
        header = '<|channel|> ("analysis" | "commentary")'
    if spec.allow_final:  # a forced call is the reply itself: no message before it could run to max_tokens
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
            rules.append(f"args_{i}: %json {json.dumps(json_with_options(tool.schema, True))}")
    rules.insert(0, f"start: {'message* ' if spec.allow_final else ''}({' | '.join(replies)})")
    return "\n".join(rules) + "\n"
