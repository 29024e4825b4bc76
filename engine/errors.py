"""The engine's exceptions, each with the HTTP status the server answers it with.

`PromptTooLongError`, `InvalidRequestError` (400), `EngineOverloadedError` (429/503), `EngineDeadError` (503),
`RequestFailedError` (a request failed inside the engine: 500).
"""

from __future__ import annotations


class PromptTooLongError(ValueError):
    """The prompt cannot be served: longer than the model's context or than the whole KV cache (HTTP 400)."""


class InvalidRequestError(ValueError):
    """A request the engine cannot run: empty prompt, token id outside the vocabulary, id in use... (HTTP 400)."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting already (HTTP 429/503); retry later."""


class RequestFailedError(RuntimeError):
    """The engine could not complete this request (its model step raised); other requests are unaffected."""


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down or crashed); no request can be served."""
