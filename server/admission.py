"""Admission: generation requests in flight are counted, and refused past `max_queue` with 429 + Retry-After.

Every path counts per request: a Workers AI batch of 256 is 256, queued (`?queueRequest=true`) or not, and a
queued batch holds its admission until it has run. Streaming routes admit before answering (so a full server
is a 429, not an error inside a 200 stream) and release when the stream ends.
"""

from __future__ import annotations

import contextlib
from typing import Any

from gptoss.server.errors import bad_request, overloaded
from gptoss.server.state import ServerState


class Admission:
    """One generation request counted in flight; `admit` refuses past `max_queue` (429 + Retry-After).

    Streaming routes admit before answering (so a full server is a 429, not an error inside a 200 stream) and
    release when the stream ends; `release` is idempotent so it can run from both the stream's `finally` and
    the response's background task (which also covers a stream that never started).
    """

    def __init__(self, state: ServerState, count: int = 1, param: str = "requests") -> None:
        if count > state.max_queue:
            raise bad_request(
                f"{count} requests at once exceed this server's queue of {state.max_queue}; send fewer", param=param
            )
        if state.metrics.in_flight + count > state.max_queue:
            raise overloaded(
                f"Too many requests in flight ({state.metrics.in_flight} of {state.max_queue}) to take {count} more; "
                "retry later"
            )
        self._state = state
        self._count = count
        self._held = True
        self._kept = False
        state.metrics.in_flight += count

    def keep(self) -> None:
        """Leave the `with` block without releasing: a stream now owns this admission."""
        self._kept = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._state.metrics.in_flight -= self._count

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
