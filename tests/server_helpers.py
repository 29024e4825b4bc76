"""Server test helpers: a live uvicorn server on a free loopback port, over the real engine or a scripted one.

The fixtures are in tests/server_fixtures.py (test modules load it with `pytest_plugins`); this module holds
what they share with the tests:
- `live_server_for(checkpoint)`: the real `AsyncEngine` on the tiny random checkpoint; its output is noise, so it
  checks plumbing (shapes, usage, streaming, aborts), not harmony structure.
- `scripted_server_for(name, **create_app_kwargs)`: `ScriptedEngine` replays hand-made token sequences
  (`server.engine.script = tokens`), so tool calls, reasoning and content go through the whole HTTP stack
  deterministically.
Both are made once per process (a module-level cache) and served from a background thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss.engine.errors import EngineOverloadedError, RequestFailedError
from gptoss.engine.outputs import RequestOutput, TokenLogprob
from gptoss.engine.sampling_params import SamplingParams
from gptoss.engine.tokenizer import build_tiny_tokenizer, load_tokenizer

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str
    app: Any
    engine: Any
    tokenizer: Any
    server: Any = None
    thread: threading.Thread | None = None

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()


def serve(app: Any, engine: Any, tokenizer: Any) -> LiveServer:
    """Run `app` with uvicorn in a daemon thread on a free loopback port; returns once it accepts requests."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", app, engine, tokenizer, server, thread)


# ---------------------------------------------------------------------------------------------------------
# A scripted engine
# ---------------------------------------------------------------------------------------------------------


class ScriptedEngine:
    """Implements the server's engine interface; every request "generates" `self.script` (a token-id list).

    Honours max_tokens and stop_token_ids; reports logprobs (-0.5 for the chosen token, -1.5 for one
    alternative) and prompt logprobs when asked. `delay` sleeps between tokens (for disconnect tests).
    A request with `structured_output` gets its grammar compiled as the engine does (an invalid schema raises
    at once); each scripted token is checked against the grammar's mask and the ones it forbids are recorded
    in `mask_violations` (the script is replayed regardless). With `fail_after` set,
    a request fails (`RequestFailedError`, as the engine reports a failed request) after that many tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.script: list[int] = []
        self.delay = 0.0
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.requests: list[tuple[str, list[int], SamplingParams]] = []
        self.alive = True
        self.overloaded = False
        self.grammars: list[Any] = []  # the grammar state of each request (None: unconstrained)
        self.mask_violations: list[int] = []
        self.fail_after: int | None = None
        self._compiler: Any = None

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Any:
        if self.overloaded:
            raise EngineOverloadedError("scripted overload")
        grammar = None
        if params.structured_output is not None:
            grammar = self.compiler.new_state(params.structured_output)
        self.requests.append((request_id, list(prompt_token_ids), params))
        self.grammars.append(grammar)
        self.active.add(request_id)
        return self._run(request_id, list(prompt_token_ids), params, list(self.script), grammar)

    @property
    def compiler(self) -> Any:
        if self._compiler is None:
            from gptoss.engine.structured_output.grammar import StructuredOutputCompiler

            self._compiler = StructuredOutputCompiler(
                self.tokenizer, self.tokenizer.get_vocab_size(with_added_tokens=True)
            )
        return self._compiler

    def compile_grammar(self, spec: Any) -> None:
        """As `AsyncEngine.compile_grammar`: compile into the cache (the server does it while preparing)."""
        self.compiler.compile(spec)

    def _logprob(self, token_id: int) -> TokenLogprob:
        other = (token_id + 1) % self.tokenizer.get_vocab_size()
        return TokenLogprob(token_id, -0.5, 1, {token_id: -0.5, other: -1.5})

    async def _run(
        self, request_id: str, prompt: list[int], params: SamplingParams, script: list[int], grammar: Any = None
    ) -> Any:
        tokens: list[int] = []
        finished = False
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [self._logprob(t) for t in prompt[1:]]
        try:
            if params.max_tokens == 0 or not script:
                finished = True
                yield RequestOutput(request_id, prompt, [], "", True, "length", prompt_logprobs=prompt_logprobs)
                return
            for token_id in script:
                if self.fail_after is not None and len(tokens) >= self.fail_after:
                    finished = True
                    raise RequestFailedError("scripted failure")
                if request_id not in self.active:
                    finished = True
                    yield RequestOutput(request_id, prompt, tokens, "", True, "abort")
                    return
                await asyncio.sleep(self.delay)
                if grammar is not None and not bool(grammar(list(tokens))[token_id]):
                    self.mask_violations.append(token_id)
                tokens.append(token_id)
                reason = None
                if token_id in params.stop_token_ids:
                    reason = "stop"
                elif len(tokens) >= params.max_tokens or len(tokens) == len(script):
                    reason = "length" if len(tokens) >= params.max_tokens else "stop"
                finished = reason is not None
                text = self.tokenizer.decode([token_id], skip_special_tokens=params.skip_special_tokens)
                logprobs = [self._logprob(token_id)] if params.logprobs is not None else None
                yield RequestOutput(
                    request_id,
                    prompt,
                    list(tokens),
                    "",
                    finished,
                    reason,
                    new_token_ids=[token_id],
                    text_delta=text,
                    new_logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                )
                if finished:
                    return
        finally:
            self.active.discard(request_id)
            if not finished:
                self.aborted.append(request_id)

    def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.active.discard(request_id)
            self.aborted.append(request_id)

    def is_alive(self) -> bool:
        return self.alive

    def metrics(self) -> dict[str, Any]:
        return {"num_running": len(self.active), "num_waiting": 0}


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with harmony special-token spellings as the special tokens."""
    return tokenizer.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------------------------
