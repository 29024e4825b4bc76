"""The offline API, `LLM`: batch generation and scoring on top of `LLMEngine`.

llm = LLM("/path/to/checkpoint", max_num_seqs=64)              # any EngineArgs field as a keyword
outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0))
outs[0].text, outs[0].token_ids, outs[0].finish_reason        # "stop" | "length" | "abort" | "error"
scores = llm.score(["The capital of France is Paris."])       # prompt logprobs, nothing generated
sum(lp.logprob for lp in scores[0].prompt_logprobs[1:])       # log P(prompt), first token excluded
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import Any

from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.llm_engine import LLMEngine
from gptoss.engine.outputs import RequestOutput
from gptoss.engine.sampling_params import SamplingParams


class LLM:
    """Offline batch inference: `LLM(model_path, **engine_args).generate(prompts, sampling_params)`."""

    def __init__(self, model: str | Path, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineArgs(model=str(model), **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _token_ids(self, prompt: str | SequenceABC[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return list(prompt)

    def generate(
        self,
        prompts: str | SequenceABC[int] | SequenceABC[str] | SequenceABC[SequenceABC[int]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt (text, or token ids) to completion; outputs in the order of `prompts`.

        `sampling_params`: one for all prompts, or one per prompt (default: `SamplingParams()`). All requests
        are validated before any runs, so a bad one raises without side effects.
        """
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if not prompts:
            return []
        token_lists = [self._token_ids(p) for p in prompts]  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(token_lists)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(token_lists):
                raise ValueError(f"{len(token_lists)} prompts but {len(params_list)} sampling params")
        for ids, params in zip(token_lists, params_list, strict=True):
            self.engine.validate_request(ids, params)
        request_ids = [f"offline-{next(self._ids)}" for _ in token_lists]
        pending = deque(zip(request_ids, token_lists, params_list, strict=True))
        scheduler = self.engine.scheduler
        try:
            finished: dict[str, RequestOutput] = {}
            idle_steps = 0
            while pending or self.engine.has_unfinished_requests():
                # Feed the waiting queue as it drains: its bound (max_num_waiting) is for servers.
                while pending and len(scheduler.waiting) < self.engine.args.max_num_waiting:
                    self.engine.add_request(*pending.popleft())
                outputs = self.engine.step(finished_only=True)
                # An empty step happens once after a sequence preempts itself; many in a row is a bug.
                idle_steps = 0 if outputs or self.engine.scheduler.running else idle_steps + 1
                if idle_steps > 100:
                    raise RuntimeError("the engine makes no progress: no waiting request fits the KV cache")
                for out in outputs:
                    if out.finished:
                        finished[out.request_id] = out
        except BaseException:
            for request_id in request_ids:  # e.g. KeyboardInterrupt: leave no request holding blocks
                self.engine.abort_request(request_id)
            raise
        return [finished[request_id] for request_id in request_ids]

    def score(
        self, prompts: str | SequenceABC[str] | SequenceABC[SequenceABC[int]], num_top_logprobs: int = 0
    ) -> list[RequestOutput]:
        """Log-probability of every prompt token given the ones before it; nothing is generated.

        `out.prompt_logprobs[i]` is a `TokenLogprob` for prompt token i (None for i = 0), with the
        `num_top_logprobs` most likely tokens at that position in `top_logprobs`.
        """
        params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=num_top_logprobs)
        return self.generate(prompts, params)
