"""POST /v1/completions: legacy OpenAI Completions on raw text (no harmony template).

`prompt` is text, token ids, or a list of either (one choice set per prompt, `n` choices each, numbered
prompt-major). `echo` puts the prompt before the completion; with `logprobs` it also returns the prompt
tokens' logprobs (the first token has none: `null`), which is what evaluation harnesses use to score
continuations, and `max_tokens: 0` is then allowed (score only, nothing generated). Stop strings and
detokenization are the engine's (engine/detokenizer.py); the raw generation itself is server/serving.py's
`generate_raw`, shared with Workers AI `raw`.
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
from gptoss.engine.outputs import TokenLogprob
from gptoss.engine.sampling_params import SamplingParams
from gptoss.server.admission import Admission
from gptoss.server.engine_client import merge_streams, start_all
from gptoss.server.errors import bad_request, to_api_error
from gptoss.server.events import RawDelta, RawResult, Usage, final_result
from gptoss.server.logprobs import legacy_logprobs
from gptoss.server.protocol_openai import OPENAI_RANGES, CompletionRequest, check_ranges, parse_body
from gptoss.server.serving import (
    DEFAULT_MAX_TOKENS,
    check_model,
    check_prompt_chars,
    check_prompt_length,
    encode_raw,
    generate_raw,
    off_loop,
    respond,
    sampling_kwargs,
)
from gptoss.server.sse import DONE, sse_data
from gptoss.server.state import ServerState, get_state, read_body

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default for the legacy endpoint

router = APIRouter()


@dataclass
class CompletionPlan:
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str]
    params: list[SamplingParams]  # per choice: prompt-major, n per prompt
    n: int
    echo: bool
    logprobs: int | None
    include_usage: bool
    request_id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))


def prompts_of(state: ServerState, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [encode_raw(state, prompt)]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [encode_raw(state, p) for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise bad_request(
        "prompt must be a string, a list of strings, token ids or a list of token-id lists", param="prompt"
    )


def prepare_completion(state: ServerState, req: CompletionRequest) -> CompletionPlan:
    model = check_model(state, req.model)
    check_prompt_chars(state, prompt=req.prompt)
    prompts = prompts_of(state, req.prompt)
    vocab = state.tokenizer.get_vocab_size(with_added_tokens=True)
    params = []
    for i, ids in enumerate(prompts):
        param = f"prompt[{i}]" if isinstance(req.prompt, list) and len(prompts) > 1 else "prompt"
        if not ids:
            raise bad_request("prompt must not be empty", param=param)
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"prompt token ids must be in 0..{vocab - 1}", param=param)
        max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS
        explicit = "max_tokens" if req.max_tokens is not None else None
        max_tokens = check_prompt_length(state, len(ids), max_tokens, param, explicit) if max_tokens else 0
        kwargs = sampling_kwargs(req, max_tokens, DEFAULT_TEMPERATURE)
        kwargs["stop"] = req.stop_list
        kwargs["ignore_eos"] = req.ignore_eos
        if req.logprobs is not None:
            kwargs["logprobs"] = req.logprobs
        if req.echo and (req.logprobs is not None or max_tokens == 0):
            kwargs["prompt_logprobs"] = req.logprobs or 0
        for j in range(req.n):
            seeded = {**kwargs, "seed": kwargs["seed"] + j} if kwargs.get("seed") is not None else kwargs
            params.append(SamplingParams(**seeded))
    texts = [state.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return CompletionPlan(model, prompts, texts, params, req.n, req.echo, req.logprobs, include_usage)


def start_completion(state: ServerState, plan: CompletionPlan) -> list[Any]:
    return start_all(
        [
            functools.partial(generate_raw, state, plan.prompts[i // plan.n], params, f"{plan.request_id}-{i}")
            for i, params in enumerate(plan.params)
        ]
    )


def completion_choice(state: ServerState, plan: CompletionPlan, index: int, result: RawResult) -> dict[str, Any]:
    prompt_ids = plan.prompts[index // plan.n]
    prompt_text = plan.prompt_texts[index // plan.n]
    text = (prompt_text + result.text) if plan.echo else result.text
    logprobs = None
    if plan.logprobs is not None:
        ids: list[int] = []
        lps: list[TokenLogprob | None] = []
        if plan.echo:
            ids += prompt_ids
            prompt_lps = result.prompt_logprobs or [None] * len(prompt_ids)
            lps += list(prompt_lps) + [None] * (len(prompt_ids) - len(prompt_lps))
        ids += result.token_ids
        lps += result.logprobs + [None] * (len(result.token_ids) - len(result.logprobs))
        logprobs = legacy_logprobs(state.encoding, ids, lps, plan.logprobs)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason}


def total_usage(results: list[RawResult], n: int) -> Usage:
    prompts = sum(r.usage.prompt_tokens for r in results[::n])
    return Usage(
        prompts, sum(r.usage.completion_tokens for r in results), 0, sum(r.usage.cached_tokens for r in results[::n])
    )


async def run_completion(state: ServerState, plan: CompletionPlan, streams: list[Any]) -> dict[str, Any]:
    results = await asyncio.gather(*[final_result(s) for s in streams])
    choices = [completion_choice(state, plan, i, r) for i, r in enumerate(results)]
    return {
        "id": plan.request_id,
        "object": "text_completion",
        "created": plan.created,
        "model": plan.model,
        "choices": choices,
        "usage": total_usage(list(results), plan.n).openai(),
        "system_fingerprint": None,
    }


async def completion_sse(
    state: ServerState, plan: CompletionPlan, streams: list[Any], admission: Admission
) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        obj: dict[str, Any] = {
            "id": plan.request_id,
            "object": "text_completion",
            "created": plan.created,
            "model": plan.model,
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return sse_data(obj)

    results: list[RawResult] = [RawResult() for _ in streams]
    try:
        if plan.echo:
            for i in range(len(streams)):
                yield chunk(
                    [{"index": i, "text": plan.prompt_texts[i // plan.n], "logprobs": None, "finish_reason": None}]
                )
        async for index, item in merge_streams(streams):
            if isinstance(item, RawDelta):
                logprobs = None
                if plan.logprobs is not None:
                    logprobs = legacy_logprobs(state.encoding, item.token_ids, list(item.logprobs), plan.logprobs)
                yield chunk([{"index": index, "text": item.text, "logprobs": logprobs, "finish_reason": None}])
            else:
                results[index] = item
                yield chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": item.finish_reason}])
        if plan.include_usage:
            yield chunk([], total_usage(results, plan.n).openai())
    except Exception as exc:
        yield sse_data(to_api_error(exc).openai_body())
    finally:
        admission.release()
    yield DONE


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    state = get_state(request)
    req = check_ranges(await off_loop(state, parse_body, CompletionRequest, await read_body(request)), OPENAI_RANGES)
    plan = await off_loop(state, prepare_completion, state, req)
    return await respond(
        request,
        functools.partial(start_completion, state, plan),
        frames=functools.partial(completion_sse, state, plan) if req.stream else None,
        answer=functools.partial(run_completion, state, plan),
    )
