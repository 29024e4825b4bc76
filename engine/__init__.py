"""The engine's public surface: `LLM` (offline), `AsyncEngine` (servers), `EngineArgs`, `SamplingParams`,
`RequestOutput`.

    from gptoss.engine import LLM, SamplingParams

Subpackages by role: `model/` (config, checkpoint loading, the torch modules), `core/` (sequences, scheduler,
block manager: plain Python), `worker/` (model runner, sampler, CUDA graphs, KV cache), `harmony/` (prompt
format). The names below are imported on first use, so importing a submodule (the CLI's argument parser, the
config) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "LLM": "gptoss.engine.llm",
    "LLMEngine": "gptoss.engine.llm_engine",
    "AsyncEngine": "gptoss.engine.async_engine",
    "EngineArgs": "gptoss.engine.engine_args",
    "SamplingParams": "gptoss.engine.sampling_params",
    "RequestOutput": "gptoss.engine.outputs",
    "TokenLogprob": "gptoss.engine.outputs",
}

__all__ = ["LLM", "AsyncEngine", "EngineArgs", "LLMEngine", "RequestOutput", "SamplingParams", "TokenLogprob"]

if TYPE_CHECKING:
    from gptoss.engine.async_engine import AsyncEngine
    from gptoss.engine.engine_args import EngineArgs
    from gptoss.engine.llm import LLM
    from gptoss.engine.llm_engine import LLMEngine
    from gptoss.engine.outputs import RequestOutput, TokenLogprob
    from gptoss.engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gptoss.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
