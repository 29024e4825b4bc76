"""Errors: one exception type for every 4xx/5xx the server answers, rendered in the calling API's own shape.

Route functions raise `APIError`, or let pydantic errors and the engine's errors escape: the handlers installed
by `install_error_handlers` turn a validation error into a 400 naming the field, and an `engine.errors.EngineError`
into the status, code and field it carries. The shape depends on the route:

- OpenAI routes (`/v1/...`, `/tokenize`, ...): `{"error": {"message", "type", "param", "code"}}`.
- Every route under `/ai/` and `/client/v4/`: the Workers AI envelope
  `{"success": false, "errors": [{"code", "message"}], "result": null, "messages": []}` with Workers AI's codes
  (5006 bad input, 5007 no such model, 5005 no LoRA, 3006 too large, 3040 out of capacity, 10000 auth).

A catch-all handler makes sure nothing reaches the client as a dropped connection or a bare 500 page.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from gptoss.engine.errors import EngineError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("server")

# Workers AI error codes (the Workers AI API reference).
WAI_BAD_INPUT = 5006
WAI_NO_MODEL = 5007
WAI_NO_LORA = 5005
WAI_TOO_LARGE = 3006
WAI_OUT_OF_CAPACITY = 3040
WAI_AUTH = 10000
WAI_INTERNAL = 3043  # what Workers AI answers for an internal server error


class APIError(Exception):
    """An error answered to the client; `param` names the offending request field when there is one.

    `status` is the HTTP status; `wai_code` / `wai_status` the Workers AI error code and status (the status
    defaults to `status`); `headers` are extra response headers (Retry-After for 429/503).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        wai_code: int = WAI_BAD_INPUT,
        wai_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.wai_code = wai_code
        self.wai_status = wai_status if wai_status is not None else status
        self.headers = headers or {}

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def workers_ai_body(self) -> dict[str, Any]:
        message = self.message
        if self.param and self.param not in message:
            message = f"{message} (field: {self.param})"  # the envelope has no param: name it in the text
        if self.wai_code == WAI_BAD_INPUT and not message.startswith("AiError"):
            message = f"AiError: Bad input: {message}"
        return {
            "success": False,
            "errors": [{"code": self.wai_code, "message": message}],
            "result": None,
            "messages": [],
        }


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for invalid input naming `param`."""
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist",
        param="model",
        code="model_not_found",
        wai_code=WAI_NO_MODEL,
        wai_status=400,
    )


def unauthorized() -> APIError:
    return APIError(
        401,
        "Invalid or missing API key (send Authorization: Bearer <key>)",
        type="authentication_error",
        code="invalid_api_key",
        wai_code=WAI_AUTH,
    )


def overloaded(
    message: str = "The server is at capacity; retry later", retry_after: int = 1, status: int = 429
) -> APIError:
    return APIError(
        status,
        message,
        type="rate_limit_error" if status == 429 else "server_error",
        code="server_overloaded",
        wai_code=WAI_OUT_OF_CAPACITY,
        wai_status=429,
        headers={"Retry-After": str(retry_after)},
    )


def no_lora() -> APIError:
    """No LoRA adapters are loaded: Workers AI answers 405 / 5005; OpenAI routes a 400 naming `lora`."""
    return APIError(
        400,
        "this model has no LoRA adapter loaded (lora is not supported)",
        param="lora",
        code="lora_not_supported",
        wai_code=WAI_NO_LORA,
        wai_status=405,
    )


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param, code="request_too_large", wai_code=WAI_TOO_LARGE)


def is_workers_ai_path(path: str) -> bool:
    """Routes answering errors in the Workers AI envelope (everything under /ai/ and /client/v4/)."""
    return path.startswith("/ai/") or path.startswith("/client/v4/")


def error_response(path: str, error: APIError) -> JSONResponse:
    """The JSON response for `error` in the shape of the API that `path` belongs to."""
    if is_workers_ai_path(path):
        return JSONResponse(error.workers_ai_body(), status_code=error.wai_status, headers=error.headers)
    return JSONResponse(error.openai_body(), status_code=error.status, headers=error.headers)


# ---------------------------------------------------------------------------------------------------------
# Converting other exceptions
# ---------------------------------------------------------------------------------------------------------

_UNION_MEMBER_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "is-instance"})


def loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str:
    """Pydantic's error location as the field path clients know: ('messages', 2, 'role') -> messages[2].role."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path") and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (
            "[" in part or "(" in part or part.startswith("function-") or part in _UNION_MEMBER_TAGS
        ):
            # Union members / validator pseudo-locations ('str', 'list[int]', 'function-after[...]') say
            # nothing to a client.
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error as a 400 naming its field (invalid JSON and wrong types included)."""
    errors = exc.errors()
    if not errors:
        return bad_request("Invalid request body")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return bad_request(f"Invalid JSON body: {ctx.get('error', first.get('msg', ''))}", code="invalid_json")
    param = loc_to_param(first.get("loc", ())) or None
    if kind == "missing":
        message = f"Missing required field '{param}'"
    elif kind == "extra_forbidden":
        message = f"Unknown field '{param}'"
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid')}" if param else first.get("msg", "")
    return bad_request(message, param=param, code="invalid_value" if kind != "missing" else "missing_required")


# Workers AI's code and status for the engine's error codes (the rest: bad input, or internal by status).
_WAI_BY_CODE: dict[str | None, tuple[int, int | None]] = {
    "context_length_exceeded": (WAI_TOO_LARGE, 413),
    "server_overloaded": (WAI_OUT_OF_CAPACITY, 429),
    "engine_unavailable": (WAI_OUT_OF_CAPACITY, 503),
    "request_failed": (WAI_INTERNAL, None),
}


def from_engine_error(exc: EngineError) -> APIError:
    """An engine error as the answer it carries (status, code, field, Retry-After)."""
    status = exc.http_status
    default_wai = (WAI_INTERNAL, None) if status >= 500 else (WAI_BAD_INPUT, None)
    wai_code, wai_status = _WAI_BY_CODE.get(exc.code, default_wai)
    if status >= 500:
        kind = "server_error"
    elif status == 429:
        kind = "rate_limit_error"
    else:
        kind = "invalid_request_error"
    return APIError(
        status,
        exc.client_message,
        param=exc.param,
        type=kind,
        code=exc.code,
        wai_code=wai_code,
        wai_status=wai_status,
        headers={"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None,
    )


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to an `APIError`: input errors to 400s naming the field, engine errors to theirs."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (ValidationError, RequestValidationError)):
        return from_validation_error(exc)
    if isinstance(exc, json.JSONDecodeError):
        return bad_request(f"Invalid JSON body: {exc}", code="invalid_json")
    if isinstance(exc, EngineError):
        return from_engine_error(exc)
    logger.exception("internal error", exc_info=exc)
    return APIError(
        500,
        f"Internal server error ({type(exc).__name__})",
        type="server_error",
        code="internal_error",
        wai_code=WAI_INTERNAL,
        wai_status=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every exception becomes a JSON answer in the route's API shape (no HTML 500s, no dropped connections)."""

    async def handle_any(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, to_api_error(exc))

    async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = APIError(
                404,
                f"Unknown route {request.method} {request.url.path}",
                code="not_found",
                wai_code=7000 if is_workers_ai_path(request.url.path) else WAI_BAD_INPUT,
            )
        elif exc.status_code == 405:
            error = APIError(
                405, f"Method {request.method} not allowed on {request.url.path}", code="method_not_allowed"
            )
        else:
            error = APIError(exc.status_code, str(exc.detail), code=None)
        return error_response(request.url.path, error)

    app.add_exception_handler(APIError, handle_any)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, handle_any)  # type: ignore[arg-type]
    app.add_exception_handler(ValidationError, handle_any)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, handle_http)  # type: ignore[arg-type]
    # Engine errors (bad input among them) are handled here rather than by the catch-all, which Starlette runs
    # in its outermost middleware, logging a traceback for what is a client error.
    app.add_exception_handler(EngineError, handle_any)  # type: ignore[arg-type]
    app.add_exception_handler(ValueError, handle_any)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, handle_any)
