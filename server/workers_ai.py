"""Workers AI: POST /ai/run/{model} (and /client/v4/accounts/{account_id}/ai/run/{model}, .../ai/v1/*).

The body's keys pick the format, as Workers AI's schema for gpt-oss-120b does:
- `prompt` -> one user turn through harmony (or the raw text with `raw: true`), answered as
  `{"response", "usage", "tool_calls": [{"name", "arguments": {...}}]}`;
- `messages` -> a `chat.completion` (server/openai_chat.py); `input` -> a Responses object
  (server/openai_responses.py);
- `requests` -> a batch: each item in any of the three formats (with an optional `external_reference`
  echoed back), all run concurrently, `{"results": [...]}` in request order; an item that fails gets
  `{"success": false, "errors": [...]}` in its own slot without failing the others. With
  `?queueRequest=true` the batch is queued: `{"status": "queued", "request_id", "model"}` at once, and a
  later body `{"request_id": ...}` answers `{"status": "queued"|"running", "request_id"}` until the
  finished `{"results": [...]}` (kept in memory, bounded, expiring).
Every answer is wrapped as `{"result": ..., "success": true, "errors": [], "messages": []}`; errors use the
Workers AI envelope (server/errors.py). Streams: prompt -> `data: {"response": "<text>", "p": "<padding>"}`
frames; messages -> chat.completion.chunk frames; input -> the Responses events; each ends with
`data: {"response": "", "usage": {...}}` then `data: [DONE]`.
Defaults: max_tokens 256, temperature 0.6, reasoning effort medium. `lora`: no adapters are loaded: 405, 5005.
The /client/v4/.../ai/v1/{responses,chat/completions} aliases answer plain OpenAI objects on success.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import string
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from gptoss.engine.sampling_params import SamplingParams
from gptoss.server import openai_chat
from gptoss.server.admission import Admission
from gptoss.server.errors import bad_request, no_lora, to_api_error
from gptoss.server.events import ContentDelta, Finished, RawDelta, RawResult, collect, final_result
from gptoss.server.openai_chat import ChatPlan, chat_completion, handle_chat, prepare_chat, start_chat
from gptoss.server.openai_responses import (
    ResponsesPlan,
    handle_responses,
    prepare_responses,
    response_events,
    run_response,
    start_responses,
)
from gptoss.server.protocol_openai import ChatCompletionRequest, ResponsesRequest, check_ranges, parse_body
from gptoss.server.protocol_workers_ai import RANGES, BatchRequest, PollRequest, PromptRequest
from gptoss.server.serving import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    check_model,
    check_prompt_chars,
    check_prompt_length,
    encode_raw,
    generate_raw,
    off_loop,
    respond,
    run_until_disconnect,
    sampling_kwargs,
)
from gptoss.server.sse import DONE, sse_data, sse_event
from gptoss.server.state import ServerState, get_state, read_body

router = APIRouter()
FORMAT_KEYS = ("prompt", "messages", "input")
_PADDING_ALPHABET = string.ascii_letters + string.digits
_background: set[asyncio.Task[Any]] = set()


def envelope(result: Any) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": []}


def padding() -> str:
    """Random-length filler for the `p` field, so frame sizes do not reveal token lengths."""
    return "".join(secrets.choice(_PADDING_ALPHABET) for _ in range(secrets.randbelow(24) + 1))


def usage_brief(usage: dict[str, Any] | None) -> dict[str, Any]:
    """Workers AI's usage object (prompt/completion/total tokens) from an OpenAI usage object."""
    usage = usage or {}
    return {
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
    }


def usage_trailer(usage: dict[str, Any] | None) -> str:
    """The frame every Workers AI stream ends with (before `[DONE]`), failed ones too."""
    return sse_data({"response": "", "usage": usage_brief(usage)})


