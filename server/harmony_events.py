"""The harmony event fold: completion token ids in, API-neutral events (server/events.py) out.

`HarmonyEventStream` is the pure part (no engine): fed completion token ids one at a time, it drives the
harmony streaming parser and says what each token added: analysis-channel text is reasoning; final-channel
text (and commentary preambles) is content; a message addressed to `functions.NAME` is a tool call whose
content streams as argument deltas. It also counts reasoning tokens and applies stop strings to the content
only (so a stop string cannot match inside a channel name or the reasoning). `harmony_events` runs it over a
request's engine outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from gptoss.engine.detokenizer import find_stop, stop_prefix_len
from gptoss.engine.harmony.parser import tool_name
from gptoss.engine.harmony.render import HarmonyEncoding
from gptoss.engine.outputs import RequestOutput, TokenLogprob
from gptoss.server.events import (
    ContentDelta,
    Event,
    Finished,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallDone,
    ToolCallStarted,
    Usage,
    new_call_id,
)


class HarmonyEventStream:
    """Completion tokens -> events, one token at a time (see the module docstring)."""

    def __init__(self, encoding: HarmonyEncoding, stop: Sequence[str] = ()) -> None:
        self.parser = encoding.stream_parser("assistant")
        self.stop_strings = [s for s in stop if s]
        self.num_tokens = 0
        self.reasoning_tokens = 0
        self.stopped = False  # a stop string matched: the caller ends the request
        self.content = ""  # content emitted so far
        self._held = ""  # content held back: it may be the start of a stop string
        self._held_logprobs: list[TokenLogprob] = []
        self.tool_calls: list[ToolCallDone] = []
        self._open_call: ToolCallStarted | None = None

    def feed(self, token_id: int, logprob: TokenLogprob | None = None) -> list[Event]:
        """One completion token -> what it added (possibly nothing)."""
        if self.stopped:
            return []
        self.num_tokens += 1
        event = self.parser.process(token_id)
        kind = event.kind
        if kind == "reasoning" and (event.text or not event.message_done):
            self.reasoning_tokens += 1
        events: list[Event] = []
        if event.message_started and kind == "tool_call":
            self._open_call = ToolCallStarted(len(self.tool_calls), new_call_id(), tool_name(event.recipient or ""))
            events.append(self._open_call)
        if event.text:
            if kind == "tool_call" and self._open_call is not None:
                events.append(ToolCallArgumentsDelta(self._open_call.index, event.text))
            elif kind == "reasoning":
                events.append(ReasoningDelta(event.text))
            else:
                events += self._content(event.text, logprob)
        elif (
            logprob is not None
            and kind in ("final", "commentary")
            and not event.message_started
            and event.message_done is None
        ):
            self._held_logprobs.append(logprob)  # a partial UTF-8 character: its logprob rides on the next text
        if event.message_done is not None and kind == "tool_call" and self._open_call is not None:
            call = self._open_call
            done = ToolCallDone(call.index, call.call_id, call.name, event.message_done.text)
            self.tool_calls.append(done)
            events.append(done)
            self._open_call = None
        return events

    def _content(self, text: str, logprob: TokenLogprob | None) -> list[Event]:
        if logprob is not None:
            self._held_logprobs.append(logprob)
        if not self.stop_strings:
            self.content += text
            logprobs, self._held_logprobs = self._held_logprobs, []
            return [ContentDelta(text, logprobs)]
        pending = self._held + text
        match = find_stop(pending, self.stop_strings)
        if match is not None:
            self.stopped = True
            self._held = ""
            return self._emit(pending[: match[0]])
        keep = stop_prefix_len(pending, self.stop_strings)
        self._held = pending[len(pending) - keep :] if keep else ""
        return self._emit(pending[: len(pending) - keep])

    def _emit(self, text: str) -> list[Event]:
        if not text:
            return []
        self.content += text
        logprobs, self._held_logprobs = self._held_logprobs, []
        return [ContentDelta(text, logprobs)]

    def finish(self, engine_finish_reason: str | None, usage: Usage) -> list[Event]:
        """The completion is over: flush held content, close an open tool call, then `Finished`."""
        events: list[Event] = []
        if not self.stopped:
            event = self.parser.finish()
            if event.message_done is not None and self._open_call is not None:
                call = self._open_call
                # Closed here, not by <|call|>: the completion stopped inside it.
                done = ToolCallDone(call.index, call.call_id, call.name, event.message_done.text, complete=False)
                self.tool_calls.append(done)
                events.append(done)
                self._open_call = None
            if self._held:
                events += self._emit(self._held)
                self._held = ""
        usage.reasoning_tokens = self.reasoning_tokens
        usage.completion_tokens = self.num_tokens
        if engine_finish_reason == "length" and not self.stopped:
            reason = "length"
        elif self.tool_calls and not self.stopped:
            reason = "tool_calls"
        elif engine_finish_reason == "abort":
            reason = "abort"
        else:
            reason = "stop"
        events.append(Finished(reason, usage))
        return events


async def harmony_events(
    encoding: HarmonyEncoding,
    outputs: AsyncIterator[RequestOutput],
    num_prompt_tokens: int,
    stop: Sequence[str] = (),
) -> AsyncIterator[Event]:
    """A request's engine outputs -> its events, ending with `Finished`. A matched stop string leaves early,
    which closes (and so aborts) `outputs`."""
    events = HarmonyEventStream(encoding, stop)
    usage = Usage(prompt_tokens=num_prompt_tokens)
    finish_reason: str | None = None
    async with contextlib.aclosing(outputs):  # type: ignore[type-var]
        async for output in outputs:
            usage.cached_tokens = output.num_cached_tokens
            new_logprobs = output.new_logprobs or []
            for i, token_id in enumerate(output.new_token_ids):
                for event in events.feed(token_id, new_logprobs[i] if i < len(new_logprobs) else None):
                    yield event
                if events.stopped:
                    break
            if events.stopped:
                break  # leaving the `async with` aborts the request in the engine
            if output.finished:
                finish_reason = output.finish_reason
    for event in events.finish(finish_reason, usage):
        yield event
