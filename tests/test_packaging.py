"""The installed distribution puts one top-level import package, `gptoss`, into site-packages.

The repository keeps `engine/`, `kernels/`, `server/`, `scripts/` and `benchmarks/` at its top; pyproject maps each
onto `gptoss.<folder>`. Generic names must not leak: Hugging Face's `kernels` package (which transformers probes
for gpt-oss's MXFP4 path) would collide with ours.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO_ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "gptoss-engine"


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_distribution_top_level_is_gptoss_only() -> None:
    dist = importlib.metadata.distribution(DISTRIBUTION)
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert top_level == ["gptoss"]
    assert dist.entry_points.select(group="console_scripts")["gptoss"].value == "gptoss.scripts.cli:main"


def test_every_package_folder_is_listed_under_gptoss() -> None:
    """A new subpackage that pyproject does not list would be missing from a non-editable install."""
    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    assert all(name.startswith("gptoss.") for name in listed)
    found = set()
    for package, folder in setuptools_cfg["package-dir"].items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO_ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed


def test_generic_names_do_not_resolve_to_ours(tmp_path: Path) -> None:
    """Outside the checkout (as a user's process is), `kernels`, `engine`, `server`... are not importable from
    us, while `gptoss.*` is."""
    code = (
        "import importlib.util, sys\n"
        "for name in ('engine', 'kernels', 'server', 'scripts', 'benchmarks'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        f"    assert spec is None or not str(spec.origin or '').startswith({str(REPO_ROOT)!r}), (name, spec)\n"
        "import gptoss.kernels.moe, gptoss.engine.model.config, gptoss.server.errors\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_engine_public_surface_is_lazy(tmp_path: Path) -> None:
    """`from gptoss.engine import LLM, ...` works, and importing a light submodule does not import torch."""
    code = (
        "import sys\n"
        "import gptoss.engine.model.config\n"
        "assert 'torch' not in sys.modules, 'the config pulled in torch'\n"
        "from gptoss.engine import LLM, AsyncEngine, EngineArgs, SamplingParams, RequestOutput\n"
        "print(LLM.__module__, AsyncEngine.__module__, EngineArgs.__module__, RequestOutput.__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "gptoss.engine.llm",
        "gptoss.engine.async_engine",
        "gptoss.engine.engine_args",
        "gptoss.engine.outputs",
    ]
