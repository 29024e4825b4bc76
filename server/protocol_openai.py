"""Pydantic request models of the OpenAI-shaped routes: Chat Completions, Responses, legacy Completions, tokenize.

Validation lives here: types, required fields and OpenAI's own ranges (OpenAI's API reference: temperature 0..2,
top_p in (0, 1], seed any 64-bit integer, frequency/presence penalty -2..2, top_logprobs 0..20, max_tokens
>= 1; the extensions as vLLM has them: top_k -1 or 0 = off else >= 1, min_p 0..1, repetition_penalty >= 0).
The fields allow the union of both APIs' ranges; each route narrows them with `check_ranges` (OpenAI routes:
`OPENAI_RANGES`, the Workers AI run route: `protocol_workers_ai.RANGES`). Cross-field
validators raise `APIError` directly (pydantic passes it through) so that
their errors name the field too. Bodies are validated from JSON in strict mode (`parse_body`), so `"stream": "yes"` or
`"max_tokens": "10"` is a 400 naming the field rather than a silent coercion. Unknown fields are ignored, as
OpenAI clients send many (`user`, `metadata`, `store`, ...). Message and tool contents are left as plain dicts:
engine/harmony's converters check them and name the offending field (`messages[2].role`).
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from gptoss.engine.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from gptoss.server.errors import bad_request, from_validation_error
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 16

M = TypeVar("M", bound=BaseModel)


class APIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


def parse_body(model: type[M], body: bytes | str | dict[str, Any]) -> M:
    """Validate a request body (raw JSON or an already-decoded object); errors become 400s naming the field."""
    try:
        if isinstance(body, dict):
            # Strict validation of Python dicts would demand model instances for nested models; go via JSON.
            return model.model_validate_json(json.dumps(body))
        if not body or not str(body if isinstance(body, str) else body.decode("utf-8", "replace")).strip():
            raise bad_request("Request body is empty; expected a JSON object", code="invalid_json")
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


# What OpenAI routes allow beyond the fields' bounds (which are the union of both APIs' ranges).
OPENAI_RANGES: dict[str, tuple[float, float]] = {"temperature": (0.0, 2.0)}


def check_ranges(req: SamplingFields, ranges: dict[str, tuple[float, float]]) -> Any:
    """`req` when each named field is unset or in its [low, high], else a 400 naming the first that is not."""
    for name, (low, high) in ranges.items():
        value = getattr(req, name)
        if value is not None and not low <= value <= high:
            raise bad_request(f"{name} must be in {low:g}..{high:g} on this route, got {value}", param=name)
    return req


class SamplingFields(APIModel):
    """Sampling parameters shared by every generating route (defaults None: each route applies its own), in
    the union of OpenAI's and Workers AI's ranges (each route narrows them with `check_ranges`)."""

    temperature: float | None = Field(None, ge=0.0, le=5.0)  # 0..2 on OpenAI routes (OPENAI_RANGES)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    repetition_penalty: float | None = Field(None, ge=0.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    # Not applied by the sampler: refused when it would change anything, never silently ignored.
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _check_stop(self) -> SamplingFields:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if any(not s for s in stops):
            raise bad_request("stop strings must be non-empty", param="stop")
        # The engine's bounds (engine/sampling_params.py) for every route: harmony routes match stop strings
        # on the final text here in the server, raw ones in the engine; both after every token.
        if len(stops) > MAX_STOP_STRINGS:
            raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise bad_request(f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters", param="stop")
        if self.logit_bias and any(self.logit_bias.values()):
            raise bad_request("logit_bias is not supported by this server", param="logit_bias")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class StreamOptions(APIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaSpec(APIModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ChatResponseFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _need_schema(self) -> ChatResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise bad_request(
                "response_format.json_schema.schema is required when type is json_schema",
                param="response_format.json_schema.schema",
            )
        return self


class ReasoningConfig(APIModel):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions (and Workers AI `messages` bodies)."""

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None  # the deprecated spelling of tools
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    reasoning: ReasoningConfig | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=MAX_N)
    response_format: ChatResponseFormat | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    lora: str | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs")
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("auto", "none", "required"):
            raise bad_request(
                "tool_choice must be auto, none, required or {type: function, function: {name}}", param="tool_choice"
            )
        return self

    @property
    def effort(self) -> str | None:
        if self.reasoning_effort is not None:
            return self.reasoning_effort
        return self.reasoning.effort if self.reasoning is not None else None


class TextFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _need_schema(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise bad_request("text.format.schema is required when type is json_schema", param="text.format.schema")
        return self


class TextConfig(APIModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(SamplingFields):
    """POST /v1/responses (and Workers AI `input` bodies)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    reasoning: ReasoningConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)  # Workers AI's spelling
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    metadata: dict[str, Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    lora: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if not self.input and not (isinstance(self.input, list) and self.previous_response_id is not None):
            raise bad_request("input must not be empty", param="input")
        if isinstance(self.tool_choice, str) and self.tool_choice not in ("auto", "none", "required"):
            raise bad_request("tool_choice must be auto, none, required or {type: function, name}", param="tool_choice")
        return self


class CompletionRequest(SamplingFields):
    """POST /v1/completions: raw text (no harmony template), prompt as text, token ids or lists of either."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)
    user: str | None = None
    # vLLM's extension: generate exactly max_tokens (benchmarks need fixed output lengths).
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens may be 0 only with echo: true", param="max_tokens")
        if isinstance(self.prompt, list) and not self.prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        return self


class TokenizeRequest(APIModel):
    """POST /tokenize (vLLM-compatible): either `prompt` (raw text) or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("exactly one of prompt or messages is required", param="prompt")
        return self


class DetokenizeRequest(APIModel):
    model: str | None = None
    tokens: list[int]