# Servers made once per process (several test modules share them)
# ---------------------------------------------------------------------------------------------------------

_cache: dict[str, LiveServer] = {}


def live_server_for(checkpoint: Path) -> LiveServer:
    if "live" not in _cache:
        from gptoss.engine.async_engine import AsyncEngine
        from gptoss.engine.engine_args import EngineArgs
        from gptoss.server.app import create_app

        engine = AsyncEngine(
            EngineArgs(model=str(checkpoint), num_blocks=128, max_num_seqs=8, max_num_batched_tokens=256)
        )
        tokenizer = load_tokenizer(checkpoint)
        _cache["live"] = serve(create_app(engine, tokenizer), engine, tokenizer)
    return _cache["live"]


def scripted_server_for(name: str = "scripted", engine_cls: type = ScriptedEngine, **app_kwargs: Any) -> LiveServer:
    if name not in _cache:
        from gptoss.server.app import create_app

        tokenizer = build_tiny_tokenizer()
        engine = engine_cls(tokenizer)
        _cache[name] = serve(create_app(engine, tokenizer, max_model_len=2048, **app_kwargs), engine, tokenizer)
    return _cache[name]


def stop_server(name: str) -> None:
    server = _cache.pop(name, None)
    if server is not None:
        server.stop()


HARMONY_ANSWER = (
    "<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final<|message|>Hi there<|return|>"
)
HARMONY_TOOL_CALL = (
    "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"location": "Paris"}<|call|>'
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a location",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}


def assert_every_api_answers(base_url: str, max_tokens: int = 3) -> None:
    """One small non-streaming request per API shape (Chat Completions, Responses, Workers AI), each a 200
    with at least one generated token (multi-GPU server tests)."""
    import httpx

    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(
        f"{base_url}/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens}, timeout=60
    )
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1, chat.text
    body = {"input": "Hi", "max_output_tokens": max_tokens}
    responses = httpx.post(f"{base_url}/v1/responses", json=body, timeout=60)
    assert responses.status_code == 200 and responses.json()["usage"]["output_tokens"] >= 1, responses.text
    body = {"prompt": "Hi", "max_tokens": max_tokens}
    workers_ai = httpx.post(f"{base_url}/ai/run/@cf/openai/gpt-oss-120b", json=body, timeout=60)
    assert workers_ai.status_code == 200, workers_ai.text
    assert workers_ai.json()["result"]["usage"]["completion_tokens"] >= 1