def normalize_response_format(body: dict[str, Any]) -> dict[str, Any]:
    """Workers AI sends `{"type": "json_schema", "json_schema": <the schema itself>}`; OpenAI wraps the schema
    as `{"name", "schema"}`. Accept both (a `json_schema` without a `schema` key is the schema)."""
    fmt = body.get("response_format")
    if (
        isinstance(fmt, dict)
        and fmt.get("type") == "json_schema"
        and isinstance(fmt.get("json_schema"), dict)
        and "schema" not in fmt["json_schema"]
    ):
        body = {**body, "response_format": {**fmt, "json_schema": {"name": "response", "schema": fmt["json_schema"]}}}
    return body


def body_format(body: dict[str, Any]) -> str:
    """Which format a body is in: "prompt", "messages", "input", "batch" or "poll"."""
    present = [key for key in FORMAT_KEYS if key in body]
    if "requests" in body and not present:
        return "batch"
    if "request_id" in body and not present:
        return "poll"
    if len(present) != 1:
        if not present:
            raise bad_request("the body needs one of prompt, messages, input or requests", param="prompt")
        raise bad_request(f"the body has more than one of {', '.join(present)}; send exactly one", param=present[1])
    if body.get("lora") is not None:
        raise no_lora()
    return present[0]


# ---------------------------------------------------------------------------------------------------------
# The prompt format
# ---------------------------------------------------------------------------------------------------------


def prompt_as_chat(req: PromptRequest) -> ChatCompletionRequest:
    """A templated prompt is a one-message chat."""
    fields = req.model_dump(by_alias=True, exclude_none=True, exclude={"prompt", "raw", "stream", "lora"})
    fields["messages"] = [{"role": "user", "content": req.prompt}]
    return parse_body(ChatCompletionRequest, fields)


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # the model wrote invalid JSON: hand it back as text rather than lose it


def prompt_result(content: str, tool_calls: list[Any], usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "response": content,
        "usage": usage_brief(usage),
        "tool_calls": [{"name": c.name, "arguments": _arguments_object(c.arguments)} for c in tool_calls],
    }


def prepare_raw(state: ServerState, req: PromptRequest) -> tuple[list[int], SamplingParams]:
    """A `raw: true` prompt: the text as it is, no template; sampled like legacy completions."""
    check_model(state, req.model)
    check_prompt_chars(state, prompt=req.prompt)
    ids = encode_raw(state, req.prompt)
    max_tokens = check_prompt_length(state, len(ids), req.max_tokens or DEFAULT_MAX_TOKENS, "prompt")
    kwargs = sampling_kwargs(req, max_tokens, DEFAULT_TEMPERATURE)
    kwargs["stop"] = req.stop_list
    return ids, SamplingParams(**kwargs)


async def run_prompt(state: ServerState, req: PromptRequest) -> dict[str, Any]:
    """Non-streaming prompt format."""
    if req.raw:
        ids, params = await off_loop(state, prepare_raw, state, req)
        result = await final_result(generate_raw(state, ids, params, f"wai-{uuid.uuid4().hex}"))
        return {"response": result.text, "usage": usage_brief(result.usage.openai()), "tool_calls": []}
    plan = await off_loop(state, prepare_chat, state, prompt_as_chat(req), clamp_max_tokens=True)
    streams = start_chat(state, plan)
    collected = await collect(streams[0])
    return prompt_result(collected.content, collected.tool_calls, collected.usage.openai())


async def prompt_sse(streams: list[Any], admission: Admission) -> AsyncIterator[str]:
    """The prompt format's stream: final-channel text (or raw text) as `{"response", "p"}` frames."""
    usage: dict[str, Any] = {}
    try:
        async with contextlib.aclosing(streams[0]):
            async for item in streams[0]:
                if isinstance(item, (RawDelta, ContentDelta)) and item.text:
                    yield sse_data({"response": item.text, "p": padding()})
                elif isinstance(item, (RawResult, Finished)):
                    usage = item.usage.openai()
    except Exception as exc:
        yield sse_data(to_api_error(exc).workers_ai_body())
    finally:
        admission.release()
    yield usage_trailer(usage)
    yield DONE


