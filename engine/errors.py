"""The errors a request can meet in the engine, each carrying how a server answers it.

`EngineError` is the base: `http_status` and `code` (the OpenAI-style error code, or None) are class
attributes, `param` names the offending request field when there is one, `client_message` is the text a
client is shown and `retry_after_s` the Retry-After a server sends (None: none). The server maps them onto
each API's error shape without knowing the classes (server/errors.py).

`RequestError` (400) is bad input: `PromptTooLongError`, `InvalidRequestError`, and the validation errors of
`SamplingParams`, harmony input and structured outputs. `EngineOverloadedError` (503, retry after 1 s),
`EngineDeadError` (503, retry after 5 s) and `RequestFailedError` (500) are the engine's own conditions.
"""

from __future__ import annotations

from typing import ClassVar


class EngineError(Exception):
    """Base of the errors a request can meet; subclasses set `http_status` and `code`."""

    http_status: ClassVar[int] = 500
    code: ClassVar[str | None] = "internal_error"
    retry_after_s: ClassVar[int | None] = None
    param: str | None = None

    @property
    def client_message(self) -> str:
        """What a client is told."""
        return str(self)


class RequestError(EngineError, ValueError):
    """Invalid input, answered 400 naming `param` when the subclass sets it."""

    http_status: ClassVar[int] = 400
    code: ClassVar[str | None] = None


class PromptTooLongError(RequestError):
    """The prompt cannot be served: longer than the model's context or than the whole KV cache."""

    code: ClassVar[str | None] = "context_length_exceeded"
    param = "messages"


class InvalidRequestError(RequestError):
    """A request the engine cannot run: empty prompt, token id outside the vocabulary, id in use..."""


class EngineOverloadedError(EngineError, RuntimeError):
    """Too many requests are waiting already; retry later."""

    http_status: ClassVar[int] = 503
    code: ClassVar[str | None] = "server_overloaded"
    retry_after_s: ClassVar[int | None] = 1

    @property
    def client_message(self) -> str:
        return str(self) or "The engine queue is full; retry later"


class RequestFailedError(EngineError, RuntimeError):
    """The engine could not complete this request (its model step raised); other requests are unaffected."""

    code: ClassVar[str | None] = "request_failed"

    @property
    def client_message(self) -> str:
        return f"The engine failed this request: {self}"


class EngineDeadError(EngineError, RuntimeError):
    """The engine loop has stopped (shut down or crashed); no request can be served."""

    http_status: ClassVar[int] = 503
    code: ClassVar[str | None] = "engine_unavailable"
    retry_after_s: ClassVar[int | None] = 5

    @property
    def client_message(self) -> str:
        return str(self) or "The engine is not running"
