"""The synchronous engine core, `LLMEngine`: what both `LLM` (offline) and `AsyncEngine` (server) drive.

`LLMEngine` is what both `LLM` and `AsyncEngine` drive, from one thread only:
  - `add_request(request_id, prompt_token_ids, sampling_params) -> Sequence`; raises `PromptTooLongError`,
    `EngineOverloadedError`, `InvalidRequestError` / `SamplingParamsError` (all `ValueError` but the overload),
    nothing queued then. `validate_request` runs the same checks without queueing (safe from any thread).
  - `step() -> list[RequestOutput]`: one scheduler plan, one model step; one output per request that got a
    token or finished in it (deltas plus cumulative fields). If the model step raises, the requests in that
    step finish with finish_reason "error" (message in `error`) and the engine stays usable.
    `step(finished_only=True)`: only the outputs of the requests that finished (`LLM.generate` reads nothing
    else), each as `step()` would have returned it.
  - `abort_request(request_id) -> RequestOutput | None`: finishes it ("abort") and frees its blocks at once.
  - structured output: a request whose `SamplingParams.structured_output` holds a spec gets a grammar state
    (compiled here, by `grammar_compiler`; an invalid schema raises `StructuredOutputError` from
    `validate_request` / `add_request`), and every token it samples is constrained to the grammar.
    `add_request(..., logits_mask_fn=f)` is a further, arbitrary constraint: `f(output_token_ids)` -> bool
    mask [vocab] (or None), ANDed with the grammar's.
  - `has_unfinished_requests()`, `metrics_snapshot()`, `unhealthy_reason()` (set while every recent step
    failed: a broken model, as opposed to a bad request), `shutdown()` (stops tensor-parallel workers).
With `tensor_parallel_size > 1` this process is rank 0: it schedules and samples, and the other ranks
(spawned here, or started by torchrun) execute each step's plan (engine/worker/tp_worker.py).
Each request has exactly one sequence (n > 1 is served by adding n requests; prefix caching shares the prompt).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptoss.engine.core.block_manager import BlockManager
from gptoss.engine.core.scheduler import Scheduler, SchedulerOutput
from gptoss.engine.core.sequence import Sequence
from gptoss.engine.detokenizer import IncrementalDetokenizer
from gptoss.engine.distributed.parallel_state import SINGLE
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.errors import EngineDeadError, InvalidRequestError
from gptoss.engine.metrics import EngineMetrics, MetricsSnapshot
from gptoss.engine.model.config import ModelConfig
from gptoss.engine.outputs import RequestOutput, TokenLogprob
from gptoss.engine.sampling_params import SamplingParams
from gptoss.engine.tokenizer import load_tokenizer
from gptoss.engine.worker.memory import block_groups
from gptoss.engine.worker.model_runner import ModelRunner, ModelRunnerOutput
from gptoss.engine.worker.tp_worker import TensorParallelWorkers

if TYPE_CHECKING:
    from gptoss.engine.structured_output.grammar import StructuredOutputCompiler

logger = logging.getLogger(__name__)

# This many model steps in a row failing entirely (raising, or every sampled row non-finite) and no step
# succeeding since make the engine unhealthy: one bad request fails one step at most, a broken model all.
UNHEALTHY_AFTER_FAILED_STEPS = 3


def eos_token_ids(checkpoint_dir: str | Path, config: ModelConfig) -> frozenset[int]:
    """End-of-sequence ids: `generation_config.json`'s `eos_token_id` (int or list) and config.json's."""
    ids: set[int] = set()
    if config.eos_token_id is not None:
        ids.add(config.eos_token_id)
    path = Path(checkpoint_dir) / "generation_config.json"
    if path.is_file():
        with open(path) as f:
            raw = json.load(f).get("eos_token_id")
        if isinstance(raw, int):
            ids.add(raw)
        elif isinstance(raw, list):
            ids.update(int(x) for x in raw)
    return frozenset(ids)


class LLMEngine:
    """Scheduler + block manager + model runner + output processing; single-threaded (see module docstring)."""

    def __init__(self, args: EngineArgs) -> None:
        if args.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1: replicas are run by DataParallelEngine (engine/data_parallel.py)")
        self.args = args
        self.config = ModelConfig.from_json(args.model)
        self.tokenizer = load_tokenizer(args.tokenizer or args.model)
        self.eos_token_ids = eos_token_ids(args.model, self.config)
        self.workers: TensorParallelWorkers | None = None
        # Set when the engine can no longer step (a tensor-parallel worker died or hung); listeners are told once.
        self.fatal_error: str | None = None
        self._fatal_listeners: list[Callable[[str], None]] = []
        if args.tensor_parallel_size > 1:
            self.workers = TensorParallelWorkers(args, on_failure=self._fail)
        self.runner = ModelRunner(args, self.config, self.workers.parallel if self.workers else SINGLE)
        groups = block_groups(self.config)
        self.block_manager = BlockManager(self.runner.num_blocks, args.block_size, groups, args.enable_prefix_caching)
        for name, window in groups.items():
            # One sequence must always be able to take a step: its window plus one new block.
            need = 1 if window is None else -(-(window - 1) // args.block_size) + 2
            if self.runner.num_blocks[name] < need:
                raise ValueError(f"{name} pool of {self.runner.num_blocks[name]} blocks is below the {need} needed")
        self.scheduler = Scheduler(
            self.block_manager,
            args.max_num_seqs,
            args.max_num_batched_tokens,
            self.runner.context_len,
            args.max_num_waiting,
        )
        # The longest sequence served (context and KV cache both bound it); reaching it finishes "length".
        self.max_model_len = self.scheduler.max_model_len
        self.requests: dict[str, Sequence] = {}
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._pending_text: dict[int, str] = {}
        self._grammar_compiler: StructuredOutputCompiler | None = None  # see grammar_compiler
        self._grammar_lock = threading.Lock()
        self._admitted: set[int] = set()
        self.metrics = EngineMetrics()
        self.vocab_size = self.config.vocab_size
        self.consecutive_failed_steps = 0
        self.last_step_error: str | None = None

    # ---- requests ---------------------------------------------------------------------------------

    def validate_request(self, prompt_token_ids: SequenceABC[int], sampling_params: Any) -> None:
        """The checks `add_request` makes (reads only immutable state: safe from any thread)."""
        if not isinstance(sampling_params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be SamplingParams, got {type(sampling_params).__name__}")
        if len(prompt_token_ids) == 0:
            raise InvalidRequestError("prompt is empty: at least one token is needed")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt has token ids outside 0..{self.vocab_size - 1}: {bad[:5]}")
        self.scheduler.check_prompt(len(prompt_token_ids))
        if sampling_params.structured_output is not None:
            self.grammar_compiler.compile(sampling_params.structured_output)  # cached: a bad schema raises here

    @property
    def grammar_compiler(self) -> StructuredOutputCompiler:
        """The structured-output compiler, made on first use (2-5 s with the real vocabulary). Thread-safe.

        Imported here rather than at the top: llguidance is only needed by requests that carry a spec, so an
        image without it (the GPU test image) still runs everything else.
        """
        with self._grammar_lock:
            if self._grammar_compiler is None:
                from gptoss.engine.structured_output.grammar import StructuredOutputCompiler

                self._grammar_compiler = StructuredOutputCompiler(self.tokenizer, self.vocab_size)
            return self._grammar_compiler

    def warm_up_grammar_compiler(self) -> None:
        """Build `grammar_compiler` on a background thread, so that the first constrained request does not wait."""

        def build() -> None:
            try:
                self.grammar_compiler  # noqa: B018  (builds it)
            except ImportError as exc:
                logger.warning("structured outputs unavailable until %s is installed", exc.name)

        threading.Thread(target=build, name="grammar-compiler-warmup", daemon=True).start()

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: SequenceABC[int],
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
        logits_mask_fn: Callable[[list[int]], Any] | None = None,
    ) -> Sequence:
        """Queue a request. `sampling_params.structured_output` constrains its reply to a grammar;
        `logits_mask_fn(output_token_ids) -> bool tensor [vocab] | None` constrains each sampled token further.
        If either fails mid-way, only this request fails (finish_reason "error")."""
        if sampling_params is None:
            sampling_params = SamplingParams()
        if logits_mask_fn is not None and not callable(logits_mask_fn):
            raise InvalidRequestError("logits_mask_fn must be callable")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.validate_request(prompt_token_ids, sampling_params)
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            sampling_params,
            want_prompt_logprobs=sampling_params.prompt_logprobs is not None,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
        )
        if seq.want_prompt_logprobs:
            seq.prompt_logprobs = [None]
        seq.logits_mask_fn = logits_mask_fn
        if sampling_params.structured_output is not None:
            seq.grammar = self.grammar_compiler.new_state(sampling_params.structured_output)
        self.scheduler.add(seq)
        self.requests[request_id] = seq
        self._detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, sampling_params)
        self._pending_text[seq.seq_id] = ""
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request with "abort" and free its blocks now; None if it is unknown or already done."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return self._make_output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    # ---- one step ---------------------------------------------------------------------------------

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One scheduler plan and model step; see the module docstring (`finished_only` included)."""
        if self.fatal_error is not None:
            raise EngineDeadError(self.fatal_error)
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        for item in plan.scheduled:
            if item.seq.seq_id not in self._admitted:
                self._admitted.add(item.seq.seq_id)
                self.metrics.record_admission(item.seq.num_prompt_tokens, item.seq.num_cached_tokens)
        try:
            result = self.runner.execute(plan)
        except Exception as exc:  # one bad step must not kill the engine: fail its requests, go on
            logger.exception("model step failed; failing the %d requests in it", len(plan.scheduled))
            self.metrics.step_errors_total += 1
            self._record_step_health(f"model step failed: {type(exc).__name__}: {exc}")
            # A collective fails when a peer died: say so rather than pass on the transport's message.
            failure = self.workers.detect_failure() if self.workers is not None else None
            if self.workers is not None and failure is None:
                # The other ranks may be waiting in a collective this rank never reached: the group is out of
                # step, so no later step can run. Fatal (the server exits and is restarted).
                self._fail(f"model step failed on rank 0 with tensor parallelism: {type(exc).__name__}: {exc}")
            outputs = []
            for item in plan.scheduled:
                item.seq.error = failure or f"model step failed: {type(exc).__name__}: {exc}"
                self._finish(item.seq, "error")
                outputs.append(self._make_output(item.seq))
            return outputs
        self.scheduler.mark_computed(plan)
        if result.sampled:
            all_non_finite = result.num_non_finite == len(result.sampled)
            self._record_step_health("every row's logits were non-finite (NaN or infinity)" if all_non_finite else None)
        outputs = self._process(plan, result, finished_only)
        num_prefill = sum(item.num_new_tokens for item in plan.scheduled if not item.samples or item.num_new_tokens > 1)
        self.metrics.record_step(num_prefill, len(result.sampled))
        return outputs

    def _record_step_health(self, error: str | None) -> None:
        """Count a failed step (`error`), or reset the count after one that sampled something."""
        if error is None:
            self.consecutive_failed_steps = 0
            return
        self.consecutive_failed_steps += 1
        self.last_step_error = error

    def unhealthy_reason(self) -> str | None:
        """Why the engine cannot serve anything (None while it can): the last steps all failed."""
        if self.consecutive_failed_steps < UNHEALTHY_AFTER_FAILED_STEPS:
            return None
        return f"the last {self.consecutive_failed_steps} model steps all failed: {self.last_step_error}"

    def _process(self, plan: SchedulerOutput, result: ModelRunnerOutput, finished_only: bool) -> list[RequestOutput]:
        outputs = []
        for item in plan.scheduled:
            seq = item.seq
            entries = result.prompt_logprobs.get(seq.seq_id)
            if entries and result.first_prompt_index[seq.seq_id] == len(seq.prompt_logprobs):
                seq.prompt_logprobs.extend(entries)
            sampled = result.sampled.get(seq.seq_id)
            if sampled is None or seq.is_finished:
                continue
            if seq.seq_id in result.failed:
                seq.error = result.failed[seq.seq_id]
                self._finish(seq, "error")
                outputs.append(self._make_output(seq))
                continue
            try:
                self._append_token(seq, sampled)
            except Exception as exc:  # e.g. detokenization: fail this request only
                logger.exception("output processing failed for request %s", seq.request_id)
                seq.error = f"output processing failed: {type(exc).__name__}: {exc}"
                self._finish(seq, "error")
            if finished_only and not seq.is_finished:
                # A running request's output copies all its tokens so far (O(length) per step); only its delta
                # is dropped, so that its final output holds the same deltas as with every output built.
                seq.num_reported_tokens = seq.num_output_tokens
                self._pending_text[seq.seq_id] = ""
                continue
            outputs.append(self._make_output(seq))
        return outputs

    def _append_token(self, seq: Sequence, sampled: TokenLogprob) -> None:
        params: SamplingParams = seq.sampling_params
        if params.max_tokens == 0:  # scoring only: the prompt's logprobs were the point
            self._finish(seq, "length")
            return
        token_id = sampled.token_id
        seq.token_ids.append(token_id)
        if params.logprobs is not None:
            seq.output_logprobs.append(sampled)
        detok = self._detokenizers[seq.seq_id]
        if params.is_stop_token(token_id, self.eos_token_ids):
            # The stop token itself adds no text (as in vLLM / OpenAI).
            self._pending_text[seq.seq_id] += detok.flush()
            self._finish(seq, "stop", token_id if token_id in params.stop_token_ids else None)
            return
        self._pending_text[seq.seq_id] += detok.add_tokens([token_id])
        if detok.finished:
            self._finish(seq, "stop", detok.stop_str)
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._pending_text[seq.seq_id] += detok.flush()
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.is_finished:
            return
        self.scheduler.finish(seq, reason, stop_reason)
        self.runner.host_block_tables.release(seq.seq_id)
        self.metrics.record_finished(reason)

    def _make_output(self, seq: Sequence) -> RequestOutput:
        """The request's state now, with what changed since the last output as deltas."""
        params: SamplingParams = seq.sampling_params
        num_reported = seq.num_reported_tokens
        new_token_ids = seq.token_ids[seq.num_prompt_tokens + num_reported :]
        want_logprobs = params.logprobs is not None
        seq.num_reported_tokens = seq.num_output_tokens
        text_delta = self._pending_text.get(seq.seq_id, "")
        self._pending_text[seq.seq_id] = ""
        detok = self._detokenizers.get(seq.seq_id)
        out = RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids,
            text=detok.output_text if detok is not None else "",
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=list(seq.output_logprobs) if want_logprobs else None,
            prompt_logprobs=list(seq.prompt_logprobs) if seq.want_prompt_logprobs else None,
            new_token_ids=new_token_ids,
            text_delta=text_delta,
            new_logprobs=seq.output_logprobs[num_reported:] if want_logprobs else None,
            num_cached_tokens=seq.num_cached_tokens,
            error=seq.error,
        )
        if seq.is_finished:
            self.requests.pop(seq.request_id, None)
            self._detokenizers.pop(seq.seq_id, None)
            self._pending_text.pop(seq.seq_id, None)
            self._admitted.discard(seq.seq_id)
        return out

    def add_fatal_listener(self, listener: Callable[[str], None]) -> None:
        """Call `listener(reason)` (from another thread) when the engine becomes unable to step."""
        self._fatal_listeners.append(listener)
        if self.fatal_error is not None:
            listener(self.fatal_error)

    def _fail(self, reason: str) -> None:
        self.fatal_error = reason
        for listener in list(self._fatal_listeners):
            try:
                listener(reason)
            except Exception:
                logger.exception("fatal-error listener failed")

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one GPU); the engine cannot step afterwards."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None

    # ---- observability ----------------------------------------------------------------------------

    def metrics_snapshot(self) -> MetricsSnapshot:
        return self.metrics.snapshot(
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            self.block_manager.pools,
            self.scheduler.num_preemptions,
        )
