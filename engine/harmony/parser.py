"""Parsing model output (completion tokens) back into harmony messages, in full or one token at a time.

Completion tokens start right after the prompt's `<|start|>assistant`, so the first message's role is
implicit; each later one starts with `<|start|>assistant...`. A header runs up to `<|message|>` and is parsed
as text the way openai-harmony does (`<|channel|>X` anywhere in it; then `[role] [to=recipient] [content type]`,
so the recipient may come before or after the channel and the content type may be `<|constrain|>json` or a
bare `json`). Content runs up to `<|end|>`, `<|return|>` or `<|call|>` (the last two end the completion).

Well-formed output parses exactly as openai-harmony's `StreamableParser` does (messages and per-token text
deltas). Malformed output never raises: what was parsed is kept and `issues` says what was wrong:
- a stop token inside a header (missing `<|message|>`): the header's channel is kept and its other words
  become the content (openai-harmony's non-strict behaviour);
- `<|start|>` inside a header or content: the open message is closed (content) or dropped (header);
- a token outside any message where `<|start|>` belongs: skipped (`<|channel|>` opens an assistant header);
- an unknown channel, words left over in a header, an unknown role: recorded, message kept;
- cut by max_tokens: the open message is closed with what it has and `truncated` is set.

Content bytes are decoded incrementally: a delta only ever holds complete UTF-8 characters (a character split
across byte-level tokens is held back until its last byte arrives; invalid bytes become U+FFFD).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from gptoss.engine.harmony.messages import ROLES, VALID_CHANNELS, Message, ToolCall

CHANNEL_MARKER = "<|channel|>"
CONSTRAIN_MARKER = "<|constrain|>"
_ASCII_WHITESPACE = re.compile(r"[ \t\n\x0c\r]+")
# Recipients that address people, not tools.
_NON_TOOL_RECIPIENTS = ("all", "assistant", "user")

EXPECT_START, HEADER, CONTENT = "expect_start", "header", "content"


class HarmonyTokens(Protocol):
    """What the parser needs of the encoding (render.py's `HarmonyEncoding` is one): the special token ids and
    the tokens' bytes. A protocol, so that parsing does not import rendering (which uses the parser)."""

    start_id: int
    message_id: int
    channel_id: int
    end_id: int
    return_id: int
    call_id: int
    endoftext_id: int | None

    def decode(self, token_ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


@dataclass
class ParsedHeader:
    role: str
    name: str | None = None
    recipient: str | None = None
    channel: str | None = None
    content_type: str | None = None


def _is_whitespace(char: str) -> bool:
    # Rust's char::is_whitespace (Unicode White_Space); Python's isspace also counts \x1c-\x1f.
    return char.isspace() and char not in "\x1c\x1d\x1e\x1f"


def parse_header(
    text: str, role: str | None, *, with_recipient: bool = True
) -> tuple[ParsedHeader, list[str], list[str]]:
    """Parse a decoded header (special tokens spelled out) -> (header, leftover words, issues).

    `role` is the known role (the first completion message) or None to read it from the header. Mirrors
    openai-harmony's `parse_header_from_string`; where it would fail, this records an issue instead.
    With `with_recipient=False` (a header cut short by a stop token) only the channel is taken and the
    remaining words are returned as leftover (they are the message's content).
    """
    issues: list[str] = []
    channel = None
    idx = text.find(CHANNEL_MARKER)
    if idx >= 0:
        after = text[idx + len(CHANNEL_MARKER) :]
        end = next((i for i, c in enumerate(after) if _is_whitespace(c) or c == "<"), len(after))
        if end == 0:
            issues.append("channel marker without a channel name")
        else:
            channel = after[:end]
            if channel not in VALID_CHANNELS:
                issues.append(f"unknown channel {channel!r}")
        text = text[:idx] + after[end:]
    text = text.strip()
    if CONSTRAIN_MARKER in text:
        # "to=x<|constrain|>json": make the content type its own word.
        text = text.replace(CONSTRAIN_MARKER, " " + CONSTRAIN_MARKER).strip()
    parts = [p for p in _ASCII_WHITESPACE.split(text) if p]

    name = None
    if role is None:
        if not parts:
            issues.append("message header has no role")
            role = "assistant"
        elif parts[0] in ROLES:
            role = parts[0]
        elif len(parts) > 1 or parts[0].startswith("to="):
            # "functions.get_weather to=assistant": a tool's message, the tool named first.
            name = parts.pop(0)
            role = "tool"
        else:
            issues.append(f"unknown role {parts[0]!r}")
            parts.pop(0)
            role = "assistant"
    if parts and parts[0] == role:
        parts.pop(0)

    recipient = content_type = None
    if with_recipient and parts:
        count = len(parts)
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif count == 1 and role == "assistant" and (last.startswith(CONSTRAIN_MARKER) or last == "json"):
            # "<|channel|>final <|constrain|>json<|message|>": a lone content type, not a recipient called
            # "json" (openai-harmony reads it as one, which would turn a JSON answer into a tool call).
            content_type = last
            issues.append(f"content type {last!r} without a recipient (openai-harmony reads it as a recipient)")
        elif count == 1:
            recipient = last
        else:
            content_type = last
            raw = parts.pop()
            recipient = raw[3:] if raw.startswith("to=") else raw
        if parts:
            # openai-harmony gives up here. Prefer an explicit `to=` word as the recipient, the word after it as
            # the content type, and report the rest.
            words = parts + ([raw] if content_type is not None else []) + [last]
            to_index = next((i for i, w in enumerate(words) if w.startswith("to=")), None)
            if to_index is not None:
                recipient = words[to_index][3:]
                content_type = words[to_index + 1] if to_index + 1 < len(words) else None
                parts = words[:to_index] + words[to_index + 2 :]
            issues.append(f"unexpected words in message header: {' '.join(parts)!r}")
    return ParsedHeader(role, name, recipient, channel, content_type), parts, issues


def message_kind(channel: str | None, recipient: str | None) -> str:
    """How the server should treat a message: "tool_call", "reasoning", "commentary" or "final".

    A message with a tool recipient is a tool call on any channel (the model sometimes calls from analysis);
    analysis (and unknown channels, to keep chain of thought out of answers) is reasoning; commentary
    without a recipient is a preamble; final, or no channel at all, is the answer.
    """
    if recipient is not None and recipient not in _NON_TOOL_RECIPIENTS:
        return "tool_call"
    if channel is None or channel == "final":
        return "final"
    if channel == "commentary":
        return "commentary"
    return "reasoning"


def tool_name(recipient: str) -> str:
    """`functions.get_weather` -> `get_weather`; other recipients (`browser.search`) are kept whole."""
    return recipient[len("functions.") :] if recipient.startswith("functions.") else recipient


@dataclass
class ParseResult:
    """Parsed completion. `truncated`: it ended inside a message; `stop_token`: `<|return|>`/`<|call|>` id."""

    messages: list[Message] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)
    truncated: bool = False
    stop_token: int | None = None

    @property
    def malformed(self) -> bool:
        return bool(self.issues)

    def _texts(self, kind: str) -> str:
        return "\n".join(
            m.text for m in self.messages if m.role == "assistant" and message_kind(m.channel, m.recipient) == kind
        )

    @property
    def reasoning_text(self) -> str:
        """The analysis messages' text, joined with newlines."""
        return self._texts("reasoning")

    @property
    def final_text(self) -> str:
        """The final-channel (or channel-less) messages' text, joined with newlines."""
        return self._texts("final")

    @property
    def commentary_text(self) -> str:
        """Preambles: commentary-channel messages without a recipient, joined with newlines."""
        return self._texts("commentary")

    @property
    def tool_calls(self) -> list[ToolCall]:
        """`[(name, arguments_json_text)]` in order; a truncated call's arguments may be incomplete JSON."""
        return [
            ToolCall(tool_name(m.recipient), m.text)
            for m in self.messages
            if m.role == "assistant" and m.recipient is not None and message_kind(m.channel, m.recipient) == "tool_call"
        ]


@dataclass
class StreamEvent:
    """What one token did. Header fields describe the current message (or the one that just ended).

    - `message_started`: this token (`<|message|>`) completed a header; channel/recipient are now known.
    - `text`: new complete characters of the message's content ('' if none).
    - `message_done`: the message this token ended (a stop token, `<|start|>` or end of input), else None.
    - `stop`: the token was `<|return|>` or `<|call|>` (the completion is over).
    """

    text: str = ""
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    kind: str | None = None
    message_started: bool = False
    message_done: Message | None = None
    stop: bool = False


class StreamingParser:
    """Incremental harmony parser: `process(token_id) -> StreamEvent`, then `finish()`; never raises."""

    def __init__(self, encoding: HarmonyTokens, role: str | None = "assistant") -> None:
        self.encoding = encoding
        self.messages: list[Message] = []
        self.issues: list[str] = []
        self.tokens: list[int] = []
        self.truncated = False
        self.stop_token: int | None = None
        self.last_content_delta: str | None = None  # as openai-harmony's: this token's decoded text, if any
        self._state = HEADER if role is not None else EXPECT_START
        self._next_role = role
        self._header_tokens: list[int] = []
        self._header: ParsedHeader | None = None
        self._content: list[str] = []
        self._pending = bytearray()
        self._end_ids = {encoding.end_id, encoding.return_id, encoding.call_id}
        if encoding.endoftext_id is not None:
            self._end_ids.add(encoding.endoftext_id)
        self._stop_ids = {encoding.return_id, encoding.call_id}

    # ---- current message ----

    @property
    def current_channel(self) -> str | None:
        return self._header.channel if self._state == CONTENT and self._header else None

    @property
    def current_recipient(self) -> str | None:
        return self._header.recipient if self._state == CONTENT and self._header else None

    @property
    def current_content_type(self) -> str | None:
        return self._header.content_type if self._state == CONTENT and self._header else None

    @property
    def current_role(self) -> str | None:
        return self._header.role if self._state == CONTENT and self._header else self._next_role

    @property
    def current_content(self) -> str:
        return "".join(self._content) if self._state == CONTENT else ""

    @property
    def result(self) -> ParseResult:
        """What has been parsed so far (call `finish()` first to include a message still open)."""
        return ParseResult(list(self.messages), list(self.issues), self.truncated, self.stop_token)

    # ---- feeding ----

    def process(self, token_id: int) -> StreamEvent:
        """Consume one completion token."""
        self.tokens.append(token_id)
        self.last_content_delta = None
        enc = self.encoding
        if self._state == EXPECT_START:
            if token_id == enc.start_id:
                self._begin_header(None)
            elif token_id == enc.channel_id:
                self.issues.append("<|channel|> without <|start|>assistant before it")
                self._begin_header("assistant")
                self._header_tokens.append(token_id)
            elif token_id in self._end_ids:
                self.issues.append(f"end token {token_id} outside a message")
                if token_id in self._stop_ids:
                    self.stop_token = token_id
                    return StreamEvent(stop=True)
            else:
                self.issues.append(f"token {token_id} outside a message skipped")
            return StreamEvent()
        if self._state == HEADER:
            if token_id == enc.message_id:
                return self._open_content()
            if token_id == enc.start_id:
                self.issues.append("<|start|> inside a message header: header dropped")
                self._begin_header(None)
                return StreamEvent()
            if token_id in self._end_ids:
                return self._header_cut_short(token_id)
            self._header_tokens.append(token_id)
            return StreamEvent()
        # CONTENT
        if token_id in self._end_ids:
            event = self._close_message()
            if token_id in self._stop_ids:
                self.stop_token = token_id
                event.stop = True
            return event
        if token_id == enc.start_id:
            self.issues.append("<|start|> inside message content: message closed without <|end|>")
            event = self._close_message()
            self._begin_header(None)
            return event
        text = self._decode(token_id)
        self.last_content_delta = text or None
        return self._event(text=text)

    def finish(self) -> StreamEvent:
        """End of output (a stop token or max_tokens): close whatever is open."""
        self.last_content_delta = None
        if self._state == CONTENT:
            self.truncated = True
            return self._close_message()
        if self._state == HEADER and (self._header_tokens or self._next_role is None):
            self.truncated = True
            self.issues.append("output ended inside a message header")
        self._state = EXPECT_START
        return StreamEvent()

    # ---- internals ----

    def _begin_header(self, role: str | None) -> None:
        self._state = HEADER
        self._next_role = role
        self._header_tokens = []
        self._header = None

    def _open_content(self) -> StreamEvent:
        text = self.encoding.decode(self._header_tokens)
        header, _, issues = parse_header(text, self._next_role)
        self.issues += issues
        self._header = header
        self._next_role = None
        self._state = CONTENT
        self._content = []
        self._pending.clear()
        return self._event(message_started=True)

    def _header_cut_short(self, token_id: int) -> StreamEvent:
        """A stop token before `<|message|>`: keep the channel, the header's other words are the content."""
        self.issues.append("message header ended without <|message|>")
        event = StreamEvent()
        if self._header_tokens:
            text = self.encoding.decode(self._header_tokens)
            header, words, issues = parse_header(text, self._next_role, with_recipient=False)
            self.issues += issues
            message = Message(header.role, " ".join(words), channel=header.channel, name=header.name)
            self.messages.append(message)
            event = StreamEvent(channel=header.channel, kind=message_kind(header.channel, None), message_done=message)
        if token_id in self._stop_ids:
            self.stop_token = token_id
            event.stop = True
        self._state = EXPECT_START
        self._next_role = None
        self._header_tokens = []
        return event

    def _decode(self, token_id: int) -> str:
        """Append a token's bytes; return the complete characters now available (openai-harmony's rule)."""
        self._pending += self.encoding.token_bytes(token_id)
        try:
            text = self._pending.decode("utf-8")
            self._pending.clear()
        except UnicodeDecodeError as error:
            text = self._pending[: error.start].decode("utf-8")
            del self._pending[: error.start]
            if error.reason != "unexpected end of data":
                # An invalid sequence (not just an unfinished one): one U+FFFD for it, the rest waits.
                text += "\ufffd"
                del self._pending[: error.end - error.start]
        if text:
            self._content.append(text)
        return text

    def _close_message(self) -> StreamEvent:
        tail = self._pending.decode("utf-8", errors="replace")
        self._pending.clear()
        if tail:
            self._content.append(tail)
        header = self._header
        assert header is not None
        message = Message(
            header.role,
            "".join(self._content),
            channel=header.channel,
            recipient=header.recipient,
            content_type=header.content_type,
            name=header.name,
        )
        self.messages.append(message)
        event = self._event(text=tail, message_done=message)
        self._state = EXPECT_START
        self._header = None
        self._content = []
        return event

    def _event(self, **kwargs) -> StreamEvent:
        header = self._header
        if header is None:
            return StreamEvent(**kwargs)
        return StreamEvent(
            channel=header.channel,
            recipient=header.recipient,
            content_type=header.content_type,
            kind=message_kind(header.channel, header.recipient),
            **kwargs,
        )


def parse_completion(encoding: HarmonyTokens, token_ids: list[int], role: str | None = "assistant") -> ParseResult:
    """Parse a whole completion (the tokens after the prompt's `<|start|>assistant`); never raises."""
    parser = StreamingParser(encoding, role)
    for token_id in token_ids:
        parser.process(token_id)
    parser.finish()
    return parser.result
