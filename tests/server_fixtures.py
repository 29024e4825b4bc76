"""Server fixtures (load with `pytest_plugins = ["tests.server_fixtures"]`): live servers made once per process.

- `live_server`: the real engine on the tiny random checkpoint (noise output: plumbing checks).
- `scripted_server` / `scripted`: a `ScriptedEngine` replaying `engine.script` (hand-made harmony tokens);
  `scripted` resets the script, delay and failure switches for each test.
- `auth_server`: a scripted server requiring `Authorization: Bearer test-key`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server_helpers import API_KEY, LiveServer, live_server_for, scripted_server_for, stop_server


@pytest.fixture(scope="session")
def live_server(tiny_checkpoint: Path) -> Iterator[LiveServer]:
    server = live_server_for(tiny_checkpoint)
    yield server
    stop_server("live")  # stops uvicorn and shuts the engine's loop thread down


@pytest.fixture(scope="session")
def scripted_server() -> LiveServer:
    return scripted_server_for()


@pytest.fixture
def scripted(scripted_server: LiveServer) -> LiveServer:
    """The scripted server with a fresh script / delay / overload state for one test."""
    engine = scripted_server.engine
    engine.script, engine.delay, engine.overloaded, engine.alive, engine.fail_after = [], 0.0, False, True, None
    engine.requests.clear()
    engine.grammars.clear()
    engine.mask_violations.clear()
    return scripted_server


@pytest.fixture(scope="session")
def auth_server() -> LiveServer:
    """A scripted server that requires `Authorization: Bearer test-key`."""
    return scripted_server_for("auth", api_key=API_KEY)
