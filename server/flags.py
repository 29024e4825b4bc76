"""`gptoss serve`'s server flags and the checks made before the model loads (no FastAPI import here, so the
command line's `--help` stays fast)."""

from __future__ import annotations

import argparse
import os
import socket

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DEFAULT_HEADER_TIMEOUT_S = 10.0  # server/connections.py


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The server's flags (the engine's are added by scripts/engine_flags.py)."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for every interface")
    group.add_argument("--port", type=int, default=8000, help="TCP port (checked free before the model loads)")
    group.add_argument(
        "--api-key",
        default=os.environ.get("GPTOSS_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $GPTOSS_API_KEY; none: no auth)",
    )
    group.add_argument(
        "--served-model-name",
        default="gpt-oss-120b",
        help="model name of the API (@cf/openai/gpt-oss-120b is accepted too)",
    )
    group.add_argument(
        "--max-queue",
        type=int,
        default=1024,
        help="generation requests in flight before new ones get 429 (Retry-After)",
    )
    group.add_argument(
        "--response-store-size",
        type=int,
        default=1024,
        help="Responses kept for previous_response_id (oldest forgotten)",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open connections before new ones get 503 (default 2048, fewer under a low descriptor limit)",
    )
    group.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="seconds a connection may take to send its request headers before it is closed (408)",
    )
    group.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's and the server's logs")
    return parser


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (None: it can), found by binding it for a moment."""
    if not 0 < port < 65536:
        return f"port {port} is outside 1..65535"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r} ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As uvicorn does: a port in TIME_WAIT from an earlier run is reusable, one in use is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    return None
