"""Pydantic request models of the Workers AI run route's own formats (prompt, batch, queue polling).

The `messages` and `input` formats reuse `ChatCompletionRequest` / `ResponsesRequest` (server/protocol_openai.py);
which format a body is in is decided by its keys (`workers_ai.body_format`). Ranges as in the Workers AI reference
(`RANGES`).
"""

from __future__ import annotations

from typing import Any

from gptoss.server.protocol_openai import APIModel, ChatResponseFormat, ReasoningConfig, SamplingFields
from pydantic import Field

MAX_BATCH_REQUESTS = 256
# The run route's ranges (the Workers AI reference's table), applied with `protocol_openai.check_ranges` on top of the
# request models' own bounds (the union of these and OpenAI's).
RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 5.0),
    "top_p": (0.001, 1.0),
    "top_k": (1, 50),
    "seed": (1, 9_999_999_999),
    "repetition_penalty": (0.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
}


class PromptRequest(SamplingFields):
    """`{"prompt": ...}`: one user turn through the chat template, or the raw text with `raw: true`."""

    model: str | None = None
    prompt: str = Field(min_length=1)
    raw: bool = False
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    lora: str | None = None
    response_format: ChatResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    reasoning: ReasoningConfig | None = None


class BatchRequest(APIModel):
    """`{"requests": [...]}`: each item is a body in any of the three formats (validated one by one)."""

    requests: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)


class PollRequest(APIModel):
    """`{"request_id": ...}`: the state (or the result) of a queued batch."""

    request_id: str = Field(min_length=1)
