"""The shared serving base under every API module: request preparation, generation, admission, answering.

The API modules (`openai_chat`, `openai_responses`, `completions`, `workers_ai`) only convert: their request
into a prompt and `SamplingParams` with the helpers here, and the events they get back into their response.
What they share lives here:
- request preparation: the model name and `lora` check, `tool_choice`, the sampling fields with the server's
  defaults, the structured-output spec (JSON mode / schema, strict tools, a forced tool call: enforced by the
  engine's grammar), the prompt-length check (`prepare_harmony` does the steps a harmony request goes
  through once its prompt is rendered), raw-text tokenization;
- generation: `generate_harmony` (events of server/events.py, folded by server/harmony_events.py) and
  `generate_raw` (`RawDelta`s then a `RawResult`), both submitted to the engine at once
  (server/engine_client.py);
- answering: `respond` admits the request (server/admission.py), starts it, and answers an SSE stream or the
  JSON object, aborting the engine requests when the client goes away (`run_until_disconnect`).

Defaults follow Workers AI: `max_tokens` 256, `temperature` 0.6.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from gptoss.engine.harmony.messages import ToolSpec, normalize_tools
from gptoss.engine.outputs import RequestOutput
from gptoss.engine.sampling_params import SamplingParams
from gptoss.engine.structured_output.spec import StructuredOutputError, StructuredOutputSpec
from gptoss.server.admission import Admission, release_all
from gptoss.server.engine_client import Submitted, submit
from gptoss.server.errors import APIError, bad_request, no_lora
from gptoss.server.events import Event, RawDelta, RawResult, Usage
from gptoss.server.harmony_events import harmony_events
from gptoss.server.protocol_openai import SamplingFields
from gptoss.server.sse import sse_response
from gptoss.server.state import ServerState, get_state

T = TypeVar("T")
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.6


# ---------------------------------------------------------------------------------------------------------
# Request preparation
# ---------------------------------------------------------------------------------------------------------


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(state: ServerState, model: str | None, lora: str | None = None) -> str:
    """The model name to answer with (404 for an unknown one); `lora` is refused (no adapters are loaded)."""
    name = state.check_model(model)
    if lora is not None:
        raise no_lora()
    return name


def encode_raw(state: ServerState, text: str) -> list[int]:
    """Raw text -> token ids; special-token spellings in the text become the special tokens (raw prompts)."""
    return state.encoding.encode_raw(text)


async def off_loop(state: ServerState, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` on the server's preparation pool: parsing a large body, rendering, tokenizing and
    compiling grammars take seconds for big requests, and on the event loop they would stall /health and every
    stream for that long."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.prepare_pool, functools.partial(fn, *args, **kwargs))


def text_length(value: Any) -> int:
    """Characters in every string of a JSON-like value (a request's prompt fields)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "model_dump"):  # a pydantic part of the request (response_format, text)
            stack.append(item.model_dump())
    return total


def check_prompt_chars(state: ServerState, **fields: Any) -> None:
    """Refuse a request whose prompt fields (`fields`: name -> value; everything rendered into the prompt)
    hold more than `max_prompt_chars` characters, before rendering or tokenizing them (tokenizing a 31 MB
    prompt took a CPU for a minute and left gigabytes resident, to answer a 400 in the end). The error names
    the largest field."""
    lengths = {name.replace("__", "."): text_length(value) for name, value in fields.items()}
    length = sum(lengths.values())
    limit = state.max_prompt_chars
    if limit is not None and length > limit:
        raise APIError(
            400,
            f"The prompt is {length} characters long; this server takes at most {limit} "
            f"(its context is {state.max_model_len} tokens)",
            param=max(lengths, key=lambda name: lengths[name]),
            code="context_length_exceeded",
            wai_code=3006,
            wai_status=413,
        )


def check_prompt_length(
    state: ServerState, prompt_len: int, max_tokens: int, param: str, max_tokens_param: str | None = None
) -> int:
    """Raise a 400 when the prompt leaves no room to generate; return max_tokens clamped to the context.

    `max_tokens_param`: the field the client set max_tokens with, on the OpenAI routes: there a prompt plus
    max_tokens beyond the context is a 400 naming it, as OpenAI answers (a default max_tokens, and the Workers
    AI route, are clamped).
    """
    if max_tokens_param is not None and prompt_len + max_tokens > state.max_model_len:
        raise APIError(
            400,
            f"{max_tokens_param} is too large: the prompt is {prompt_len} tokens and this model's context is "
            f"{state.max_model_len} tokens, so at most {max(0, state.max_model_len - prompt_len)} can be generated "
            f"(got {max_tokens})",
            param=max_tokens_param,
            code="invalid_value",
        )
    if prompt_len >= state.max_model_len:
        raise APIError(
            400,
            f"The prompt is {prompt_len} tokens long; this model's context is {state.max_model_len} tokens",
            param=param,
            code="context_length_exceeded",
            wai_code=3006,
            wai_status=413,
        )
    return max(0, min(max_tokens, state.max_model_len - prompt_len))


def explicit_max_tokens(req: Any, *names: str) -> str | None:
    """The first of `names` the request set (its max_tokens field), None when it left them all out."""
    return next((name for name in names if getattr(req, name, None) is not None), None)


def harmony_sampling_params(state: ServerState, **kwargs: Any) -> SamplingParams:
    """SamplingParams for a harmony completion: stops at `<|return|>` / `<|call|>`, keeps special tokens."""
    stop_ids = list(state.encoding.stop_token_ids)
    return SamplingParams(stop_token_ids=stop_ids, skip_special_tokens=False, **kwargs)


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
    if kwargs.get("seed") is not None:
        # OpenAI takes any 64-bit seed; the engine's are non-negative and hashed modulo 2^64 (same stream).
        kwargs["seed"] %= 1 << 64
    return kwargs


def tool_choice_mode(tool_choice: Any, tool_names: list[str]) -> tuple[str, str | None]:
    """(mode, function name), mode one of auto / none / required / named. Accepts Chat Completions'
    `{type: function, function: {name}}` and Responses' `{type: function, name}`; a named function must exist.
    (The call itself is forced by the request's grammar: `structured_spec`.)"""
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
    response_format: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    response_format_param: str = "response_format",
) -> StructuredOutputSpec | None:
    """The request's structured-output spec: JSON mode / schema, strict tools, a required or named tool call
    (None: unconstrained). Raises `StructuredOutputError` (a 400 naming the field)."""
    return StructuredOutputSpec.from_request(
        response_format, tools or None, tool_choice, response_format_param=response_format_param
    )


