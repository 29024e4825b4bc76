"""Token logprobs as JSON, for every API that returns them (and scripts/generate.py's output lines).

- `logprob_entries`: OpenAI's per-token entries `{token, logprob, bytes, top_logprobs: [{token, logprob,
  bytes}]}`, used by Chat Completions (`logprobs.content`) and Responses (`output_text` `logprobs`);
  `token_ids=True, with_bytes=False` gives generate.py's `{token, token_id, logprob, top_logprobs}`.
- `legacy_logprobs`: legacy Completions' parallel lists `{tokens, token_logprobs, top_logprobs, text_offset}`.

Token texts are the token's bytes decoded on their own (a byte-level token may hold part of a UTF-8
character: U+FFFD then, the `bytes` field keeps the exact value). Alternatives are ordered most likely first.
Only needs the harmony encoding's `token_bytes` (no FastAPI), so offline scripts can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from gptoss.engine.outputs import TokenLogprob


class TokenBytes(Protocol):
    def token_bytes(self, token_id: int) -> bytes: ...


def token_text(encoding: TokenBytes, token_id: int) -> str:
    return encoding.token_bytes(token_id).decode("utf-8", errors="replace")


def top_alternatives(logprob: TokenLogprob, top: int | None = None) -> list[tuple[int, float]]:
    """The `top` most likely (token id, logprob) pairs of a position (all of them when `top` is None)."""
    ranked = sorted(logprob.top_logprobs.items(), key=lambda kv: -kv[1])
    return ranked if top is None else ranked[:top]


def _entry(encoding: TokenBytes, token_id: int, logprob: float, token_ids: bool, with_bytes: bool) -> dict[str, Any]:
    data = encoding.token_bytes(token_id)
    entry: dict[str, Any] = {"token": data.decode("utf-8", errors="replace")}
    if token_ids:
        entry["token_id"] = token_id
    entry["logprob"] = logprob
    if with_bytes:
        entry["bytes"] = list(data)
    return entry


def logprob_entries(
    encoding: TokenBytes,
    logprobs: Iterable[TokenLogprob],
    top: int | None,
    *,
    token_ids: bool = False,
    with_bytes: bool = True,
) -> list[dict[str, Any]]:
    """One entry per sampled token with its `top` alternatives (None: every alternative reported)."""
    return [
        {
            **_entry(encoding, lp.token_id, lp.logprob, token_ids, with_bytes),
            "top_logprobs": [_entry(encoding, t, v, token_ids, with_bytes) for t, v in top_alternatives(lp, top)],
        }
        for lp in logprobs
    ]


def legacy_logprobs(
    encoding: TokenBytes, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob | None], top: int, offset: int = 0
) -> dict[str, Any]:
    """Legacy Completions logprobs of `token_ids` (a position without a logprob, e.g. the first prompt token,
    gets nulls); `top` 0 gives each position its own token only; `offset` is the first token's text offset."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, lp in zip(token_ids, logprobs, strict=False):
        text = token_text(encoding, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:
            token_logprobs.append(None)
            tops.append(None)
        else:
            token_logprobs.append(lp.logprob)
            best = top_alternatives(lp, top)
            tops.append({token_text(encoding, t): v for t, v in best} if top else {text: lp.logprob})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
