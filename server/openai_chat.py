"""POST /v1/chat/completions: OpenAI Chat Completions over harmony.

Request -> harmony conversation (engine/harmony/chat_convert.py) -> prompt tokens -> `generate_harmony`
events -> `chat.completion` (or `chat.completion.chunk` frames). The answer maps the harmony channels:
final -> `message.content`; analysis -> `message.reasoning_content` and `message.reasoning` (both names,
as servers disagree); calls to `functions.NAME` -> `message.tool_calls` with arguments as JSON text.

`tool_choice`: "auto" (default) renders the tools; "none" leaves them out of the prompt; a named function
or "required" forces a call by ending the prompt with the call's header (`to=functions.NAME<|channel|>
commentary <|constrain|>json<|message|>`, or just ` to=functions.` for "required"), which skips reasoning.
The Workers AI `messages` format (server/workers_ai.py) reuses `prepare_chat` / `chat_completion` /
`chat_chunks` with its own defaults.
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
from fastapi.responses import JSONResponse, Response
from gptoss.engine.harmony.chat_convert import conversation_from_chat
from gptoss.engine.harmony.messages import normalize_effort, normalize_tools
from gptoss.engine.outputs import TokenLogprob
from gptoss.engine.sampling_params import SamplingParams
from gptoss.server.errors import APIError, bad_request, no_lora, to_api_error
from gptoss.server.generation import (
    Admission,
    Collected,
    ContentDelta,
    Finished,
    ReasoningDelta,
    ToolCallArgumentsDelta,
    ToolCallStarted,
    Usage,
    check_prompt_length,
    collect,
    generate_harmony,
    harmony_sampling_params,
    merge_streams,
    release_all,
    run_until_disconnect,
    start_all,
)
from gptoss.server.protocol_openai import ChatCompletionRequest, SamplingFields, parse_body
from gptoss.server.sse import DONE, sse_data, sse_response
from gptoss.server.state import ServerState, get_state, read_body

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.6

router = APIRouter()


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def sampling_kwargs(req: SamplingFields, max_tokens: int, default_temperature: float) -> dict[str, Any]:
    """SamplingParams keyword arguments from a request's sampling fields (None: the engine default)."""
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": req.temperature if req.temperature is not None else default_temperature,
    }
    for name in ("top_p", "top_k", "min_p", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def forced_call_prefill(state: ServerState, name: str | None) -> list[int]:
    """Completion tokens that force a tool call: the header of a call to `name` (or to any function)."""
    enc = state.encoding
    if name is None:
        return enc.encode_text(" to=functions.")
    return [
        *enc.encode_text(f" to=functions.{name}"),
        enc.channel_id,
        *enc.encode_text("commentary"),
        *enc.encode_text(" "),
        enc.constrain_id,
        *enc.encode_text("json"),
        enc.message_id,
    ]


def tool_choice_mode(tool_choice: Any, tool_names: list[str]) -> tuple[str, str | None]:
    """(mode, function name), mode one of auto / none / required / named. Accepts Chat Completions'
    `{type: function, function: {name}}` and Responses' `{type: function, name}`; a named function must exist."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return tool_choice or "auto", None
    if tool_choice == "required":
        if not tool_names:
            raise bad_request("tool_choice 'required' needs tools", param="tool_choice")
        return "required", None
    usage = "tool_choice must be auto, none, required or a function ({type: function, name})"
    if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function":
        raise bad_request(usage, param="tool_choice")
    function = tool_choice.get("function")
    name = (function if isinstance(function, dict) else tool_choice).get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(usage, param="tool_choice")
    if name not in tool_names:
        raise bad_request(f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
    return "named", name


def structured_spec(
    state: ServerState,
    response_format: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    response_format_param: str = "response_format",
) -> Any:
    """The request's structured-output spec (None: unconstrained, or the engine cannot constrain)."""
    if state.structured is None:
        return None
    return state.structured.spec(
        response_format, tools or None, tool_choice, response_format_param=response_format_param
    )


def mask_fn(state: ServerState, spec: Any) -> Any:
    """A fresh `logits_mask_fn` for one generation of a constrained request (None when unconstrained)."""
    return state.structured.mask_fn(spec) if spec is not None else None


@dataclass
class ChatPlan:
    """Everything a chat request resolves to before it runs."""

    model: str
    prompt_token_ids: list[int]
    prefill_token_ids: list[int]
    params: list[SamplingParams]  # one per choice (n)
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    include_usage: bool
    structured_spec: Any = None  # engine StructuredOutputSpec when the reply is constrained
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


def prepare_chat(
    state: ServerState,
    req: ChatCompletionRequest,
    *,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    default_temperature: float = DEFAULT_TEMPERATURE,
) -> ChatPlan:
    model = state.check_model(req.model)
    if req.lora is not None:
        raise no_lora()
    tools = req.tools if req.tools is not None else req.functions or []
    mode, name = tool_choice_mode(req.tool_choice, [t.name for t in normalize_tools(tools)])
    response_format = req.response_format.model_dump(by_alias=True) if req.response_format else None
    effort = req.effort
    if req.reasoning_effort is None and req.reasoning is not None:  # so that an error names the field sent
        effort = normalize_effort(req.reasoning.effort, "reasoning.effort")
    prompt = chat_prompt_ids(state, req.messages, tools if mode != "none" else None, effort, response_format)
    spec = structured_spec(state, response_format, tools, req.tool_choice)
    prefill = forced_call_prefill(state, name) if mode in ("named", "required") and spec is None else []
    prompt = prompt + prefill
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    max_tokens = check_prompt_length(state, len(prompt), max_tokens, "messages")
    kwargs = sampling_kwargs(req, max_tokens, default_temperature)
    if req.logprobs:
        kwargs["logprobs"] = req.top_logprobs or 0
    params = []
    for i in range(req.n):
        if kwargs.get("seed") is not None and i:
            kwargs = {**kwargs, "seed": kwargs["seed"] + 1}
        params.append(harmony_sampling_params(state, **kwargs))
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return ChatPlan(
        model, prompt, prefill, params, req.stop_list, bool(req.logprobs), req.top_logprobs or 0, include_usage, spec
    )


# ---------------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------------


def token_text(state: ServerState, token_id: int) -> str:
    return state.encoding.token_bytes(token_id).decode("utf-8", errors="replace")


def logprob_entries(state: ServerState, logprobs: list[TokenLogprob], top: int) -> list[dict[str, Any]]:
    """Chat Completions `logprobs.content` entries."""
    out = []
    for lp in logprobs:
        data = state.encoding.token_bytes(lp.token_id)
        tops = sorted(lp.top_logprobs.items(), key=lambda kv: -kv[1])[:top]
        out.append(
            {
                "token": data.decode("utf-8", errors="replace"),
                "logprob": lp.logprob,
                "bytes": list(data),
                "top_logprobs": [
                    {"token": token_text(state, t), "logprob": v, "bytes": list(state.encoding.token_bytes(t))}
                    for t, v in tops
                ],
            }
        )
    return out


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


def sum_usage(usages: list[Usage]) -> Usage:
    """Usage of n choices: the prompt counted once, completions summed."""
    first = usages[0]
    return Usage(
        first.prompt_tokens,
        sum(u.completion_tokens for u in usages),
        sum(u.reasoning_tokens for u in usages),
        first.cached_tokens,
    )


def start_chat(state: ServerState, plan: ChatPlan) -> list[Any]:
    """Submit the plan's n choices to the engine now; their event streams (engine errors raise here)."""
    return start_all(
        [
            functools.partial(
                generate_harmony,
                state,
                plan.prompt_token_ids,
                params,
                prefill_token_ids=plan.prefill_token_ids,
                stop=plan.stop,
                request_id=f"{plan.request_id}-{i}",
                logits_mask_fn=mask_fn(state, plan.structured_spec),
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
            choice["logprobs"] = {"content": logprob_entries(state, result.logprobs, plan.top_logprobs)}
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
                logprobs = {"content": logprob_entries(state, event.logprobs, plan.top_logprobs)}
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
    state: ServerState, plan: ChatPlan, streams: list[Any], admission: Admission, workers_ai_trailer: bool = False
) -> AsyncIterator[str]:
    """SSE frames of a streaming chat answer (OpenAI; or Workers AI with its `{"response": "", usage}` trailer)."""
    try:
        async for obj in chat_chunks(state, plan, streams):
            if obj["choices"] or plan.include_usage:
                yield sse_data(obj)
            if not obj["choices"] and workers_ai_trailer:
                yield sse_data({"response": "", "usage": usage_brief(obj.get("usage"))})
    except Exception as exc:
        yield sse_data(error_frame(exc))
        if workers_ai_trailer:  # Workers AI streams end with the usage trailer, failed ones too
            yield sse_data({"response": "", "usage": usage_brief(None)})
    finally:
        admission.release()
        for stream in streams:
            await stream.aclose()
    yield DONE


def usage_brief(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Workers AI's usage object: prompt/completion/total tokens."""
    usage = usage or {}
    return {
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
    }


async def handle_chat(
    request: Request,
    body: dict[str, Any] | bytes,
    *,
    workers_ai: bool = False,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Response:
    """Validate, run and answer one chat request (shared by /v1/chat/completions and the Workers AI routes)."""
    state = get_state(request)
    req = parse_body(ChatCompletionRequest, body)
    plan = prepare_chat(state, req, default_max_tokens=default_max_tokens)
    with Admission(state) as admission:
        streams = start_chat(state, plan)
        if req.stream:
            admission.keep()
            return sse_response(
                chat_sse(state, plan, streams, admission, workers_ai_trailer=workers_ai),
                on_close=functools.partial(release_all, admission, streams),
            )
        result = await run_until_disconnect(request, chat_completion(state, plan, streams))
    return JSONResponse(result)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    return await handle_chat(request, await read_body(request))


__all__ = [
    "APIError",
    "chat_chunks",
    "chat_completion",
    "chat_prompt_ids",
    "handle_chat",
    "prepare_chat",
    "router",
]
