"""Connections: what keeps slow or numerous clients from exhausting the server, below the HTTP routes.

uvicorn (0.54, h11) has no timeout for reading a request's headers, and its `limit_concurrency` answers 503
only once a whole request has arrived: 1,000 half-sent requests stayed open for good, and 21,000 of them
exhausted the descriptors (`/health` timed out; asyncio logged "Too many open files" per accept, 122 MB in a
minute). `GuardedH11Protocol` adds:
- a header-read timeout: a connection whose request headers are not complete `header_timeout_s` after it
  opened (or after its previous response) gets `408` and is closed;
- a cap on open connections: past `max_connections` a new one gets `503` with `Retry-After` and is closed at
  once, so descriptors stay below the process limit.
`RepeatFilter` makes repeated log records (a burst of the same warning or error) one line, then a count.
`uvicorn_config` puts these together with uvicorn's own limits (keep-alive timeout, header size).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from typing import Any

import h11
from gptoss.server.flags import DEFAULT_HEADER_TIMEOUT_S
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("server")

DEFAULT_MAX_CONNECTIONS = 2048
MAX_HEADER_BYTES = 64 << 10  # h11's limit on a request's header block
_SHED_BODY = b'{"error": {"message": "Too many open connections; retry later", "code": 503}}'
_SHED = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_SHED_BODY), _SHED_BODY)
)
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def default_max_connections() -> int:
    """`DEFAULT_MAX_CONNECTIONS`, or fewer when the process may open fewer descriptors (some are needed for
    files, the engine and the listening socket)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(16, min(DEFAULT_MAX_CONNECTIONS, soft - 128))


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header-read timeout and a cap on open connections (see the module
    docstring). `guarded_protocol` makes a subclass with the limits set."""

    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logger.warning("open connections past %d: shedding new ones with 503", self.max_connections)
            transport.write(_SHED)
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request on a kept-alive connection gets the same time for its headers.
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        logger.warning("closed a connection that sent no complete request headers in %g s", self.header_timeout_s)
        self.transport.write(_TIMED_OUT)
        self.transport.close()


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[GuardedH11Protocol]:
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": max_connections, "header_timeout_s": header_timeout_s},
    )


class RepeatFilter(logging.Filter):
    """Lets the first record of a (logger, message) through, drops repeats within `window_s` seconds, and
    notes how many were dropped on the next one let through: a burst is one line, not one per event."""

    def __init__(self, window_s: float = 10.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, dropped = self._last.get(key, (-float("inf"), 0))
            if now - last < self.window_s:
                self._last[key] = (last, dropped + 1)
                return False
            self._last[key] = (now, 0)
            if len(self._last) > 1024:  # distinct messages are few; forget old ones rather than grow
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.window_s}
        if dropped:
            record.msg = f"{record.msg} (and {dropped} more like it in the last {self.window_s:g} s)"
        return True


# Loggers whose records come in bursts under load or attack: asyncio's accept errors ("Too many open
# files"), uvicorn's per-connection warnings and errors, and this module's.
BURSTY_LOGGERS = ("asyncio", "uvicorn.error", "server")


def install_repeat_filter(window_s: float = 10.0) -> RepeatFilter:
    repeat_filter = RepeatFilter(window_s)
    for name in BURSTY_LOGGERS:
        logging.getLogger(name).addFilter(repeat_filter)
    return repeat_filter


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    *,
    max_connections: int | None = None,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    log_level: str = "info",
    **kwargs: Any,
) -> Any:
    """A `uvicorn.Config` with the guarded protocol, a 5 s keep-alive and a 64 KiB header limit."""
    import uvicorn

    protocol = guarded_protocol(max_connections or default_max_connections(), header_timeout_s)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        log_level=log_level,
        **kwargs,
    )
