"""Rendering harmony conversations to token ids over the checkpoint's `tokenizers` Tokenizer.

`HarmonyEncoding` wraps the tokenizer: it looks the harmony special tokens up by name, encodes text the way
tiktoken's `encode_ordinary` does (text that spells a special token stays text), maps token ids back to bytes
for the parser, and renders messages exactly as openai-harmony's `render_conversation_for_completion` does
(src/encoding.rs): `<|start|>{role}[ to={recipient}][<|channel|>{channel}][ {content_type}]<|message|>{text}`
then `<|end|>`, or `<|call|>` for an assistant message with a recipient. Each header piece is encoded on its
own, as the reference does, so token boundaries match it exactly.
"""

from __future__ import annotations

from pathlib import Path

from gptoss.engine.detokenizer import token_bytes
from gptoss.engine.harmony.messages import (
    JSON_CALL_CONTENT_TYPE,
    Conversation,
    DeveloperContent,
    Message,
    SystemContent,
)
from gptoss.engine.harmony.parser import ParseResult, StreamingParser, parse_completion
from gptoss.engine.harmony.schema_render import render_response_format_section, render_tools_section
from gptoss.engine.tokenizer import load_tokenizer, special_token_id
from tokenizers import Tokenizer

CONSTRAIN = "<|constrain|>"


def render_system_text(system: SystemContent, has_function_tools: bool) -> str:
    """The system message body: identity/dates, reasoning, channels (and the functions line with tools)."""
    sections = []
    top = []
    if system.model_identity is not None:
        top.append(system.model_identity)
    if system.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {system.knowledge_cutoff}")
    if system.current_date is not None:
        top.append(f"Current date: {system.current_date}")
    if top:
        sections.append("\n".join(top))
    if system.reasoning_effort is not None:
        sections.append(f"Reasoning: {system.reasoning_effort}")
    if system.valid_channels:
        header = f"# Valid channels: {', '.join(system.valid_channels)}."
        if system.channel_required:
            header += " Channel must be included for every message."
        if has_function_tools:
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def render_developer_text(developer: DeveloperContent) -> str:
    """The developer message body: `# Instructions`, `# Tools`, `# Response Formats` (each when present)."""
    sections = []
    if developer.instructions is not None:
        sections += ["# Instructions", developer.instructions]
    if developer.tools:
        sections.append(render_tools_section(developer.tools))
    if developer.response_format is not None:
        sections.append(render_response_format_section(developer.response_format))
    return "\n\n".join(sections)


def _has_function_tools(messages: list[Message]) -> bool:
    return any(isinstance(m.content, DeveloperContent) and m.content.tools for m in messages)


def messages_to_render(messages: list[Message], auto_drop_analysis: bool = True) -> list[Message]:
    """Drop earlier reasoning the way openai-harmony does.

    When the last assistant message is on the final channel, analysis messages that come before the *first*
    final-channel message are dropped (a finished answer's chain of thought is not shown to the next turn);
    analysis after it, e.g. reasoning around tool calls in a later turn, is kept.
    """
    if not auto_drop_analysis:
        return list(messages)
    last_assistant_final = next((m.channel == "final" for m in reversed(messages) if m.role == "assistant"), False)
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
    if not last_assistant_final or first_final is None:
        return list(messages)
    return [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]


