"""Harmony message and conversation types, and the input normalisation both API converters share.

A conversation is a list of `Message`s. The first is normally the system message (content `SystemContent`, built
by us, never by an API client), then an optional developer message (content `DeveloperContent`: the client's
instructions, function tools and response format), then user / assistant / tool messages whose content is text.

Headers follow harmony: an assistant message has a `channel` ("analysis", "commentary", "final"); a tool call
is an assistant message with `recipient="functions.NAME"` and `content_type="<|constrain|>json"`; a tool result
is a message with role "tool", `name="functions.NAME"`, `recipient="assistant"`, channel "commentary".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from gptoss.engine.errors import RequestError

Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")
ReasoningEffort = Literal["low", "medium", "high"]
REASONING_EFFORTS: tuple[str, ...] = ("low", "medium", "high")
VALID_CHANNELS: tuple[str, ...] = ("analysis", "commentary", "final")
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
# The content type openai-harmony renders for a JSON tool call: ` <|constrain|>json` in the header.
JSON_CALL_CONTENT_TYPE = "<|constrain|>json"
# Function names as OpenAI accepts them: they are spliced into the prompt (`to=functions.NAME`), so a newline,
# a special token or 100k characters must not get through.
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class HarmonyInputError(RequestError):
    """Invalid API input; `param` names the offending field (e.g. `messages[2].role`) for a 400 answer."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ToolSpec:
    """One function tool: rendered as `type NAME = (_: {...}) => any;` inside `namespace functions`."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None


@dataclass
class ResponseFormat:
    """A JSON-schema response format, rendered as the developer message's `# Response Formats` section."""

    name: str
    schema: dict[str, Any]
    description: str | None = None


@dataclass
class SystemContent:
    """The harmony system message: identity, dates, reasoning effort, channels (built by the server)."""

    model_identity: str | None = MODEL_IDENTITY
    knowledge_cutoff: str | None = KNOWLEDGE_CUTOFF
    current_date: str | None = None  # "YYYY-MM-DD"
    reasoning_effort: ReasoningEffort | None = "medium"
    valid_channels: tuple[str, ...] = VALID_CHANNELS
    channel_required: bool = True


@dataclass
class DeveloperContent:
    """The developer message: the API client's system prompt, function tools and response format."""

    instructions: str | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    response_format: ResponseFormat | None = None


@dataclass
class Message:
    """One harmony message. `name` is the author name; for a tool result it is the tool (`functions.NAME`)."""

    role: Role
    content: str | SystemContent | DeveloperContent = ""
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        """The text content ('' for system / developer content objects)."""
        return self.content if isinstance(self.content, str) else ""

    @classmethod
    def system(cls, content: SystemContent | None = None) -> Message:
        return cls("system", content if content is not None else SystemContent())

    @classmethod
    def developer(cls, content: DeveloperContent) -> Message:
        return cls("developer", content)

    @classmethod
    def user(cls, text: str) -> Message:
        return cls("user", text)

    @classmethod
    def assistant(cls, text: str, channel: str = "final") -> Message:
        return cls("assistant", text, channel=channel)

    @classmethod
    def tool_call(cls, name: str, arguments: str, channel: str = "commentary") -> Message:
        """An assistant call of function `name` (without the `functions.` prefix) with JSON `arguments`."""
        return cls(
            "assistant", arguments, channel=channel, recipient=f"functions.{name}", content_type=JSON_CALL_CONTENT_TYPE
        )

    @classmethod
    def tool_result(cls, name: str, output: str) -> Message:
        """The result of function `name` (without the `functions.` prefix), addressed back to the assistant."""
        return cls("tool", output, channel="commentary", recipient="assistant", name=f"functions.{name}")


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)

    def __iter__(self):
        return iter(self.messages)

    def __len__(self) -> int:
        return len(self.messages)


class ToolCall(NamedTuple):
    """A parsed tool call: `name` without the `functions.` prefix, `arguments` the raw JSON text."""

    name: str
    arguments: str


