"""What the engine hands back: `RequestOutput` per request (or per step of it), `TokenLogprob` per token."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """The log-probability of one chosen token, and the top alternatives at that position."""

    token_id: int
    logprob: float
    rank: int | None = None
    top_logprobs: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """A request's result (`LLM.generate`), or one step's update of it (`AsyncEngine.add_request`).

    Cumulative fields: `prompt_token_ids`, `token_ids` (all output tokens so far), `text` (all output text
    so far), `logprobs` (per output token so far, when asked), `num_output_tokens`.
    Delta fields (streaming): `new_token_ids`, `text_delta`, `new_logprobs`: what this update adds.
    `finish_reason` is None until finished, then "stop" (EOS / stop token / stop string), "length"
    (max_tokens or the context), "abort", or "error" (then `error` says why). `stop_reason` is the stop
    token id or stop string that matched, if any. `num_cached_tokens`: prompt tokens served from the prefix
    cache. `prompt_logprobs`: per prompt token (None for the first), when asked (`LLM.score`).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    new_token_ids: list[int] = field(default_factory=list)
    text_delta: str = ""
    new_logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)
