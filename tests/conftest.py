"""Shared fixtures: where `shared/` is, and one tiny random checkpoint made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The tiny test models are far too small for intra-op threads to pay: on a 2-core machine two torch threads
# per process made steps ~10x slower. Child processes (servers, killed `generate` runs) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without a GPU the Triton kernels run in the interpreter. Triton reads the variable when a kernel is
# decorated, so it is set here, before any test module imports a kernel.
try:
    import torch

    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # torch missing: the tests that need it fail on their own imports
    pass


def find_shared_dir() -> Path | None:
    """`shared/` beside the checkout (or $GPTOSS_SHARED_DIR); None on a user's fresh clone."""
    candidates = [os.environ.get("GPTOSS_SHARED_DIR"), str(REPO_ROOT.parent / "shared")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "vocab").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = find_shared_dir()
    if path is None:
        pytest.skip("shared/ (real tokenizer, tiktoken vocab) is not beside this checkout")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random gpt-oss checkpoint in the real HF layout (MXFP4 experts), made once."""
    from gptoss.engine.model.config import preset
    from gptoss.engine.model.random_checkpoint import make_random_checkpoint

    out_dir = tmp_path_factory.mktemp("tiny-checkpoint")
    # Small shards, so the index and multi-shard streaming paths run in every test session.
    make_random_checkpoint(out_dir, preset("tiny"), seed=1234, max_shard_bytes=300_000)
    return out_dir
