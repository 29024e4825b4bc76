"""OpenAI Chat Completions request fields -> a harmony `Conversation`.

- `system` and `developer` messages become the developer message's `# Instructions` (joined by blank lines,
  in order); the harmony system message is ours (identity, dates, reasoning effort, channels).
- `user` -> a user message. `assistant` -> its reasoning (`reasoning_content` or `reasoning`) as an analysis
  message, its content as a final message (or, when it also makes tool calls, as a commentary preamble), and
  each tool call as `to=functions.NAME<|channel|>commentary <|constrain|>json` with the arguments.
- `tool` -> `functions.NAME to=assistant<|channel|>commentary`, NAME found from the earlier call with the same
  `tool_call_id` (or the message's `name` when the id is unknown).
- `tools` in either shape, `reasoning_effort`, `response_format` (`json_schema` -> `# Response Formats`;
  `text` and `json_object` add nothing: JSON mode is enforced by the sampler, not the prompt).
"""

from __future__ import annotations

from typing import Any

from gptoss.engine.harmony.messages import (
    Conversation,
    HarmonyInputError,
    Message,
    ResponseFormat,
    arguments_text,
    build_conversation,
    content_text,
    json_schema_format,
    normalize_effort,
    normalize_tools,
)


def chat_response_format(response_format: Any, param: str = "response_format") -> ResponseFormat | None:
    """`{type: json_schema, json_schema: {name, description, schema}}` -> ResponseFormat; text/json_object -> None."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise HarmonyInputError(f"{param} must be an object", param)
    kind = response_format.get("type")
    if kind in ("text", "json_object"):
        return None
    if kind != "json_schema":
        raise HarmonyInputError(f"{param}.type must be text, json_object or json_schema", f"{param}.type")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise HarmonyInputError(f"{param}.json_schema must be an object", f"{param}.json_schema")
    return json_schema_format(spec.get("name"), spec.get("schema"), spec.get("description"), f"{param}.json_schema")


def _assistant_messages(message: dict, param: str, call_names: dict[str, str]) -> list[Message]:
    out = []
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        reasoning = message.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise HarmonyInputError(f"{param}.reasoning_content must be a string", f"{param}.reasoning_content")
        if reasoning:
            out.append(Message.assistant(reasoning, channel="analysis"))
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise HarmonyInputError(f"{param}.tool_calls must be an array", f"{param}.tool_calls")
    text = content_text(message.get("content"), f"{param}.content", allow_none=True)
    if text:
        out.append(Message.assistant(text, channel="commentary" if tool_calls else "final"))
    for j, call in enumerate(tool_calls):
        call_param = f"{param}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise HarmonyInputError(f"{call_param} must be an object", call_param)
        function = call.get("function") if isinstance(call.get("function"), dict) else call
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise HarmonyInputError(f"{call_param}.function.name is required", f"{call_param}.function.name")
        arguments = arguments_text(function.get("arguments"), f"{call_param}.function.arguments")
        if isinstance(call.get("id"), str):
            call_names[call["id"]] = name
        out.append(Message.tool_call(name, arguments))
    if not out:
        # An empty assistant turn still marks where the model spoke.
        out.append(Message.assistant("", channel="final"))
    return out


def chat_messages_to_harmony(messages: Any, param: str = "messages") -> tuple[list[Message], str | None]:
    """Chat messages -> (harmony messages after the developer message, the instructions text or None)."""
    if not isinstance(messages, list) or not messages:
        raise HarmonyInputError(f"{param} must be a non-empty array", param)
    instructions: list[str] = []
    out: list[Message] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        item = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise HarmonyInputError(f"{item} must be an object", item)
        role = message.get("role")
        if role in ("system", "developer"):
            instructions.append(content_text(message.get("content"), f"{item}.content"))
        elif role == "user":
            out.append(Message.user(content_text(message.get("content"), f"{item}.content")))
        elif role == "assistant":
            out += _assistant_messages(message, item, call_names)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            name = call_names.get(call_id) if isinstance(call_id, str) else None
            if name is None:
                name = message.get("name")
            if not isinstance(name, str) or not name:
                raise HarmonyInputError(
                    f"{item}.tool_call_id {call_id!r} matches no earlier tool call", f"{item}.tool_call_id"
                )
            out.append(
                Message.tool_result(name, content_text(message.get("content"), f"{item}.content", allow_none=True))
            )
        else:
            raise HarmonyInputError(
                f"{item}.role must be one of system, developer, user, assistant, tool (got {role!r})", f"{item}.role"
            )
    return out, ("\n\n".join(instructions) if instructions else None)


def conversation_from_chat(
    messages: Any,
    *,
    tools: Any = None,
    reasoning_effort: Any = None,
    response_format: Any = None,
    current_date: str | None = None,
) -> Conversation:
    """A Chat Completions request's fields -> the harmony conversation to render (ValueError on bad input)."""
    chat, instructions = chat_messages_to_harmony(messages)
    return build_conversation(
        chat,
        instructions=instructions,
        tools=normalize_tools(tools),
        response_format=chat_response_format(response_format),
        reasoning_effort=normalize_effort(reasoning_effort, "reasoning_effort"),
        current_date=current_date,
    )
