"""What a generation yields, before any API shapes it: token usage, events and whole results.

A harmony completion (server/harmony_events.py) is a stream of `ReasoningDelta | ContentDelta |
ToolCallStarted | ToolCallArgumentsDelta | ToolCallDone`, then `Finished` (always last, with the usage and the
finish reason); `Collected` folds such a stream into a whole result for non-streaming answers. A raw completion
(no template: legacy Completions, Workers AI `raw`) is `RawDelta`s then one `RawResult`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gptoss.engine.outputs import TokenLogprob


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def openai(self) -> dict[str, Any]:
        """Chat Completions / legacy Completions usage object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    def responses(self) -> dict[str, Any]:
        """Responses API usage object."""
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


def sum_usage(usages: list[Usage]) -> Usage:
    """Usage of n choices of one prompt: the prompt counted once, completions summed."""
    first = usages[0]
    return Usage(
        first.prompt_tokens,
        sum(u.completion_tokens for u in usages),
        sum(u.reasoning_tokens for u in usages),
        first.cached_tokens,
    )


# ---------------------------------------------------------------------------------------------------------
# Harmony completions
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ContentDelta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class ToolCallStarted:
    index: int
    call_id: str
    name: str


@dataclass
class ToolCallArgumentsDelta:
    index: int
    delta: str


@dataclass
class ToolCallDone:
    index: int
    call_id: str
    name: str
    arguments: str
    complete: bool = True  # False: the completion ended inside the call (max_tokens), its arguments are cut


@dataclass
class Finished:
    """Last event. `finish_reason`: "stop", "length", "tool_calls" (or "abort")."""

    finish_reason: str
    usage: Usage


Event = ReasoningDelta | ContentDelta | ToolCallStarted | ToolCallArgumentsDelta | ToolCallDone | Finished


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Collected:
    """A whole harmony generation: what non-streaming answers are built from."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDone] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)

    def add(self, event: Event) -> None:
        if isinstance(event, ReasoningDelta):
            self.reasoning += event.text
        elif isinstance(event, ContentDelta):
            self.content += event.text
            self.logprobs += event.logprobs
        elif isinstance(event, ToolCallDone):
            self.tool_calls.append(event)
        elif isinstance(event, Finished):
            self.finish_reason = event.finish_reason
            self.usage = event.usage


async def collect(events: AsyncIterator[Event]) -> Collected:
    result = Collected()
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            result.add(event)
    return result


# ---------------------------------------------------------------------------------------------------------
# Raw completions
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RawDelta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]


@dataclass
class RawResult:
    """A finished raw completion (the last item of its stream)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str = "stop"
    usage: Usage = field(default_factory=Usage)


async def final_result(stream: AsyncIterator[RawDelta | RawResult]) -> RawResult:
    """Run a raw completion's stream to its end; its `RawResult`."""
    result = RawResult()
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        async for item in stream:
            if isinstance(item, RawResult):
                result = item
    return result