class HarmonyEncoding:
    """Harmony rendering and parsing over a `tokenizers.Tokenizer` (o200k_harmony or the tiny test one)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.start_id = special_token_id(tokenizer, "<|start|>")
        self.end_id = special_token_id(tokenizer, "<|end|>")
        self.message_id = special_token_id(tokenizer, "<|message|>")
        self.channel_id = special_token_id(tokenizer, "<|channel|>")
        self.constrain_id = special_token_id(tokenizer, CONSTRAIN)
        self.return_id = special_token_id(tokenizer, "<|return|>")
        self.call_id = special_token_id(tokenizer, "<|call|>")
        self.endoftext_id = tokenizer.token_to_id("<|endoftext|>")
        self._added_tokens = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        # Fast path: if every added token starts with "<|", text without "<|" cannot contain one.
        self._added_need_marker = all(text.startswith("<|") for text in self._added_tokens.values())
        self._ordinary_tokenizer: Tokenizer | None = None
        self._token_bytes: list[bytes] | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> HarmonyEncoding:
        """From a checkpoint folder or a `tokenizer.json` path."""
        return cls(load_tokenizer(path))

    # ---- tokens ----

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end an assistant completion: `<|return|>` (final answer) and `<|call|>` (tool call)."""
        return (self.return_id, self.call_id)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` as ordinary text (like tiktoken's `encode_ordinary`: `<|end|>` stays text)."""
        if not text:
            return []
        if self._added_need_marker and "<|" not in text:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        if self._ordinary_tokenizer is None:
            # A private copy that never matches added tokens in text; the shared tokenizer stays untouched.
            self._ordinary_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
            self._ordinary_tokenizer.encode_special_tokens = True
        return self._ordinary_tokenizer.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token's are its name); b'' for an unknown id."""
        table = self._token_bytes
        if table is None:
            table = self._token_bytes = token_bytes(self.tokenizer)  # the detokenizer's table, built once
        return table[token_id] if 0 <= token_id < len(table) else b""

    def decode(self, token_ids: list[int]) -> str:
        """Text of `token_ids` (special tokens spelled out; invalid UTF-8 replaced by U+FFFD)."""
        return b"".join(self.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    # ---- rendering ----

    def render_message(self, message: Message, has_function_tools: bool = False) -> list[int]:
        """One message: `<|start|>header<|message|>content<|end|>` (or `<|call|>` for a tool call)."""
        ids = [self.start_id]
        if message.role == "tool":
            if not message.name:
                raise ValueError("a tool message needs the tool's name (e.g. functions.get_weather)")
            ids += self.encode_text(message.name)
        else:
            ids += self.encode_text(message.role)
            if message.name:
                ids += self.encode_text(f":{message.name}")
        if message.recipient is not None and message.recipient != "all":
            ids += self.encode_text(f" to={message.recipient}")
        if message.channel is not None:
            ids.append(self.channel_id)
            ids += self.encode_text(message.channel)
        if message.content_type is not None:
            if message.content_type.startswith(CONSTRAIN):
                rest = message.content_type[len(CONSTRAIN) :]
                ids += [*self.encode_text(" "), self.constrain_id, *self.encode_text(rest)]
            else:
                ids += self.encode_text(f" {message.content_type}")
        ids.append(self.message_id)
        ids += self.encode_text(self._content_text(message, has_function_tools))
        if message.role == "assistant" and message.recipient is not None:
            ids.append(self.call_id)
        else:
            ids.append(self.end_id)
        return ids

    @staticmethod
    def _content_text(message: Message, has_function_tools: bool) -> str:
        content = message.content
        if isinstance(content, SystemContent):
            if message.role != "system":
                raise ValueError(f"SystemContent may only appear in system messages, not {message.role}")
            return render_system_text(content, has_function_tools)
        if isinstance(content, DeveloperContent):
            if message.role != "developer":
                raise ValueError(f"DeveloperContent may only appear in developer messages, not {message.role}")
            return render_developer_text(content)
        return content

    def render_conversation(
        self, conversation: Conversation | list[Message], auto_drop_analysis: bool = True
    ) -> list[int]:
        """All messages, earlier reasoning dropped as openai-harmony does (see `messages_to_render`)."""
        messages = list(conversation)
        has_tools = _has_function_tools(messages)
        ids: list[int] = []
        for message in messages_to_render(messages, auto_drop_analysis):
            ids += self.render_message(message, has_tools)
        return ids

    def render_conversation_for_completion(
        self, conversation: Conversation | list[Message], next_role: str = "assistant", auto_drop_analysis: bool = True
    ) -> list[int]:
        """The prompt: the conversation then `<|start|>{next_role}` for the model to continue."""
        ids = self.render_conversation(conversation, auto_drop_analysis)
        return [*ids, self.start_id, *self.encode_text(next_role)]

    def render_chat_prompt(self, conversation: Conversation | list[Message]) -> list[int]:
        """The prompt token ids for the assistant's next turn."""
        return self.render_conversation_for_completion(conversation, "assistant")

    # ---- parsing (see parser.py) ----

    def parse_completion(self, token_ids: list[int], role: str | None = "assistant") -> ParseResult:
        """Parse completion tokens (those after the prompt's `<|start|>assistant`); never raises."""
        return parse_completion(self, token_ids, role)

    def stream_parser(self, role: str | None = "assistant") -> StreamingParser:
        """A parser to feed one completion token at a time (`process(token_id) -> StreamEvent`)."""
        return StreamingParser(self, role)


__all__ = ["JSON_CALL_CONTENT_TYPE", "HarmonyEncoding"]
