"""POST /v1/responses (and GET /v1/responses/{id}): the OpenAI Responses API over harmony.

Request -> harmony conversation (engine/harmony/responses_convert.py) -> prompt tokens -> `generate_harmony`
events -> output items: analysis text becomes a `reasoning` item (`content: [reasoning_text]`), final text a
`message` item (`output_text`), each call to `functions.NAME` a `function_call` item (`call_id`, `name`,
`arguments`). `ResponseBuilder` turns the event stream into both the streamed Responses events
(`response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`,
`response.reasoning_text.delta/.done`, `response.output_text.delta/.done`,
`response.function_call_arguments.delta/.done`, `response.content_part.done`, `response.output_item.done`,
`response.completed` / `response.incomplete`, each with its `sequence_number`) and the final response object,
so the streamed and non-streamed answers cannot disagree. This module only converts (server/serving.py
prepares and runs the request); the Workers AI `input` format builds on it (server/workers_ai.py).

`store` (default true) keeps the response and its conversation items in memory (bounded, oldest forgotten);
`previous_response_id` continues from them: the stored items (input and output) come before the new input.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from gptoss.engine.harmony.render import HarmonyEncoding
from gptoss.engine.harmony.responses_convert import conversation_from_responses
from gptoss.engine.sampling_params import SamplingParams
from gptoss.server.admission import Admission
from gptoss.server.errors import APIError, bad_request, to_api_error
from gptoss.server.events import (
    ContentDelta,
    Event,
    Finished,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallDone,
    ToolCallStarted,
    Usage,
)
from gptoss.server.logprobs import logprob_entries
from gptoss.server.protocol_openai import OPENAI_RANGES, ResponsesRequest, check_ranges, parse_body
from gptoss.server.serving import (
    DEFAULT_MAX_TOKENS,
    check_model,
    check_prompt_chars,
    compile_grammar,
    explicit_max_tokens,
    generate_harmony,
    harmony_sampling_params,
    off_loop,
    prepare_harmony,
    resolve_tools,
    respond,
    today,
)
from gptoss.server.sse import sse_event
from gptoss.server.state import ServerState, get_state, read_body

router = APIRouter()


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _function_call_item(call_id: str, name: str) -> dict[str, Any]:
    """A streamed function_call item as it opens: arguments follow as deltas."""
    return {
        "id": _id("fc"),
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": "",
        "status": "in_progress",
    }


@dataclass
class ResponsesPlan:
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: list[str]
    request: ResponsesRequest
    input_items: list[dict[str, Any]]  # the conversation so far (stored ones first), as Responses items
    tools: list[dict[str, Any]]
    effort: str
    response_id: str = field(default_factory=lambda: _id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))


def input_items_of(req: ResponsesRequest) -> list[dict[str, Any]]:
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return list(req.input)


def prepare_responses(state: ServerState, req: ResponsesRequest, clamp_max_tokens: bool = False) -> ResponsesPlan:
    """The plan of a Responses request (renders and tokenizes its prompt: run it off the event loop).
    `clamp_max_tokens`: a max_output_tokens beyond the context is clamped (Workers AI) rather than a 400."""
    model = check_model(state, req.model, req.lora)
    check_prompt_chars(state, input=req.input, instructions=req.instructions, tools=req.tools, text__format=req.text)
    items = input_items_of(req)
    if req.previous_response_id is not None:
        stored = state.responses.get(req.previous_response_id)
        if stored is None:
            raise bad_request(
                f"Previous response with id '{req.previous_response_id}' not found",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        items = stored["items"] + items
    tools = req.tools or []
    specs, mode, _ = resolve_tools(tools, req.tool_choice)
    reasoning = req.reasoning.model_dump(exclude_none=True) if req.reasoning else None
    text = req.text.model_dump(by_alias=True, exclude_none=True) if req.text else None
    conversation = conversation_from_responses(
        items,
        instructions=req.instructions,
        tools=tools if mode != "none" else None,
        reasoning=reasoning,
        text=text,
        current_date=today(),
    )
    effort = conversation.messages[0].content.reasoning_effort  # type: ignore[union-attr]
    prepared = prepare_harmony(
        state,
        state.encoding.render_chat_prompt(conversation),
        req,
        tools=tools,
        tool_choice=req.tool_choice,
        response_format=text.get("format") if text else None,
        response_format_param="text.format",
        max_tokens=req.max_output_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
        prompt_param="input",
        max_tokens_param=None if clamp_max_tokens else explicit_max_tokens(req, "max_output_tokens", "max_tokens"),
    )
    kwargs = prepared.sampling
    if req.top_logprobs is not None:
        kwargs["logprobs"] = req.top_logprobs
    flat_tools = [
        {
            "type": "function",
            "name": t.name,
            "description": t.description or None,
            "parameters": t.parameters,
            "strict": False,
        }
        for t in specs
    ]
    # The grammar compiles here, with the rest of the preparation (off the event loop, bounded in time).
    compile_grammar(state, prepared.structured_spec)
    return ResponsesPlan(
        model,
        prepared.prompt_token_ids,
        harmony_sampling_params(state, **kwargs),
        req.stop_list,
        req,
        items,
        flat_tools,
        effort or "medium",
    )


# ---------------------------------------------------------------------------------------------------------
# Events -> Responses events and output items
# ---------------------------------------------------------------------------------------------------------


class ResponseBuilder:
    """Folds generation events into output items, producing the Responses stream events on the way."""

    def __init__(self, plan: ResponsesPlan, encoding: HarmonyEncoding | None = None) -> None:
        self.plan = plan
        self.encoding = encoding  # for logprob token texts (`top_logprobs` requests)
        self._logprobs: list[dict[str, Any]] = []  # of the open message
        self.output: list[dict[str, Any]] = []
        self.sequence_number = 0
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._text = ""

    # ---- response object ----

    def response(self, status: str) -> dict[str, Any]:
        req = self.plan.request
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        text_format: dict[str, Any] = {"type": "text"}
        if req.text is not None and req.text.format is not None:
            text_format = req.text.format.model_dump(by_alias=True, exclude_none=True)
        tool_choice = req.tool_choice if req.tool_choice is not None else "auto"
        return {
            "id": self.plan.response_id,
            "object": "response",
            "created_at": self.plan.created_at,
            "status": status,
            "model": self.plan.model,
            "output": list(self.output),
            "instructions": req.instructions,
            "tools": self.plan.tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "temperature": self.plan.params.temperature,
            "top_p": self.plan.params.top_p,
            "max_output_tokens": req.max_output_tokens or req.max_tokens,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": self.plan.effort, "summary": req.reasoning.summary if req.reasoning else None},
            "text": {"format": text_format},
            "truncation": "disabled",
            "store": req.store,
            "metadata": req.metadata or {},
            "incomplete_details": incomplete,
            "error": None,
            "usage": self.usage.responses() if self.usage is not None and status != "in_progress" else None,
            "user": req.user,
            "background": False,
        }

    @property
    def status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"

    # ---- events ----

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.response("in_progress")),
            self._event("response.in_progress", response=self.response("in_progress")),
        ]

    def feed(self, event: Event) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if isinstance(event, ReasoningDelta):
            if self._open is None or self._open["type"] != "reasoning":
                out += self._close()
                out += self._open_item(
                    {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"},
                    part={"type": "reasoning_text", "text": ""},
                )
            self._text += event.text
            out.append(
                self._event(
                    "response.reasoning_text.delta",
                    item_id=self._open["id"],  # type: ignore[index]
                    output_index=len(self.output),
                    content_index=0,
                    delta=event.text,
                )
            )
        elif isinstance(event, ContentDelta):
            if self._open is None or self._open["type"] != "message":
                out += self._close()
                out += self._open_item(
                    {"id": _id("msg"), "type": "message", "role": "assistant", "content": [], "status": "in_progress"},
                    part={"type": "output_text", "text": "", "annotations": []},
                )
            self._text += event.text
            logprobs = self._logprob_entries(event.logprobs)
            self._logprobs += logprobs
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self._open["id"],  # type: ignore[index]
                    output_index=len(self.output),
                    content_index=0,
                    delta=event.text,
                    logprobs=logprobs,
                )
            )
        elif isinstance(event, ToolCallStarted):
            out += self._close()
            out += self._open_item(_function_call_item(event.call_id, event.name))
        elif isinstance(event, ToolCallArgumentsDelta) and self._open is not None:
            self._text += event.delta
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=self._open["id"],
                    output_index=len(self.output),
                    delta=event.delta,
                )
            )
        elif isinstance(event, ToolCallDone):
            if self._open is None or self._open["type"] != "function_call":  # (no start seen: open it now)
                out += self._close()
                out += self._open_item(_function_call_item(event.call_id, event.name))
            self._text = event.arguments
            out += self._close(None if event.complete else "incomplete")
        elif isinstance(event, Finished):
            self.finish_reason = event.finish_reason
            self.usage = event.usage
            out += self._close()
        return out

    def finish(self) -> list[dict[str, Any]]:
        status = self.status
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return [self._event(kind, response=self.response(status))]

    def _logprob_entries(self, logprobs: list[Any]) -> list[dict[str, Any]]:
        top = self.plan.request.top_logprobs
        if top is None or self.encoding is None or not logprobs:
            return []
        return logprob_entries(self.encoding, logprobs, top)

    def _open_item(self, item: dict[str, Any], part: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        self._open = item
        self._text = ""
        index = len(self.output)
        out = [self._event("response.output_item.added", output_index=index, item=dict(item))]
        if part is not None:
            out.append(
                self._event(
                    "response.content_part.added", item_id=item["id"], output_index=index, content_index=0, part=part
                )
            )
        return out

    def _close(self, item_status: str | None = None) -> list[dict[str, Any]]:
        """Finish the open item; its status is `item_status` when given (a call cut short is "incomplete"
        before the Finished event says "length"), else from the finish reason."""
        item = self._open
        if item is None:
            return []
        self._open = None
        index = len(self.output)
        item_status = item_status or ("incomplete" if self.finish_reason == "length" else "completed")
        out = []
        if item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": self._text}
            out.append(
                self._event(
                    "response.reasoning_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=self._text,
                )
            )
            out.append(
                self._event(
                    "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
                )
            )
            item = {**item, "content": [part], "status": item_status}
        elif item["type"] == "message":
            part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": self._logprobs}
            out.append(
                self._event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=self._text,
                    logprobs=self._logprobs,
                )
            )
            self._logprobs = []
            out.append(
                self._event(
                    "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
                )
            )
            item = {**item, "content": [part], "status": item_status}
        else:
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=self._text,
                    name=item["name"],
                )
            )
            item = {**item, "arguments": self._text, "status": item_status}
        self.output.append(item)
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        self._text = ""
        return out


def store_response(state: ServerState, plan: ResponsesPlan, response: dict[str, Any]) -> None:
    if plan.request.store:
        state.responses.put(plan.response_id, {"response": response, "items": plan.input_items + response["output"]})


def start_responses(state: ServerState, plan: ResponsesPlan) -> Any:
    return generate_harmony(
        state,
        plan.prompt_token_ids,
        plan.params,
        stop=plan.stop,
        request_id=plan.response_id,
    )


async def run_response(state: ServerState, plan: ResponsesPlan, stream: Any) -> dict[str, Any]:
    """Non-streaming: the whole response object."""
    builder = ResponseBuilder(plan, state.encoding)
    async with contextlib.aclosing(stream):
        async for event in stream:
            builder.feed(event)
    response = builder.response(builder.status)
    store_response(state, plan, response)
    return response


async def response_events(state: ServerState, plan: ResponsesPlan, stream: Any) -> AsyncIterator[dict[str, Any]]:
    """Streaming: the Responses events, ending with response.completed (or .incomplete / .failed)."""
    builder = ResponseBuilder(plan, state.encoding)
    for event in builder.start():
        yield event
    try:
        async with contextlib.aclosing(stream):
            async for item in stream:
                for event in builder.feed(item):
                    yield event
    except Exception as exc:
        error = to_api_error(exc)
        failed = builder.response("failed")
        failed["error"] = {"code": "server_error", "message": error.message}
        yield builder._event("response.failed", response=failed)
        return
    final = builder.finish()
    store_response(state, plan, final[-1]["response"])
    for event in final:
        yield event


async def responses_sse(
    state: ServerState, plan: ResponsesPlan, streams: list[Any], admission: Admission
) -> AsyncIterator[str]:
    """SSE frames of a streaming response: the Responses events, each with its type."""
    try:
        async for event in response_events(state, plan, streams[0]):
            yield sse_event(event)
    finally:
        admission.release()


async def handle_responses(request: Request, body: dict[str, Any] | bytes) -> Response:
    """Validate, run and answer one Responses request."""
    state = get_state(request)
    req = check_ranges(await off_loop(state, parse_body, ResponsesRequest, body), OPENAI_RANGES)
    plan = await off_loop(state, prepare_responses, state, req)
    return await respond(
        request,
        lambda: [start_responses(state, plan)],
        frames=functools.partial(responses_sse, state, plan) if req.stream else None,
        answer=lambda streams: run_response(state, plan, streams[0]),
    )


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    return await handle_responses(request, await read_body(request))


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str) -> Response:
    stored = get_state(request).responses.get(response_id)
    if stored is None:
        raise APIError(404, f"No response with id '{response_id}' found", param="response_id", code="not_found")
    return JSONResponse(stored["response"])