def compile_grammar(state: ServerState, spec: StructuredOutputSpec | None) -> None:
    """Compile a request's grammar during its preparation (off the event loop), bounded in time: the engine
    then finds it cached when the request is submitted. A grammar still compiling after `grammar_timeout_s`
    is a 400 naming the field it came from (llguidance's limits end the compile itself soon after)."""
    compile_now = getattr(state.engine, "compile_grammar", None)
    if spec is None or compile_now is None:
        return
    future = state.grammar_pool.submit(compile_now, spec)
    try:
        future.result(timeout=state.grammar_timeout_s)
    except concurrent.futures.TimeoutError:
        param = spec.final_param if spec.final_schema is not None or not spec.tools else spec.tools[0].param
        raise StructuredOutputError(
            param, f"the schema is too complex: its grammar did not compile within {state.grammar_timeout_s:g} s"
        ) from None


def resolve_tools(tools: list[dict[str, Any]], tool_choice: Any) -> tuple[list[ToolSpec], str, str | None]:
    """(the tools normalized, tool_choice mode, named function) of a request (see `tool_choice_mode`)."""
    specs = normalize_tools(tools)
    mode, name = tool_choice_mode(tool_choice, [t.name for t in specs])
    return specs, mode, name


@dataclass
class HarmonyPrompt:
    """A harmony request ready to submit: its prompt, its structured-output spec (None: unconstrained) and
    its SamplingParams keyword arguments (the spec among them, as `structured_output`)."""

    prompt_token_ids: list[int]
    structured_spec: StructuredOutputSpec | None
    sampling: dict[str, Any]


