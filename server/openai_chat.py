"""POST /v1/chat/completions: OpenAI Chat Completions over harmony.

Request -> harmony conversation (engine/harmony/chat_convert.py) -> prompt tokens -> `generate_harmony`
events -> `chat.completion` (or `chat.completion.chunk` frames). The answer maps the harmony channels:
final -> `message.content`; analysis -> `message.reasoning_content` and `message.reasoning` (both names,
as servers disagree); calls to `functions.NAME` -> `message.tool_calls` with arguments as JSON text.

`tool_choice`: "auto" (default) renders the tools; "none" leaves them out of the prompt; a named function
or "required" forces a call through the request's grammar (`SamplingParams.structured_output`), which leaves
the reasoning free; so do `response_format` and strict tools.
This module only converts; the Workers AI `messages` format builds on `prepare_chat` / `start_chat` /
`chat_completion` / `chat_chunks` (server/workers_ai.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from gptoss.engine.harmony.chat_convert import conversation_from_chat
from gptoss.engine.harmony.messages import normalize_effort
from gptoss.engine.sampling_params import SamplingParams
from gptoss.server.admission import Admission
from gptoss.server.engine_client import merge_streams, start_all
from gptoss.server.errors import to_api_error
from gptoss.server.events import (
    Collected,
    ContentDelta,
    Finished,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallStarted,
    Usage,
    collect,
    sum_usage,
)
from gptoss.server.logprobs import logprob_entries
from gptoss.server.protocol_openai import OPENAI_RANGES, ChatCompletionRequest, check_ranges, parse_body
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
from gptoss.server.sse import DONE, sse_data
from gptoss.server.state import ServerState, get_state, read_body

router = APIRouter()


@dataclass
class ChatPlan:
    """Everything a chat request resolves to before it runs."""

    model: str
    prompt_token_ids: list[int]
    params: list[SamplingParams]  # one per choice (n)
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    include_usage: bool
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def chat_prompt_ids(
    state: ServerState,
    messages: Any,
    tools: Any,
    reasoning_effort: Any,
    response_format: Any = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """The harmony prompt of a chat request (also what /tokenize answers for `messages`)."""
    conversation = conversation_from_chat(
        messages,
        tools=tools or None,
        reasoning_effort=reasoning_effort,
        response_format=response_format,
        current_date=today(),
    )
    if add_generation_prompt:
        return state.encoding.render_chat_prompt(conversation)
    return state.encoding.render_conversation(conversation)


def prepare_chat(state: ServerState, req: ChatCompletionRequest, clamp_max_tokens: bool = False) -> ChatPlan:
    """The plan of a chat request (renders and tokenizes its prompt: run it off the event loop).
    `clamp_max_tokens`: a max_tokens beyond the context is clamped (Workers AI) rather than a 400 (OpenAI)."""
    model = check_model(state, req.model, req.lora)
    tools = req.tools if req.tools is not None else req.functions or []
    check_prompt_chars(state, messages=req.messages, tools=tools, response_format=req.response_format)
    _, mode, _ = resolve_tools(tools, req.tool_choice)
    response_format = req.response_format.model_dump(by_alias=True) if req.response_format else None
    effort = req.effort
    if req.reasoning_effort is None and req.reasoning is not None:  # so that an error names the field sent
        effort = normalize_effort(req.reasoning.effort, "reasoning.effort")
    rendered = chat_prompt_ids(state, req.messages, tools if mode != "none" else None, effort, response_format)
    prepared = prepare_harmony(
        state,
        rendered,
        req,
        tools=tools,
        tool_choice=req.tool_choice,
        response_format=response_format,
        response_format_param="response_format",
        max_tokens=req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
        prompt_param="messages",
        max_tokens_param=None if clamp_max_tokens else explicit_max_tokens(req, "max_completion_tokens", "max_tokens"),
    )
    kwargs = prepared.sampling
    if req.logprobs:
        kwargs["logprobs"] = req.top_logprobs or 0
    params = []
    for i in range(req.n):
        if kwargs.get("seed") is not None and i:
            kwargs = {**kwargs, "seed": kwargs["seed"] + 1}
        params.append(harmony_sampling_params(state, **kwargs))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    plan = ChatPlan(
        model,
        prepared.prompt_token_ids,
        params,
        req.stop_list,
        bool(req.logprobs),
        req.top_logprobs or 0,
        include_usage,
    )
    # The grammar compiles here, with the rest of the preparation (off the event loop, bounded in time).
    compile_grammar(state, prepared.structured_spec)
    return plan


# ---------------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------------


def tool_call_object(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_message(result: Collected) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": result.content if result.content or not result.tool_calls else None,
        "reasoning_content": result.reasoning or None,
        "reasoning": result.reasoning or None,
        "refusal": None,
    }
    if result.tool_calls:
        message["tool_calls"] = [tool_call_object(c.call_id, c.name, c.arguments) for c in result.tool_calls]
    return message


def start_chat(state: ServerState, plan: ChatPlan) -> list[Any]:
    """Submit the plan's n choices to the engine now; their event streams (engine errors raise here)."""
    return start_all(
        [
            functools.partial(
                generate_harmony,
                state,
                plan.prompt_token_ids,
                params,
                stop=plan.stop,
                request_id=f"{plan.request_id}-{i}",
            )
            for i, params in enumerate(plan.params)
        ]
    )


