"""OpenAI Responses request fields -> a harmony `Conversation`.

- `input`: a string (one user message) or items: messages `{role, content}` (string or `input_text` /
  `output_text` parts; `type: "message"` optional), `function_call {call_id, name, arguments}`,
  `function_call_output {call_id, output}`, `reasoning {content: [reasoning_text], summary: [summary_text]}`.
- `instructions` and system/developer input messages -> the developer message's `# Instructions`.
- assistant messages -> final-channel messages; reasoning items -> analysis messages; function calls ->
  `to=functions.NAME<|channel|>commentary <|constrain|>json`; outputs -> `functions.NAME to=assistant`.
- `tools` (flat `{type: function, name, description, parameters}`; the Chat shape is accepted too),
  `reasoning.effort`, `text.format` (`json_schema` -> `# Response Formats`).
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


def responses_text_format(text: Any, param: str = "text") -> ResponseFormat | None:
    """`text: {format: {type: json_schema, name, description, schema}}` -> ResponseFormat, else None."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise HarmonyInputError(f"{param} must be an object", param)
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise HarmonyInputError(f"{param}.format must be an object", f"{param}.format")
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return None
    if kind != "json_schema":
        raise HarmonyInputError(f"{param}.format.type must be text, json_object or json_schema", f"{param}.format.type")
    return json_schema_format(fmt.get("name"), fmt.get("schema"), fmt.get("description"), f"{param}.format")


def _reasoning_text(item: dict, param: str) -> str:
    """A reasoning item's raw text (`content` reasoning_text parts), else its summary texts."""
    for key in ("content", "summary"):
        parts = item.get(key)
        if parts:
            return content_text(parts, f"{param}.{key}")
    return ""


def responses_input_to_harmony(input_: Any, param: str = "input") -> tuple[list[Message], list[str]]:
    """Responses `input` -> (harmony messages after the developer message, instruction texts from it)."""
    if isinstance(input_, str):
        return [Message.user(input_)], []
    if not isinstance(input_, list) or not input_:
        raise HarmonyInputError(f"{param} must be a string or a non-empty array of items", param)
    out: list[Message] = []
    instructions: list[str] = []
    call_names: dict[str, str] = {}
    for i, item in enumerate(input_):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise HarmonyInputError(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = content_text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                instructions.append(text)
            elif role == "user":
                out.append(Message.user(text))
            elif role == "assistant":
                out.append(Message.assistant(text, channel="final"))
            else:
                raise HarmonyInputError(
                    f"{where}.role must be one of system, developer, user, assistant (got {role!r})", f"{where}.role"
                )
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise HarmonyInputError(f"{where}.name is required", f"{where}.name")
            call_id = item.get("call_id")
            if isinstance(call_id, str):
                call_names[call_id] = name
            out.append(Message.tool_call(name, arguments_text(item.get("arguments"), f"{where}.arguments")))
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            name = call_names.get(call_id) if isinstance(call_id, str) else None
            if name is None:
                name = item.get("name")
            if not isinstance(name, str) or not name:
                raise HarmonyInputError(
                    f"{where}.call_id {call_id!r} matches no earlier function_call", f"{where}.call_id"
                )
            output = item.get("output")
            if not isinstance(output, str):
                output = content_text(output, f"{where}.output", allow_none=True)
            out.append(Message.tool_result(name, output))
        elif kind == "reasoning":
            text = _reasoning_text(item, where)
            if text:
                out.append(Message.assistant(text, channel="analysis"))
        else:
            raise HarmonyInputError(f"{where}.type {kind!r} is not supported", f"{where}.type")
    return out, instructions


def conversation_from_responses(
    input: Any,
    *,
    instructions: Any = None,
    tools: Any = None,
    reasoning: Any = None,
    text: Any = None,
    current_date: str | None = None,
) -> Conversation:
    """A Responses request's fields -> the harmony conversation to render (ValueError on bad input)."""
    messages, input_instructions = responses_input_to_harmony(input)
    if instructions is not None and not isinstance(instructions, str):
        raise HarmonyInputError("instructions must be a string", "instructions")
    all_instructions = ([instructions] if instructions else []) + input_instructions
    if reasoning is not None and not isinstance(reasoning, dict):
        raise HarmonyInputError("reasoning must be an object", "reasoning")
    effort = normalize_effort((reasoning or {}).get("effort"), "reasoning.effort")
    return build_conversation(
        messages,
        instructions="\n\n".join(all_instructions) if all_instructions else None,
        tools=normalize_tools(tools),
        response_format=responses_text_format(text),
        reasoning_effort=effort,
        current_date=current_date,
    )
