"""Per-request sampling parameters: one `SamplingParams` per request, validated when it is made.

`SamplingParams(...)` (via `__post_init__` -> `validate()`) checks what the *engine* can run. It is looser
than the public API so offline users can do more: `top_k` -1 or 0 means "disabled" and any larger value is
allowed, `temperature` may exceed 5, `seed` may be any non-negative int, `max_tokens` may be 0 when
`prompt_logprobs` is requested (echo / scoring without generating). The public API's ranges
(the Workers AI API reference) are the server's request models' (server/protocol_openai.py).

It raises `SamplingParamsError` (a `ValueError`) whose `param` attribute names the offending field, so a
server can answer a 400 that names it. Fields set after construction are not re-checked: call `validate()`.

Semantics (what the sampler does with each field, engine/worker/sampler.py):
- `temperature` < 1e-5 (in particular 0) means greedy: argmax, ties broken by the lowest token id.
- Order of logit processing: allowed-token mask, repetition penalty, frequency/presence penalties,
  temperature, top_k, top_p, min_p, then sampling.
- `repetition_penalty` (vLLM / CTRL semantics): for every token seen in the prompt or the output so far,
  positive logits are divided by it and negative ones multiplied. 1 disables it. 0 (allowed by the API) is
  treated as its limit, a tiny positive value.
- `frequency_penalty` / `presence_penalty` (OpenAI semantics, output tokens only):
  `logit -= frequency_penalty * count(token in output) + presence_penalty * (count > 0)`.
- `seed`: with a seed, a request's tokens depend only on (seed, its logits, how many tokens it has generated),
  never on what else is in the batch. None: the engine's global random generator.
- `stop_token_ids` / `ignore_eos`: checked by the engine's output processing (`is_stop_token`), not the
  sampler.
- `stop` strings: matched on the detokenized text by engine/detokenizer.py. At most `MAX_STOP_STRINGS` (16;
  OpenAI allows 4) of at most `MAX_STOP_STRING_CHARS` (256) characters each, and at most `MAX_STOP_TOKEN_IDS`
  (256) `stop_token_ids`: checking them runs on the engine thread after every token of the request, so their
  size bounds that work (unbounded, 500k stop strings slowed every client 7x).
- `logprobs`: None = only the sampled token's logprob (cheap, always computed); k = also the k most likely
  tokens. Logprobs are those of the model's raw distribution (log_softmax of the logits before any
  processing), as OpenAI reports them.
- `prompt_logprobs`: None = none; k = each prompt token's logprob plus the top k at every position.
- `structured_output`: a `StructuredOutputSpec` (engine/structured_output/spec.py: JSON mode, JSON Schema,
  strict tools, a required tool call) constrains every sampled token to its grammar over the harmony reply;
  the engine compiles it when the request is added (an invalid schema raises `StructuredOutputError` then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gptoss.engine.errors import RequestError
from gptoss.engine.structured_output.spec import StructuredOutputSpec

# Temperatures below this are treated as greedy (dividing by them would overflow the logits' range).
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


class SamplingParamsError(RequestError):
    """An out-of-range or ill-typed sampling parameter; `param` names the field (for a 400 naming it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    def __reduce__(self) -> tuple:
        # Picklable (it crosses to the server from a data-parallel replica's process).
        return (type(self), (self.param, self.message))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """How to sample one request's tokens and when to stop; see the module docstring for semantics."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_output: StructuredOutputSpec | None = None

    def __post_init__(self) -> None:
        # Accept a single stop string / tuples as the OpenAI API does; store lists.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    # ----------------------------------------------------------------------------------------------------
    # Validation
    # ----------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Engine-level checks (what the sampler can run). Raises `SamplingParamsError`."""
        if not _is_int(self.max_tokens):
            raise SamplingParamsError("max_tokens", f"must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1 and not (self.max_tokens == 0 and self.prompt_logprobs is not None):
            raise SamplingParamsError(
                "max_tokens", f"must be >= 1 (0 only with prompt_logprobs), got {self.max_tokens}"
            )
        self._check_number("temperature", low=0.0)
        self._check_number("top_p", low=0.0, high=1.0, low_open=True)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise SamplingParamsError("top_k", f"must be an integer >= -1 (-1 or 0: disabled), got {self.top_k!r}")
        self._check_number("min_p", low=0.0, high=1.0)
        self._check_number("repetition_penalty", low=0.0)
        self._check_number("frequency_penalty", low=-2.0, high=2.0)
        self._check_number("presence_penalty", low=-2.0, high=2.0)
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise SamplingParamsError("seed", f"must be a non-negative integer or None, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingParamsError("stop", "must be a string or a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        longest = max(self.stop, key=len, default="")
        if len(longest) > MAX_STOP_STRING_CHARS:
            raise SamplingParamsError(
                "stop", f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters, got {len(longest)}"
            )
        if not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise SamplingParamsError("stop_token_ids", "must be a list of non-negative integers")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError(
                "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids, got {len(self.stop_token_ids)}"
            )
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"must be a boolean, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise SamplingParamsError(name, f"must be None or an integer in 0..{MAX_LOGPROBS}, got {value!r}")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputSpec):
            raise SamplingParamsError("structured_output", "must be a StructuredOutputSpec or None")

    def _check_number(self, name: str, low: float, high: float | None = None, low_open: bool = False) -> None:
        value = getattr(self, name)
        if not _is_number(value):
            raise SamplingParamsError(name, f"must be a finite number, got {value!r}")
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            low_bracket = "(" if low_open else "["
            high_text = f"{high}]" if high is not None else "inf)"
            raise SamplingParamsError(name, f"must be in {low_bracket}{low}, {high_text}, got {value}")

    # ----------------------------------------------------------------------------------------------------
    # What the sampler / engine need to know
    # ----------------------------------------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def is_stop_token(self, token_id: int, eos_token_ids: tuple[int, ...] | frozenset[int] = ()) -> bool:
        """Whether sampling `token_id` ends the request: in `stop_token_ids`, or EOS unless `ignore_eos`."""
        return token_id in self.stop_token_ids or (not self.ignore_eos and token_id in eos_token_ids)
