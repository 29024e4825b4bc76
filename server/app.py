"""The HTTP server: a FastAPI app over an `AsyncEngine`, run by uvicorn.

API (what `gptoss serve` uses):

    create_app(engine, tokenizer, served_model_name="gpt-oss-120b", api_key=None, *, max_model_len=None,
               max_queue=1024, response_store_size=1024, batch_store_size=1024, batch_ttl_s=3600.0,
               max_body_bytes=32 MiB) -> FastAPI
        `engine`: an `engine.async_engine.AsyncEngine` (or any `server.engine_client.EngineClient`);
        `tokenizer`: the checkpoint's `tokenizers.Tokenizer`; `max_model_len` defaults to the engine's;
        `api_key`: when set, every route but /health needs `Authorization: Bearer <key>`;
        `max_queue`: generation requests in flight before new ones get 429 + Retry-After. Structured outputs
        (response formats, strict tools, forced tool calls) go to the engine as `SamplingParams.structured_output`.
    add_serve_arguments(parser)     (server/flags.py) adds --host (127.0.0.1), --port (8000), --api-key (env
                                    GPTOSS_API_KEY), --served-model-name (gpt-oss-120b), --max-queue,
                                    --response-store-size, --max-connections, --header-timeout
                                    (server/connections.py), --log-level
    run_server(args, engine=None, tokenizer=None)
        builds the engine from `args` (every `EngineArgs` field found on `args`, e.g. args.model) unless
        given, the app, and runs uvicorn on args.host:args.port until interrupted; shuts the engine down.

Routes:
    POST /v1/chat/completions      OpenAI Chat Completions (server/openai_chat.py)
    POST /v1/responses, GET /v1/responses/{id}   OpenAI Responses (server/openai_responses.py)
    POST /v1/completions           legacy Completions, raw text (server/completions.py)
    POST /ai/run/{model}           Workers AI run: prompt / messages / input / requests (server/workers_ai.py)
    POST /client/v4/accounts/{account_id}/ai/run/{model}, .../ai/v1/responses, .../ai/v1/chat/completions
    GET /v1/models, /v1/models/{model}, GET and HEAD /health (200 only while the engine loop is alive and
    its recent steps did not all fail), GET /metrics
    (Prometheus text), POST /tokenize, /detokenize (vLLM-compatible), GET /version
Errors come back in each API's own shape (server/errors.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from gptoss.server import completions, openai_chat, openai_responses, workers_ai
from gptoss.server.connections import install_repeat_filter, uvicorn_config
from gptoss.server.engine_client import EngineClient
from gptoss.server.errors import APIError, error_response, install_error_handlers, too_large, unauthorized
from gptoss.server.flags import DEFAULT_HEADER_TIMEOUT_S, add_serve_arguments
from gptoss.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gptoss.server.openai_chat import chat_prompt_ids
from gptoss.server.protocol_openai import DetokenizeRequest, TokenizeRequest, parse_body
from gptoss.server.serving import check_prompt_chars, encode_raw, off_loop
from gptoss.server.state import ServerState, get_state, read_body
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("server")
VERSION = "0.1.0"
PUBLIC_PATHS = ("/health",)


def endpoint_label(path: str) -> str:
    """A bounded metrics label for a path: account ids and model names are folded away."""
    if path.startswith("/client/v4/accounts/"):
        rest = path.split("/", 5)[5] if path.count("/") >= 5 else ""
        path = "/client/v4/accounts/{account_id}/" + rest
    for prefix in ("/ai/run/", "/client/v4/accounts/{account_id}/ai/run/"):
        if path.startswith(prefix):
            return prefix + "{model}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    known = (
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/version",
        "/client/v4/accounts/{account_id}/ai/v1/responses",
        "/client/v4/accounts/{account_id}/ai/v1/chat/completions",
    )
    return path if path in known else "other"


class GatewayMiddleware:
    """Pure ASGI (no buffering of streams): auth, the body-size limit, and request counting by status."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        status_holder = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            error = self._check(scope)
            if error is not None:
                await error_response(path, error)(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            self.state.metrics.count_request(endpoint_label(path), status_holder["status"])

    def _check(self, scope: Scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.state.api_key and scope["path"] not in PUBLIC_PATHS:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.state.api_key.encode()):
                return unauthorized()
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.state.max_body_bytes:
            return too_large(f"Request body of {length} bytes exceeds the limit of {self.state.max_body_bytes}")
        return None


def _engine_max_model_len(engine: Any) -> int | None:
    for holder in (engine, getattr(engine, "engine", None)):
        value = getattr(holder, "max_model_len", None)
        if isinstance(value, int):
            return value
    return None


def create_app(
    engine: EngineClient,
    tokenizer: Any,
    served_model_name: str = "gpt-oss-120b",
    api_key: str | None = None,
    *,
    max_model_len: int | None = None,
    max_queue: int = 1024,
    response_store_size: int = 1024,
    batch_store_size: int = 1024,
    batch_ttl_s: float = 3600.0,
    max_body_bytes: int = 32 << 20,
) -> FastAPI:
    """The FastAPI app serving `engine` (see the module docstring)."""
    state = ServerState(
        engine=engine,
        tokenizer=tokenizer,
        served_model_name=served_model_name,
        api_key=api_key or None,
        max_model_len=max_model_len or _engine_max_model_len(engine) or 131072,
        max_queue=max_queue,
        response_store_size=response_store_size,
        batch_store_size=batch_store_size,
        batch_ttl_s=batch_ttl_s,
        max_body_bytes=max_body_bytes,
    )
    # No trailing-slash redirects: their Location would be built from the client's Host header.
    app = FastAPI(
        title="gpt-oss server",
        version=VERSION,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.state.server = state
    install_error_handlers(app)
    for module in (openai_chat, openai_responses, completions, workers_ai):
        app.include_router(module.router)
    _add_misc_routes(app)
    app.add_middleware(GatewayMiddleware, state=state)
    return app


def _add_misc_routes(app: FastAPI) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request) -> Response:
        engine = get_state(request).engine
        # AsyncEngine says why it cannot serve (loop stopped, every recent step failed); other clients: alive.
        unhealthy = getattr(engine, "unhealthy_reason", lambda: None if engine.is_alive() else "engine not running")
        reason = unhealthy()
        return JSONResponse({"status": reason or "ok"}, status_code=503 if reason else 200)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": VERSION})

    def model_card(state: ServerState, name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "openai",
            "max_model_len": state.max_model_len,
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        state = get_state(request)
        return JSONResponse({"object": "list", "data": [model_card(state, n) for n in state.model_names]})

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str) -> Response:
        state = get_state(request)
        return JSONResponse(model_card(state, state.check_model(model)))

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = get_state(request)
        snapshot = state.engine.metrics()
        stats = snapshot.to_dict() if hasattr(snapshot, "to_dict") else dict(snapshot or {})
        # Data parallel (engine/data_parallel.py): each replica's numbers too, labelled replica="r".
        replica_metrics = getattr(state.engine, "replica_metrics", None)
        per_replica = [s.to_dict() for s in replica_metrics()] if replica_metrics is not None else None
        text = state.metrics.render(stats, per_replica, state.served_model_name)
        return PlainTextResponse(text, media_type=METRICS_CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        state = get_state(request)
        req = await off_loop(state, parse_body, TokenizeRequest, await read_body(request))
        state.check_model(req.model)
        if req.messages is not None:
            check_prompt_chars(state, messages=req.messages, tools=req.tools)
            tokens = await off_loop(
                state,
                chat_prompt_ids,
                state,
                req.messages,
                req.tools,
                req.reasoning_effort,
                add_generation_prompt=req.add_generation_prompt,
            )
        else:
            check_prompt_chars(state, prompt=req.prompt)
            tokens = await off_loop(state, encode_raw, state, req.prompt or "")
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        state = get_state(request)
        req = parse_body(DetokenizeRequest, await read_body(request))
        state.check_model(req.model)
        vocab = state.tokenizer.get_vocab_size(with_added_tokens=True)
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in 0..{vocab - 1} (got {bad[:5]})", param="tokens")
        return JSONResponse({"prompt": state.encoding.decode(req.tokens)})


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def build_engine(args: argparse.Namespace) -> Any:
    """An AsyncEngine from the `EngineArgs` fields present on `args`."""
    from gptoss.engine.async_engine import AsyncEngine
    from gptoss.engine.engine_args import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return AsyncEngine(EngineArgs(**kwargs))


def run_server(args: argparse.Namespace, engine: Any = None, tokenizer: Any = None) -> None:
    """Build (or take) the engine, create the app and serve it with uvicorn until interrupted."""
    import uvicorn
    from gptoss.engine.tokenizer import load_tokenizer

    logging.basicConfig(level=getattr(args, "log_level", "info").upper())
    if engine is None:
        engine = build_engine(args)
    if tokenizer is None:
        tokenizer = load_tokenizer(getattr(args, "tokenizer", None) or args.model)
    app = create_app(
        engine,
        tokenizer,
        served_model_name=getattr(args, "served_model_name", "gpt-oss-120b"),
        api_key=getattr(args, "api_key", None),
        max_queue=getattr(args, "max_queue", 1024),
        response_store_size=getattr(args, "response_store_size", 1024),
    )
    install_repeat_filter()
    config = uvicorn_config(
        app,
        getattr(args, "host", "127.0.0.1"),
        getattr(args, "port", 8000),
        max_connections=getattr(args, "max_connections", None),
        header_timeout_s=getattr(args, "header_timeout", DEFAULT_HEADER_TIMEOUT_S),
        log_level=getattr(args, "log_level", "info"),
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            shutdown()


__all__ = ["add_serve_arguments", "create_app", "run_server"]
