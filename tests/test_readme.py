"""The README's Python examples, run as written against a live server on the tiny random checkpoint (only the
address, the key and checkpoint paths are substituted). The one that cannot run here is skipped: it serves
with uvicorn until stopped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["tests.server_fixtures"]

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_python_examples_run(live_server, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("openai")
    blocks = python_blocks()
    assert len(blocks) >= 4
    namespace: dict = {"KEY": "any-key"}
    ran = 0
    for block in blocks:
        if "uvicorn" in block:
            continue  # serves forever: the app it builds is what the live server runs
        code = block.replace("http://127.0.0.1:8000", live_server.base_url)
        code = re.sub(r'"/path/to/[\w.-]+"', repr(str(tiny_checkpoint)), code)
        exec(compile(code, f"README.md block {ran}", "exec"), namespace)
        ran += 1
    assert ran >= 4
    assert "function_call" in {item.type for item in namespace["first"].output}
    capsys.readouterr()