def build_conversation(
    messages: list[Message],
    *,
    instructions: str | None = None,
    tools: list[ToolSpec] | None = None,
    response_format: ResponseFormat | None = None,
    reasoning_effort: ReasoningEffort = "medium",
    current_date: str | None = None,
) -> Conversation:
    """System message + developer message (only when there is something to say) + the chat `messages`."""
    out = [Message.system(SystemContent(current_date=current_date, reasoning_effort=reasoning_effort))]
    if instructions is not None or tools or response_format is not None:
        out.append(Message.developer(DeveloperContent(instructions, list(tools or []), response_format)))
    out.extend(messages)
    return Conversation(out)


# ---- normalisation of API fields shared by the Chat Completions and Responses converters ----


def normalize_effort(value: Any, param: str) -> ReasoningEffort:
    """`low|medium|high` (any case); None means medium; `minimal` maps to low (gpt-oss cannot disable it)."""
    if value is None:
        return "medium"
    if not isinstance(value, str):
        raise HarmonyInputError(f"{param} must be one of low, medium, high", param)
    effort = value.strip().lower()
    if effort == "minimal":
        effort = "low"
    if effort not in REASONING_EFFORTS:
        raise HarmonyInputError(f"{param} must be one of low, medium, high (got {value!r})", param)
    return effort  # type: ignore[return-value]


def normalize_tool(tool: Any, param: str) -> ToolSpec:
    """`{type: function, function: {name, description, parameters}}` or flat `{name, description, parameters}`."""
    if not isinstance(tool, dict):
        raise HarmonyInputError(f"{param} must be an object", param)
    kind = tool.get("type", "function")
    if kind != "function":
        raise HarmonyInputError(f"{param}.type {kind!r} is not supported (only function tools)", f"{param}.type")
    spec = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise HarmonyInputError(f"{param} has no function name", f"{param}.name")
    if not TOOL_NAME.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise HarmonyInputError(
            f"{param}.name {shown!r} is not a valid function name: 1 to 64 characters among a-z, A-Z, 0-9, _ and -",
            f"{param}.name",
        )
    description = spec.get("description") or ""
    if not isinstance(description, str):
        raise HarmonyInputError(f"{param}.description must be a string", f"{param}.description")
    parameters = spec.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise HarmonyInputError(f"{param}.parameters must be a JSON Schema object", f"{param}.parameters")
    return ToolSpec(name, description, parameters)


def normalize_tools(tools: Any, param: str = "tools") -> list[ToolSpec]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise HarmonyInputError(f"{param} must be an array", param)
    return [normalize_tool(tool, f"{param}[{i}]") for i, tool in enumerate(tools)]


def json_schema_format(name: Any, schema: Any, description: Any, param: str) -> ResponseFormat:
    if not isinstance(schema, dict):
        raise HarmonyInputError(f"{param}.schema must be a JSON Schema object", f"{param}.schema")
    if name is None:
        name = "response"
    if not isinstance(name, str) or not name:
        raise HarmonyInputError(f"{param}.name must be a non-empty string", f"{param}.name")
    if description is not None and not isinstance(description, str):
        raise HarmonyInputError(f"{param}.description must be a string", f"{param}.description")
    return ResponseFormat(name, schema, description or None)


def arguments_text(arguments: Any, param: str) -> str:
    """Tool-call arguments as JSON text: strings pass through, objects are serialised, None is `{}`."""
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    if isinstance(arguments, (dict, list)):
        return json.dumps(arguments, ensure_ascii=False)
    raise HarmonyInputError(f"{param} must be a JSON string", param)


_TEXT_PART_TYPES = ("text", "input_text", "output_text", "reasoning_text", "summary_text")


def content_text(content: Any, param: str, *, allow_none: bool = False) -> str:
    """A message's text from a string or a list of text parts (joined with newlines, as vLLM does)."""
    if content is None:
        if allow_none:
            return ""
        raise HarmonyInputError(f"{param} is required", param)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                pieces.append(part)
                continue
            if not isinstance(part, dict):
                raise HarmonyInputError(f"{param}[{j}] must be a content part object", f"{param}[{j}]")
            kind = part.get("type")
            if kind in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                pieces.append(part["refusal"])
            else:
                raise HarmonyInputError(
                    f"{param}[{j}]: content part type {kind!r} is not supported", f"{param}[{j}].type"
                )
        return "\n".join(pieces)
    raise HarmonyInputError(f"{param} must be a string or an array of content parts", param)
