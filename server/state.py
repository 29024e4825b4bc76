"""`ServerState`: what every route needs (engine, tokenizer, harmony encoding, names, limits, metrics, stores).

One instance per app (`app.state.server`), built by `server.app.create_app`. Routes receive it through
`get_state(request)`; nothing here is global, so tests can run several apps side by side.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fastapi import Request
from gptoss.engine.harmony.render import HarmonyEncoding
from gptoss.server.engine_client import EngineClient
from gptoss.server.errors import model_not_found, too_large
from gptoss.server.metrics import ServerMetrics
from gptoss.server.tokenizer_pool import PooledHarmonyEncoding
from tokenizers import Tokenizer

WORKERS_AI_MODEL_NAME = "@cf/openai/gpt-oss-120b"

K = TypeVar("K")
V = TypeVar("V")


class BoundedStore(Generic[K, V]):
    """An insertion-ordered dict that forgets its oldest entries past `capacity` or after `ttl_s` seconds."""

    def __init__(self, capacity: int, ttl_s: float | None = None) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def put(self, key: K, value: V) -> None:
        self._items.pop(key, None)
        self._items[key] = (time.monotonic(), value)
        self._expire()

    def get(self, key: K) -> V | None:
        self._expire()
        entry = self._items.get(key)
        return entry[1] if entry is not None else None

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def _expire(self) -> None:
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        if self.ttl_s is not None:
            cutoff = time.monotonic() - self.ttl_s
            while self._items and next(iter(self._items.values()))[0] < cutoff:
                self._items.popitem(last=False)


@dataclass
class ServerState:
    """Shared by all routes of one app. `max_queue`: generation requests in flight before answering 429."""

    engine: EngineClient
    tokenizer: Tokenizer
    served_model_name: str = "gpt-oss-120b"
    api_key: str | None = None
    max_model_len: int = 131072
    max_queue: int = 1024
    max_body_bytes: int = 32 << 20
    response_store_size: int = 1024
    batch_store_size: int = 1024
    batch_ttl_s: float = 3600.0
    # Text in one request's prompt fields (checked before tokenizing it; None: 8 characters per context token,
    # more than any real text needs per token).
    max_prompt_chars: int | None = None
    prepare_workers: int = 4  # threads that parse, render, tokenize and compile grammars off the event loop
    grammar_timeout_s: float = 5.0  # a grammar that does not compile in this time is a 400
    encoding: HarmonyEncoding = field(init=False)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    responses: BoundedStore[str, Any] = field(init=False)
    batches: BoundedStore[str, Any] = field(init=False)
    prepare_pool: ThreadPoolExecutor = field(init=False)
    grammar_pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.encoding = PooledHarmonyEncoding(self.tokenizer)  # large texts tokenized in worker processes
        self.encoding.token_bytes(0)  # builds the id -> bytes table now (0.3 s for o200k), not in a first answer
        if self.max_prompt_chars is None:
            self.max_prompt_chars = 8 * self.max_model_len
        self.prepare_pool = ThreadPoolExecutor(self.prepare_workers, thread_name_prefix="prepare")
        # Grammar compiles (llguidance releases the GIL): two at a time, so slow ones cannot pile up threads.
        self.grammar_pool = ThreadPoolExecutor(2, thread_name_prefix="grammar-compile")
        self.responses = BoundedStore(self.response_store_size)
        self.batches = BoundedStore(self.batch_store_size, self.batch_ttl_s)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.served_model_name, WORKERS_AI_MODEL_NAME)

    def check_model(self, model: str | None) -> str:
        """The model name to answer with (the request's, or the served name when absent); unknown: 404."""
        if model is None:
            return self.served_model_name
        if model in self.model_names:
            return model
        raise model_not_found(model)


def get_state(request: Request) -> ServerState:
    return request.app.state.server


async def read_body(request: Request) -> bytes:
    """The request body, refused past `max_body_bytes` even without a Content-Length (chunked uploads)."""
    limit = get_state(request).max_body_bytes
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"Request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