async def chat_completion(state: ServerState, plan: ChatPlan, streams: list[Any]) -> dict[str, Any]:
    """Run a non-streaming chat request -> the `chat.completion` object."""
    try:
        results = await asyncio.gather(*[collect(stream) for stream in streams])
    finally:
        for stream in streams:
            await stream.aclose()
    choices = []
    for i, result in enumerate(results):
        choice: dict[str, Any] = {
            "index": i,
            "message": chat_message(result),
            "finish_reason": result.finish_reason,
            "logprobs": None,
        }
        if plan.logprobs:
            choice["logprobs"] = {"content": logprob_entries(state.encoding, result.logprobs, plan.top_logprobs)}
        choices.append(choice)
    return {
        "id": plan.request_id,
        "object": "chat.completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
        "usage": sum_usage([r.usage for r in results]).openai(),
        "system_fingerprint": None,
    }


async def chat_chunks(state: ServerState, plan: ChatPlan, streams: list[Any]) -> AsyncIterator[dict[str, Any]]:
    """`chat.completion.chunk` objects; the last one always has `choices: []` and the usage."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        out = {
            "id": plan.request_id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def choice(
        index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}

    yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(len(streams))])
    usages: list[Usage] = []
    async for index, event in merge_streams(streams):
        if isinstance(event, ReasoningDelta):
            yield chunk([choice(index, {"reasoning_content": event.text, "reasoning": event.text})])
        elif isinstance(event, ContentDelta):
            logprobs = None
            if plan.logprobs:
                logprobs = {"content": logprob_entries(state.encoding, event.logprobs, plan.top_logprobs)}
            yield chunk([choice(index, {"content": event.text}, logprobs=logprobs)])
        elif isinstance(event, ToolCallStarted):
            call = {
                "index": event.index,
                "id": event.call_id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            yield chunk([choice(index, {"tool_calls": [call]})])
        elif isinstance(event, ToolCallArgumentsDelta):
            call = {"index": event.index, "function": {"arguments": event.delta}}
            yield chunk([choice(index, {"tool_calls": [call]})])
        elif isinstance(event, Finished):
            usages.append(event.usage)
            yield chunk([choice(index, {}, event.finish_reason)])
    yield chunk([], sum_usage(usages).openai() if usages else Usage(len(plan.prompt_token_ids)).openai())


def error_frame(exc: BaseException) -> dict[str, Any]:
    return to_api_error(exc).openai_body()


async def chat_sse(
    state: ServerState,
    plan: ChatPlan,
    streams: list[Any],
    admission: Admission,
    *,
    usage_out: dict[str, Any] | None = None,
    done: bool = True,
) -> AsyncIterator[str]:
    """SSE frames of a streaming chat answer (the usage chunk only with `stream_options.include_usage`).
    `usage_out` receives the final usage object; `done`: end with `[DONE]` (a wrapper may add frames first)."""
    try:
        async for obj in chat_chunks(state, plan, streams):
            if obj["choices"] or plan.include_usage:
                yield sse_data(obj)
            if not obj["choices"] and usage_out is not None:
                usage_out.update(obj["usage"])
    except Exception as exc:
        yield sse_data(error_frame(exc))
    finally:
        admission.release()
        for stream in streams:
            await stream.aclose()
    if done:
        yield DONE


async def handle_chat(request: Request, body: dict[str, Any] | bytes) -> Response:
    """Validate, run and answer one chat request."""
    state = get_state(request)
    req = check_ranges(await off_loop(state, parse_body, ChatCompletionRequest, body), OPENAI_RANGES)
    plan = await off_loop(state, prepare_chat, state, req)
    return await respond(
        request,
        functools.partial(start_chat, state, plan),
        frames=functools.partial(chat_sse, state, plan) if req.stream else None,
        answer=functools.partial(chat_completion, state, plan),
    )


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    return await handle_chat(request, await read_body(request))


__all__ = [
    "ChatPlan",
    "chat_chunks",
    "chat_completion",
    "chat_prompt_ids",
    "chat_sse",
    "handle_chat",
    "prepare_chat",
    "router",
    "start_chat",
]
