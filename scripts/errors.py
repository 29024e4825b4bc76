"""How the command line reports mistakes: one line naming the problem and what to do, no traceback.

Exit status 2 for usage (a flag, a path or a file named on the command line is wrong: `UsageError`), 1 for
runtime errors (what was named exists but cannot be used: a corrupt config or shard, a failed run). `gptoss
--debug ...` shows the traceback instead.
"""

from __future__ import annotations

import sys

USAGE = 2
RUNTIME = 1


class CliError(Exception):
    """A mistake the user can fix. `str()` is the whole one-line message (problem; what to do)."""

    exit_code = RUNTIME


class UsageError(CliError):
    """The command line itself is wrong (bad flag value, missing file or folder named on it)."""

    exit_code = USAGE


def describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) for an exception that ended a command."""
    from gptoss.engine.model.config import ConfigError

    if isinstance(exc, CliError):
        return str(exc), exc.exit_code
    if isinstance(exc, ConfigError):
        return f"bad model config: {exc}", RUNTIME
    loader_error = _checkpoint_error_type()
    if loader_error is not None and isinstance(exc, loader_error):
        return f"bad checkpoint: {_one_line(str(exc))}", RUNTIME
    if isinstance(exc, MemoryError):
        return "out of memory; try a smaller --max-num-seqs, --kv-cache-gb or --max-model-len", RUNTIME
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}", RUNTIME
    return f"{type(exc).__name__}: {_one_line(str(exc))} (run with --debug for the traceback)", RUNTIME


def _checkpoint_error_type() -> type[BaseException] | None:
    # The loader imports torch: only look at it when it was imported anyway (then the error may come from it).
    module = sys.modules.get("gptoss.engine.model.loader")
    return getattr(module, "CheckpointError", None) if module is not None else None


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
