"""Server-sent events framing shared by every streaming route."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_data(obj: Any) -> str:
    """One `data:` frame (Chat Completions, Workers AI)."""
    return f"data: {dumps(obj)}\n\n"


def sse_event(obj: dict[str, Any]) -> str:
    """One `event: <type>` + `data:` frame (Responses API events carry their type in both)."""
    return f"event: {obj['type']}\ndata: {dumps(obj)}\n\n"


def sse_response(
    frames: AsyncIterator[str], on_close: Callable[[], Awaitable[None]] | None = None
) -> StreamingResponse:
    """A text/event-stream response; `on_close` also runs after the stream (idempotent cleanup)."""
    return StreamingResponse(
        frames,
        media_type="text/event-stream",
        headers=SSE_HEADERS,
        background=BackgroundTask(on_close) if on_close is not None else None,
    )
