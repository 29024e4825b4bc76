"""Admission: generation requests in flight are counted, and refused past `max_queue` with 429 + Retry-After.

Streaming routes admit before answering (so a full server is a 429, not an error inside a 200 stream) and
release when the stream ends.
"""

from __future__ import annotations

import contextlib
from typing import Any

from gptoss.server.errors import overloaded
from gptoss.server.state import ServerState


class Admission:
    """One generation request counted in flight; `admit` refuses past `max_queue` (429 + Retry-After).

    Streaming routes admit before answering (so a full server is a 429, not an error inside a 200 stream) and
    release when the stream ends; `release` is idempotent so it can run from both the stream's `finally` and
    the response's background task (which also covers a stream that never started).
    """

    def __init__(self, state: ServerState) -> None:
        if state.metrics.in_flight >= state.max_queue:
            raise overloaded(f"Too many requests in flight ({state.metrics.in_flight}); retry later")
        self._state = state
        self._held = True
        self._kept = False
        state.metrics.in_flight += 1

    def keep(self) -> None:
        """Leave the `with` block without releasing: a stream now owns this admission."""
        self._kept = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._state.metrics.in_flight -= 1

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._kept or exc_type is not None:
            self.release()


async def release_all(admission: Admission, streams: list[Any]) -> None:
    """Cleanup after a streamed response: free the admission, abort whatever is still running."""
    admission.release()
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.aclose()