def prepare_harmony(
    state: ServerState,
    rendered: list[int],
    req: SamplingFields,
    *,
    tools: list[dict[str, Any]],
    tool_choice: Any,
    response_format: dict[str, Any] | None,
    response_format_param: str,
    max_tokens: int,
    prompt_param: str,
    max_tokens_param: str | None = None,
) -> HarmonyPrompt:
    """The steps every harmony request takes once its prompt is rendered: its structured-output spec (JSON
    mode / schema, strict tools, a required or named tool call: enforced by the engine's grammar), the
    prompt-length check and its sampling fields. `max_tokens_param`: see `check_prompt_length`."""
    spec = structured_spec(response_format, tools, tool_choice, response_format_param)
    max_tokens = check_prompt_length(state, len(rendered), max_tokens, prompt_param, max_tokens_param)
    sampling = {**sampling_kwargs(req, max_tokens, DEFAULT_TEMPERATURE), "structured_output": spec}
    return HarmonyPrompt(rendered, spec, sampling)


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------


def generate_harmony(
    state: ServerState,
    prompt_token_ids: list[int],
    params: SamplingParams,
    *,
    stop: Sequence[str] = (),
    request_id: str | None = None,
) -> Submitted[Event]:
    """Submit a harmony completion now; return the async iterator of its events (the last is `Finished`).

    `params.stop_token_ids` should hold `<|return|>` and `<|call|>` (see `harmony_sampling_params`); its
    `structured_output` constrains the reply. Engine errors (an invalid schema among them) raise here.
    """
    request_id = request_id or new_request_id("gen")
    outputs = submit(state, request_id, prompt_token_ids, params)
    events = harmony_events(state.encoding, outputs, len(prompt_token_ids), stop)
    return Submitted(state, request_id, events)


def generate_raw(
    state: ServerState, prompt_token_ids: list[int], params: SamplingParams, request_id: str
) -> Submitted[RawDelta | RawResult]:
    """Submit a raw completion now; iterate `RawDelta`s then one `RawResult` (always last)."""
    outputs = submit(state, request_id, prompt_token_ids, params)
    return Submitted(state, request_id, _raw_events(outputs, len(prompt_token_ids)))


async def _raw_events(
    outputs: AsyncIterator[RequestOutput], num_prompt_tokens: int
) -> AsyncIterator[RawDelta | RawResult]:
    result = RawResult(usage=Usage(prompt_tokens=num_prompt_tokens))
    async with contextlib.aclosing(outputs):  # type: ignore[type-var]
        async for output in outputs:
            result.usage.cached_tokens = output.num_cached_tokens
            new_logprobs = list(output.new_logprobs or [])
            if output.text_delta or output.new_token_ids:
                yield RawDelta(output.text_delta, list(output.new_token_ids), new_logprobs)
            result.text += output.text_delta
            result.token_ids += output.new_token_ids
            result.logprobs += new_logprobs
            if output.prompt_logprobs is not None:
                result.prompt_logprobs = output.prompt_logprobs
            if output.finished:
                result.finish_reason = "length" if output.finish_reason == "length" else "stop"
    result.usage.completion_tokens = len(result.token_ids)
    yield result


# ---------------------------------------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------------------------------------

# A streamed answer's SSE frames from the started streams; it releases the admission when it ends.
Frames = Callable[[list[Any], Admission], AsyncIterator[str]]


async def respond(
    request: Request,
    start: Callable[[], list[Any]],
    *,
    frames: Frames | None = None,
    answer: Callable[[list[Any]], Awaitable[Any]] | None = None,
) -> Response:
    """Admit a generation request, `start` it (submitting its engine requests) and answer: an SSE stream of
    `frames` when given, else the JSON of `answer`. The admission is held until the stream or answer ends;
    a client that goes away aborts the engine requests."""
    state = get_state(request)
    with Admission(state) as admission:
        streams = start()
        if frames is not None:
            admission.keep()
            return sse_response(frames(streams, admission), on_close=functools.partial(release_all, admission, streams))
        assert answer is not None, "respond() needs frames or answer"
        result = await run_until_disconnect(request, answer(streams))
    return JSONResponse(result)


async def run_until_disconnect(request: Any, coro: Any, poll_s: float = 0.25) -> Any:
    """Await `coro`, cancelling it (which aborts its engine requests) if the HTTP client goes away."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise APIError(499, "client disconnected", code="client_closed_request")
    finally:
        if not task.done():
            task.cancel()
