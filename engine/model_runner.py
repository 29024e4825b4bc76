"""Executes one scheduler plan: builds the step's tensors, runs the model, samples.

Owns the model weights, the paged KV caches (one (k, v) pair per layer, `[num_blocks, Hkv, block_size, D]`,
one block pool per layer type) and the sampler. `execute(plan)` returns, per sequence that samples this step,
its next token (with logprobs), and for sequences that asked for prompt logprobs the logprobs of the prompt
tokens this step's chunk predicts.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from engine.config import FULL, SLIDING, ModelConfig
from engine.cuda_graphs import DecodeGraphRunner, capture_sizes
from engine.engine_args import EngineArgs, num_kv_blocks
from engine.forward_batch import ForwardBatch
from engine.kv_cache import allocate_kv_caches
from engine.loader import load_weights, randomize_weights
from engine.model import GptOssModel
from engine.sampler import Sampler, SamplingBatch, compute_prompt_logprobs
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.sequence import TokenLogprob
from engine.structured_output import BitmaskWorker, StructuredOutputState, unpack_token_bitmask

logger = logging.getLogger(__name__)

# Rows of logits computed at once for prompt logprobs ([rows, vocab] fp32 each time).
PROMPT_LOGITS_CHUNK = 512


@dataclass
class ModelRunnerOutput:
    """seq_id -> the sampled token; seq_id -> prompt-token logprobs for the positions this step predicted
    (entry j is the logprob of prompt token `first_prompt_index[seq_id] + j`)."""

    sampled: dict[int, TokenLogprob] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # seq_id -> why its logits mask could not be built
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    first_prompt_index: dict[int, int] = field(default_factory=dict)


@dataclass
class StepInputs:
    """The tensors of one step, built on the host (`prepare_inputs`), then moved with `to`."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    batch: ForwardBatch

    def to(self, device: torch.device) -> StepInputs:
        """Copies on `device` (non-blocking; tensors shared between layer types stay shared)."""
        moved: dict[int, torch.Tensor] = {}

        def move(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in moved:
                moved[id(t)] = t.to(device, non_blocking=True)
            return moved[id(t)]

        batch = self.batch
        return StepInputs(
            move(self.input_ids),
            move(self.positions),
            replace(
                batch,
                query_start_loc=move(batch.query_start_loc),
                seq_lens=move(batch.seq_lens),
                block_tables={g: move(t) for g, t in batch.block_tables.items()},
                slot_mapping={g: move(t) for g, t in batch.slot_mapping.items()},
            ),
        )


class ModelRunner:
    """Loads the model and KV caches for `args`; `execute` runs one step."""

    def __init__(self, args: EngineArgs, config: ModelConfig) -> None:
        self.args = args
        self.config = config
        self.device = args.resolve_device()
        self.dtype = args.resolve_dtype(self.device)
        self.block_size = args.block_size
        self.model = GptOssModel.create(config, self.dtype, self.device)
        if args.random_weights:
            randomize_weights(self.model, seed=args.seed)
        else:
            load_weights(self.model, args.model, progress=args.load_progress)
        self.model.batch_invariant = args.batch_invariant
        self.num_blocks = num_kv_blocks(args, config, self.device, self.dtype)
        # A model with one layer type has one pool; the other type's key is never read.
        self.kv_caches = allocate_kv_caches(
            config, self.num_blocks, args.block_size, args.resolve_kv_dtype(self.dtype), self.device
        )
        generator = torch.Generator(device=self.device)
        generator.manual_seed(args.seed)
        self.sampler = Sampler(generator)
        # Grammar bitmasks (structured outputs) are filled on a worker thread; made on the first such request.
        self._bitmask_worker: BitmaskWorker | None = None
        self.max_model_len = min(args.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        self._log_memory()
        # Pure-decode steps replay CUDA graphs (on CUDA unless --enforce-eager); everything else runs eagerly.
        self.graph_runner: DecodeGraphRunner | None = None
        if args.use_cuda_graphs(self.device):
            self.graph_runner = self.make_graph_runner(use_graphs=True)
            self.graph_runner.capture()

    def make_graph_runner(self, use_graphs: bool) -> DecodeGraphRunner:
        """A decode graph runner over this runner's model and caches (`use_graphs=False`: eager padded steps)."""
        return DecodeGraphRunner(
            self.model,
            self.kv_caches,
            list(self.num_blocks),
            capture_sizes(self.args.cuda_graph_max_batch),
            self.max_model_len,
            self.block_size,
            use_graphs=use_graphs,
        )

    def _log_memory(self) -> None:
        """What the weights and the KV cache take, and how many tokens the cache holds."""
        weight_bytes = sum(t.nbytes for t in self.model.parameters()) + sum(t.nbytes for t in self.model.buffers())
        kv_bytes = sum(k.nbytes + v.nbytes for k, v in self.kv_caches)
        # The full-attention pool bounds the tokens in cache; the sliding pool holds only the windows.
        capacity_group = FULL if FULL in self.num_blocks else SLIDING
        logger.info("weights: %.2f GiB on %s", weight_bytes / 2**30, self.device)
        logger.info(
            "KV cache: %.2f GiB (%s), blocks of %d tokens per pool: %s; max tokens in cache: %d",
            kv_bytes / 2**30,
            self.kv_caches[0][0].dtype if self.kv_caches else "-",
            self.block_size,
            ", ".join(f"{g} {n}" for g, n in self.num_blocks.items()),
            self.num_blocks[capacity_group] * self.block_size,
        )

    # ---- tensors ----------------------------------------------------------------------------------

    def prepare_inputs(self, plan: SchedulerOutput) -> StepInputs:
        """input_ids/positions `[T]`, and per group `block_tables` `[S, max_blocks]`, `slot_mapping` `[T]`, as
        host tensors: an eager step moves them to the device, a graph replay copies them into its buffers."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        groups = list(self.num_blocks)
        slot_mapping: dict[str, list[int]] = {g: [] for g in groups}
        for item in plan.scheduled:
            seq = item.seq
            input_ids.extend(seq.token_ids[item.start : item.end])
            positions.extend(range(item.start, item.end))
            query_start_loc.append(query_start_loc[-1] + item.num_new_tokens)
            seq_lens.append(item.end)
            for g in groups:
                table = seq.block_tables[g]
                slot_mapping[g].extend(table[p // bs] * bs + p % bs for p in range(item.start, item.end))
        max_blocks = max(len(item.seq.block_tables[g]) for item in plan.scheduled for g in groups)

        block_tables = {}
        for g in groups:
            # Padding is never read (positions >= seq_len); freed sliding entries stay -1. Row by row through
            # numpy: a nested-list torch.tensor costs ~70 ms for 256 sequences of 8k tokens, this ~5 ms.
            rows = np.zeros((len(plan.scheduled), max_blocks), dtype=np.int32)
            for i, item in enumerate(plan.scheduled):
                table = item.seq.block_tables[g]
                rows[i, : len(table)] = table
            block_tables[g] = torch.from_numpy(rows)
        slots = {g: torch.tensor(slot_mapping[g], dtype=torch.int64) for g in groups}
        if len(groups) == 1:  # one pool serves both layer types
            for other in (FULL, SLIDING):
                block_tables.setdefault(other, block_tables[groups[0]])
                slots.setdefault(other, slots[groups[0]])
        q_lens = [item.num_new_tokens for item in plan.scheduled]
        batch = ForwardBatch(
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=block_tables,
            slot_mapping=slots,
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
        )
        return StepInputs(torch.tensor(input_ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), batch)

    # ---- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        if plan.is_empty:
            return out
        # Structured-output rows: their bitmasks are computed on a worker thread (llguidance drops the GIL)
        # while this thread builds the inputs and launches the forward; `_sample` waits for them.
        grammar = self._submit_grammar_bitmasks([item.seq for item in plan.scheduled if item.samples], out)
        inputs = self.prepare_inputs(plan)
        graphs = self.graph_runner
        if graphs is not None and graphs.fits(inputs.batch):
            hidden = graphs.run(inputs.input_ids, inputs.positions, inputs.batch)
        else:
            inputs = inputs.to(self.device)
            hidden = self.model.forward(inputs.input_ids, inputs.positions, inputs.batch, self.kv_caches)
        row = 0
        sample_rows: list[int] = []
        samplers: list[ScheduledSequence] = []
        for item in plan.scheduled:
            if item.seq.want_prompt_logprobs:
                self._prompt_logprobs(item, hidden[row : row + item.num_new_tokens], out)
            row += item.num_new_tokens
            if item.samples:
                sample_rows.append(row - 1)
                samplers.append(item)
        if not samplers:
            return out
        if len(sample_rows) < row:
            # Non-blocking: a plain torch.tensor(..., device=cuda) would wait for the forward to finish.
            hidden = hidden[torch.tensor(sample_rows, dtype=torch.int64).to(hidden.device, non_blocking=True)]
        self._sample(self.model.compute_logits(hidden), samplers, out, grammar)
        return out

    def _submit_grammar_bitmasks(
        self, seqs: list, out: ModelRunnerOutput
    ) -> tuple[list[int], Future[torch.Tensor]] | None:
        """Start the bitmasks of the sampling rows whose `logits_mask_fn` is a grammar state -> (their row
        indices among `seqs`, the future of int32 `[len(rows), ceil(V/32)]`), or None when there are none.

        Each state first catches up on the tokens sampled since its last step (`sync`); a refused token fails
        only that request (`out.failed`).
        """
        rows: list[int] = []
        states: list[StructuredOutputState] = []
        for i, seq in enumerate(seqs):
            state = seq.logits_mask_fn
            if not isinstance(state, StructuredOutputState):
                continue
            if not state.sync(seq.output_token_ids):
                out.failed[seq.seq_id] = f"logits mask failed: the grammar refused an output token ({state.error})"
                continue
            rows.append(i)
            states.append(state)
        if not states:
            return None
        if self._bitmask_worker is None:
            self._bitmask_worker = BitmaskWorker(states[0].vocab_size, max_rows=self.args.max_num_seqs)
        return rows, self._bitmask_worker.submit(states)

    def _sample(
        self,
        logits: torch.Tensor,
        items: list[ScheduledSequence],
        out: ModelRunnerOutput,
        grammar: tuple[list[int], Future[torch.Tensor]] | None = None,
    ) -> None:
        """Sample each item's next token from its row of `logits` `[N, V]` fp32 (`grammar`: see
        `_submit_grammar_bitmasks`)."""
        seqs = [item.seq for item in items]
        params = [seq.sampling_params for seq in seqs]
        batch = SamplingBatch.build(
            params,
            [seq.output_token_ids for seq in seqs],
            logits.shape[-1],
            logits.device,
            prompt_token_ids=[seq.prompt_token_ids for seq in seqs],
        )
        result = self.sampler(logits, batch, self._allowed_token_mask(seqs, logits, out, grammar))
        token_ids = result.sampled_token_ids.tolist()
        logprobs = result.sampled_logprobs.tolist()
        top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
        top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        for i, seq in enumerate(seqs):
            k = seq.sampling_params.logprobs or 0
            top = dict(zip(top_ids[i][:k], top_values[i][:k], strict=True)) if k and top_ids and top_values else {}
            out.sampled[seq.seq_id] = TokenLogprob(token_ids[i], logprobs[i], top_logprobs=top)

    @staticmethod
    def _allowed_token_mask(
        seqs: list,
        logits: torch.Tensor,
        out: ModelRunnerOutput,
        grammar: tuple[list[int], Future[torch.Tensor]] | None = None,
    ) -> torch.Tensor | None:
        """`[N, V]` bool from the sequences' `logits_mask_fn` (None when no sequence has one).

        Grammar states come as one batched bitmask (`grammar`, from `_submit_grammar_bitmasks`), unpacked on the
        logits' device; other mask functions are called row by row. A mask function that raises or returns a
        bad mask fails only its own request (`out.failed`).
        """
        if not any(seq.logits_mask_fn is not None for seq in seqs):
            return None
        mask = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        if grammar is not None:
            rows, future = grammar
            # From pinned memory: the copy is async; the buffer is not refilled before the next-but-one step.
            bitmask = future.result().to(logits.device, non_blocking=True)
            row_index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
            mask[row_index] = unpack_token_bitmask(bitmask, logits.shape[1])
        for i, seq in enumerate(seqs):
            if seq.logits_mask_fn is None or isinstance(seq.logits_mask_fn, StructuredOutputState):
                continue
            try:
                row = seq.logits_mask_fn(seq.output_token_ids)
                if row is None:
                    continue
                row = torch.as_tensor(row, device=logits.device)
                if row.shape != (logits.shape[1],) or row.dtype != torch.bool or not bool(row.any()):
                    raise ValueError(f"mask must be a bool [{logits.shape[1]}] tensor allowing some token")
                mask[i] = row
            except Exception as exc:
                out.failed[seq.seq_id] = f"logits mask failed: {type(exc).__name__}: {exc}"
        return mask

    def _prompt_logprobs(self, item: ScheduledSequence, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        """Logprobs of the prompt tokens at positions start+1 .. end (those this chunk's rows predict)."""
        seq = item.seq
        first = max(item.start + 1, len(seq.prompt_logprobs))  # prompt index of the first predicted token
        last = min(item.end, seq.num_prompt_tokens - 1)  # inclusive
        if last < first:
            return
        k = seq.sampling_params.prompt_logprobs or 0
        entries: list[TokenLogprob] = []
        rows = hidden[first - 1 - item.start : last - item.start]
        targets = torch.tensor(seq.token_ids[first : last + 1], dtype=torch.int64).to(hidden.device, non_blocking=True)
        for begin in range(0, rows.shape[0], PROMPT_LOGITS_CHUNK):
            logits = self.model.compute_logits(rows[begin : begin + PROMPT_LOGITS_CHUNK])
            result = compute_prompt_logprobs(logits, targets[begin : begin + PROMPT_LOGITS_CHUNK], k)
            values = result.token_logprobs.tolist()
            top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
            top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None
            for j, value in enumerate(values):
                top = dict(zip(top_ids[j], top_values[j], strict=True)) if top_ids and top_values else {}
                entries.append(TokenLogprob(seq.token_ids[first + begin + j], value, top_logprobs=top))
        out.prompt_logprobs[seq.seq_id] = entries
        out.first_prompt_index[seq.seq_id] = first
