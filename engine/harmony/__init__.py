"""Harmony: gpt-oss's conversation format. Render conversations to prompt tokens, parse the model's tokens back.

Token-for-token identical to openai-harmony (the reference, used only as the tests' oracle), over the
checkpoint's `tokenizers` Tokenizer; special tokens are looked up by name.

Typical server use::

    from gptoss.engine.harmony import HarmonyEncoding, conversation_from_chat, HarmonyInputError

    enc = HarmonyEncoding.from_file(checkpoint_dir)           # or HarmonyEncoding(tokenizer)
    try:
        conv = conversation_from_chat(body["messages"], tools=body.get("tools"),
                                      reasoning_effort=body.get("reasoning_effort"),
                                      response_format=body.get("response_format"),
                                      current_date="2026-11-26")
    except HarmonyInputError as e:                             # a ValueError; e.param names the field -> 400
        ...
    prompt_ids = enc.render_chat_prompt(conv)                  # ends with <|start|>assistant
    stop_ids = enc.stop_token_ids                              # (<|return|>, <|call|>); <|end|> does not stop

    result = enc.parse_completion(completion_ids)              # never raises
    result.reasoning_text, result.final_text, result.tool_calls   # tool_calls: [ToolCall(name, arguments)]
    result.truncated, result.stop_token, result.issues, result.messages

    parser = enc.stream_parser()                               # streaming: one token at a time
    for token_id in generated:                                 # every sampled token, the stop token too
        ev = parser.process(token_id)                          # StreamEvent
        if ev.message_started: ...                             # ev.kind / ev.channel / ev.recipient known
        if ev.text: ...                                        # delta (complete UTF-8 characters only)
        if ev.message_done: ...                                # ev.message_done is the finished Message
    ev = parser.finish()                                       # at the end: closes a cut-off message
    result = parser.result                                     # the same ParseResult as parse_completion

Public API
----------
Types (messages.py):
    `Message(role, content, channel=None, recipient=None, content_type=None, name=None)`; `content` is text,
    or `SystemContent` / `DeveloperContent` for the system / developer message. Constructors:
    `Message.system(SystemContent(...))`, `Message.developer(DeveloperContent(...))`, `Message.user(text)`,
    `Message.assistant(text, channel="final")`, `Message.tool_call(name, arguments_json, channel="commentary")`,
    `Message.tool_result(name, output)`.
    `SystemContent(model_identity, knowledge_cutoff="2024-06", current_date=None, reasoning_effort="medium",
    valid_channels=("analysis", "commentary", "final"), channel_required=True)`.
    `DeveloperContent(instructions=None, tools=[ToolSpec(name, description, parameters)],
    response_format=ResponseFormat(name, schema, description=None))`.
    `Conversation(messages)`; `build_conversation(messages, *, instructions, tools, response_format,
    reasoning_effort, current_date)` prepends our system message (and a developer message when needed).
    `ToolCall(name, arguments)` (a NamedTuple: unpacks as `(name, arguments_json_text)`).
    `HarmonyInputError(message, param)`: a ValueError for invalid API input; `param` is e.g. `messages[2].role`.
Encoding (render.py):
    `HarmonyEncoding(tokenizer)`, `HarmonyEncoding.from_file(path)`; `.render_chat_prompt(conv) -> list[int]`,
    `.render_conversation_for_completion(conv, next_role="assistant", auto_drop_analysis=True)`,
    `.render_conversation(conv)`, `.render_message(msg)`, `.stop_token_ids`, `.encode_text(text)`,
    `.decode(ids)`, `.parse_completion(ids, role="assistant") -> ParseResult`, `.stream_parser(role="assistant")`.
    Earlier reasoning is dropped as openai-harmony does: when the last assistant message is on the final
    channel, analysis messages before the first final-channel message are not rendered.
Parsing (parser.py):
    `ParseResult`: `messages`, `issues` (`malformed` = any), `truncated`, `stop_token`, and `reasoning_text`,
    `final_text`, `commentary_text` (preambles), `tool_calls` (texts of several messages joined by newlines).
    `StreamingParser.process(token_id) -> StreamEvent(text, channel, recipient, content_type, kind,
    message_started, message_done, stop)`, `.finish() -> StreamEvent`, `.result`, `.current_channel`,
    `.current_recipient`, `.messages`. `message_kind(channel, recipient)` -> "tool_call" | "reasoning" |
    "commentary" | "final" (a recipient makes a tool call on any channel; no channel counts as final).
Converters:
    `conversation_from_chat(messages, *, tools, reasoning_effort, response_format, current_date)`
    `conversation_from_responses(input, *, instructions, tools, reasoning, text, current_date)`
    Client system/developer messages become `# Instructions`; the harmony system message is always ours.
"""

from gptoss.engine.harmony.chat_convert import conversation_from_chat
from gptoss.engine.harmony.messages import (
    Conversation,
    DeveloperContent,
    HarmonyInputError,
    Message,
    ResponseFormat,
    SystemContent,
    ToolCall,
    ToolSpec,
    build_conversation,
)
from gptoss.engine.harmony.parser import ParseResult, StreamEvent, StreamingParser, message_kind, parse_completion
from gptoss.engine.harmony.render import HarmonyEncoding
from gptoss.engine.harmony.responses_convert import conversation_from_responses
from gptoss.engine.harmony.schema_render import json_schema_to_typescript

__all__ = [
    "Conversation",
    "DeveloperContent",
    "HarmonyEncoding",
    "HarmonyInputError",
    "Message",
    "ParseResult",
    "ResponseFormat",
    "StreamEvent",
    "StreamingParser",
    "SystemContent",
    "ToolCall",
    "ToolSpec",
    "build_conversation",
    "conversation_from_chat",
    "conversation_from_responses",
    "json_schema_to_typescript",
    "message_kind",
    "parse_completion",
]
