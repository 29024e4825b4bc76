"""Structured outputs for the server: JSON mode, JSON Schema and tool_choice enforced while sampling.

The grammar is the engine's (engine/structured_output.py: llguidance over the whole harmony reply, so the
analysis channel stays free and only the final message / tool-call arguments are constrained). The server
builds the request's `StructuredOutputSpec` from its API fields, compiles a per-request matcher, and hands
the engine a `logits_mask_fn(output_token_ids) -> bool [vocab]` (`AsyncEngine.add_request(...,
logits_mask_fn=...)`), called on the engine thread before each sampled token.

When the engine or llguidance cannot do this (`StructuredOutputs.create` returns None), routes fall back to
the prompt alone for response formats and to prefilling the call header for a forced tool call.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("server")


class StructuredOutputs:
    """Builds `logits_mask_fn`s for one tokenizer / vocabulary (the compiler is made on first use)."""

    # A grammar that does not compile in this time is refused (400 naming its field); llguidance's limits
    # (engine/structured_output.py) end the compile itself soon after.
    COMPILE_TIMEOUT_S = 5.0

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.compile_timeout_s = self.COMPILE_TIMEOUT_S
        self._compiler: Any = None
        self._lock = threading.Lock()
        # Compiles run here (llguidance releases the GIL): two at a time, so slow ones cannot pile up threads.
        self._compile_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="grammar-compile")

    @classmethod
    def create(cls, engine: Any, tokenizer: Any) -> StructuredOutputs | None:
        """None when the engine takes no `logits_mask_fn` or llguidance is not installed."""
        try:
            if "logits_mask_fn" not in inspect.signature(engine.add_request).parameters:
                return None
            import gptoss.engine.structured_output  # noqa: F401  (llguidance may be missing)
        except (ImportError, TypeError, ValueError):
            logger.warning("structured outputs unavailable: response formats are prompt-only")
            return None
        inner = getattr(engine, "engine", engine)
        vocab_size = getattr(inner, "vocab_size", None) or tokenizer.get_vocab_size(with_added_tokens=True)
        return cls(tokenizer, int(vocab_size))

    def warm_up(self) -> None:
        """Build the compiler on a background thread (about 2 s for the real vocabulary), so the first
        constrained request does not stall the event loop."""
        threading.Thread(target=lambda: self.compiler, name="structured-output-warmup", daemon=True).start()

    @property
    def compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                from gptoss.engine.structured_output import StructuredOutputCompiler

                self._compiler = StructuredOutputCompiler(self.tokenizer, self.vocab_size)
            return self._compiler

    @staticmethod
    def spec(
        response_format: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None,
        tool_choice: Any,
        *,
        response_format_param: str = "response_format",
    ) -> Any:
        """The request's spec, or None when nothing is constrained (raises StructuredOutputError -> 400)."""
        from gptoss.engine.structured_output import StructuredOutputSpec

        return StructuredOutputSpec.from_request(
            response_format=response_format,
            tools=tools,
            tool_choice=tool_choice,
            response_format_param=response_format_param,
        )

    def mask_fn(self, spec: Any) -> Callable[[list[int]], Any]:
        """A fresh matcher for one request; it is the engine's `logits_mask_fn` itself (`state(output_token_ids)
        -> bool [vocab]`, engine thread only), which the model runner batches with the step's other grammar rows.
        Raises StructuredOutputError (-> 400) for an invalid / unsupported schema, or one that takes longer than
        `compile_timeout_s` to compile. Blocks: call it off the event loop."""
        from gptoss.engine.structured_output import StructuredOutputError

        future = self._compile_pool.submit(lambda: self.compiler.new_state(spec))
        try:
            return future.result(timeout=self.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            param = spec.final_param if spec.final_schema is not None or not spec.tools else spec.tools[0].param
            raise StructuredOutputError(
                param, f"the schema is too complex: its grammar did not compile within {self.compile_timeout_s:g} s"
            ) from None