def prepare_prompt(state: ServerState, req: PromptRequest) -> Callable[[], list[Any]]:
    """Prepare a prompt-format request (raw text as it is, or a one-message chat); returns what submits it."""
    if req.raw:
        ids, params = prepare_raw(state, req)
        return lambda: [generate_raw(state, ids, params, f"wai-{uuid.uuid4().hex}")]
    plan = prepare_chat(state, prompt_as_chat(req), clamp_max_tokens=True)
    return functools.partial(start_chat, state, plan)


# ---------------------------------------------------------------------------------------------------------
# The messages and input formats streamed: the OpenAI streams, then the usage trailer
# ---------------------------------------------------------------------------------------------------------


async def chat_sse(state: ServerState, plan: ChatPlan, streams: list[Any], admission: Admission) -> AsyncIterator[str]:
    """The Chat Completions stream (the usage chunk only with `include_usage`), then the trailer."""
    usage: dict[str, Any] = {}
    async for frame in openai_chat.chat_sse(state, plan, streams, admission, usage_out=usage, done=False):
        yield frame
    yield usage_trailer(usage)
    yield DONE


async def responses_sse(
    state: ServerState, plan: ResponsesPlan, streams: list[Any], admission: Admission
) -> AsyncIterator[str]:
    """The Responses events, then the trailer (usage mapped from the Responses usage)."""
    usage: dict[str, Any] = {}
    try:
        async for event in response_events(state, plan, streams[0]):
            if event["type"] in ("response.completed", "response.incomplete"):
                usage = event["response"]["usage"] or {}
            yield sse_event(event)
    finally:
        admission.release()
    yield usage_trailer(
        {
            "prompt_tokens": usage.get("input_tokens", 0),
            "completion_tokens": usage.get("output_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
        }
    )
    yield DONE


# ---------------------------------------------------------------------------------------------------------
# One request, any format
# ---------------------------------------------------------------------------------------------------------


async def run_one(state: ServerState, body: dict[str, Any]) -> dict[str, Any]:
    """A non-streaming body in any of the three formats -> its result object (raises APIError)."""
    kind = body_format(body)
    body = normalize_response_format({k: v for k, v in body.items() if k != "external_reference"})
    if kind == "prompt":
        return await run_prompt(state, check_ranges(parse_body(PromptRequest, body), RANGES))
    if kind == "messages":
        chat_req = check_ranges(parse_body(ChatCompletionRequest, body), RANGES)
        plan: ChatPlan = await off_loop(state, prepare_chat, state, chat_req, clamp_max_tokens=True)
        return await chat_completion(state, plan, start_chat(state, plan))
    if kind == "input":
        responses_req = check_ranges(parse_body(ResponsesRequest, body), RANGES)
        rplan = await off_loop(state, prepare_responses, state, responses_req, clamp_max_tokens=True)
        return await run_response(state, rplan, start_responses(state, rplan))
    raise bad_request(f"a {kind} body cannot be nested in a batch", param="requests")


async def run_batch(state: ServerState, items: list[dict[str, Any]]) -> dict[str, Any]:
    """All items concurrently; each slot gets its result (plus external_reference) or its own error."""

    async def one(item: dict[str, Any]) -> dict[str, Any]:
        reference = item.get("external_reference")
        try:
            if not isinstance(item, dict):
                raise bad_request("each request must be an object", param="requests")
            result = await run_one(state, item)
        except Exception as exc:
            result = to_api_error(exc).workers_ai_body()
            result.pop("result", None)
        if reference is not None:
            result = {**result, "external_reference": reference}
        return result

    return {"results": list(await asyncio.gather(*[one(item) for item in items]))}


def _batch_items(body: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """The batch's items, each naming the path's model as a direct call does (answers echo it)."""
    items = parse_body(BatchRequest, body).requests
    return [{**item, "model": model} if isinstance(item, dict) else item for item in items]


# ---------------------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------------------


def _json_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise bad_request("Request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise bad_request("Invalid JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise bad_request(f"Invalid JSON body: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object")
    return body


async def run_model(request: Request, model: str) -> Response:
    state = get_state(request)
    state.check_model(model)
    body = await off_loop(state, _json_body, await read_body(request))
    queue = request.query_params.get("queueRequest", "").lower() in ("true", "1")
    kind = body_format(body)
    if kind in FORMAT_KEYS:
        body = normalize_response_format({**body, "model": model})  # the path names the model; answers echo it
    if kind == "poll":
        return JSONResponse(envelope(poll(state, parse_body(PollRequest, body).request_id)))
    if queue:
        items = _batch_items(body, model) if kind == "batch" else [body]
        return JSONResponse(envelope(enqueue(state, items, model)))
    if kind == "batch":
        items = _batch_items(body, model)
        with Admission(state, len(items)):
            result = await run_until_disconnect(request, run_batch(state, items))
        return JSONResponse(envelope(result))
    if body.get("stream") is True:
        return await stream_one(request, kind, body)
    with Admission(state):
        result = await run_until_disconnect(request, run_one(state, body))
    return JSONResponse(envelope(result))


async def stream_one(request: Request, kind: str, body: dict[str, Any]) -> Response:
    """A streamed body in any of the three formats (its frames end with the usage trailer and `[DONE]`)."""
    state = get_state(request)
    if kind == "messages":
        chat_req = check_ranges(parse_body(ChatCompletionRequest, body), RANGES)
        plan = await off_loop(state, prepare_chat, state, chat_req, clamp_max_tokens=True)
        return await respond(
            request, functools.partial(start_chat, state, plan), frames=functools.partial(chat_sse, state, plan)
        )
    if kind == "input":
        responses_req = check_ranges(parse_body(ResponsesRequest, body), RANGES)
        rplan = await off_loop(state, prepare_responses, state, responses_req, clamp_max_tokens=True)
        return await respond(
            request, lambda: [start_responses(state, rplan)], frames=functools.partial(responses_sse, state, rplan)
        )
    start = await off_loop(state, prepare_prompt, state, check_ranges(parse_body(PromptRequest, body), RANGES))
    return await respond(request, start, frames=prompt_sse)


# ---- the batch queue ----


def enqueue(state: ServerState, items: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """Queue a batch: admitted now for every item (429 when the server is full), run in the background within
    `batch_ttl_s` (a batch still unfinished then ends with an error), its result kept until it expires."""
    admission = Admission(state, len(items))
    request_id = str(uuid.uuid4())
    entry: dict[str, Any] = {
        "status": "queued",
        "request_id": request_id,
        "model": model,
        "result": None,
        "created": time.time(),
    }
    state.batches.put(request_id, entry)

    async def work() -> None:
        entry["status"] = "running"
        try:
            entry["result"] = await asyncio.wait_for(run_batch(state, items), timeout=state.batch_ttl_s)
        except TimeoutError:
            entry["result"] = {"results": [], "error": f"the batch did not finish within {state.batch_ttl_s:g} s"}
        except Exception as exc:
            entry["result"] = {"results": [], "error": to_api_error(exc).message}
        finally:
            admission.release()
        entry["status"] = "done"

    task = asyncio.get_running_loop().create_task(work())
    _background.add(task)
    task.add_done_callback(_background.discard)
    return {"status": "queued", "request_id": request_id, "model": model}


def poll(state: ServerState, request_id: str) -> dict[str, Any]:
    entry = state.batches.get(request_id)
    if entry is None:
        raise bad_request(f"no queued request with id {request_id} (unknown or expired)", param="request_id")
    if entry["status"] != "done":
        return {"status": entry["status"], "request_id": request_id}
    return entry["result"]


@router.post("/ai/run/{model:path}")
async def ai_run(request: Request, model: str) -> Response:
    return await run_model(request, model)


@router.post("/client/v4/accounts/{account_id}/ai/run/{model:path}")
async def account_ai_run(request: Request, account_id: str, model: str) -> Response:
    return await run_model(request, model)


@router.post("/client/v4/accounts/{account_id}/ai/v1/responses")
async def account_responses(request: Request, account_id: str) -> Response:
    return await handle_responses(request, await read_body(request))


@router.post("/client/v4/accounts/{account_id}/ai/v1/chat/completions")
async def account_chat(request: Request, account_id: str) -> Response:
    return await handle_chat(request, await read_body(request))
