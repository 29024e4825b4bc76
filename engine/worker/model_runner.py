"""Executes one scheduler plan: builds the step's tensors, runs the model, samples.

With tensor parallelism (`ParallelContext.world_size > 1`) every rank has a ModelRunner over its share of the
weights and KV cache. Rank 0 turns the scheduler's plan into a `StepPlan` (the step's host tensors and which
hidden rows need logits), broadcasts it, and all ranks `run_step` it (their collectives meet inside); only
rank 0 samples, computes logprobs and runs the grammar. The other ranks loop in engine/worker/tp_worker.py.

Owns the model weights, the paged KV caches (one (k, v) pair per layer, `[num_blocks, Hkv, block_size, D]`,
one block pool per layer type) and the sampler. `execute(plan)` returns, per sequence that samples this step,
its next token (with logprobs), and for sequences that asked for prompt logprobs the logprobs of the prompt
tokens this step's chunk predicts.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from gptoss.engine.core.scheduler import ScheduledSequence, SchedulerOutput
from gptoss.engine.core.sequence import Sequence
from gptoss.engine.distributed.parallel_state import SINGLE, ParallelContext, broadcast_object, min_over_ranks
from gptoss.engine.engine_args import EngineArgs
from gptoss.engine.model import ops
from gptoss.engine.model.config import FULL, SLIDING, ModelConfig
from gptoss.engine.model.forward_batch import ForwardBatch
from gptoss.engine.model.gpt_oss import GptOssModel
from gptoss.engine.model.loader import load_weights, randomize_weights
from gptoss.engine.outputs import TokenLogprob
from gptoss.engine.worker.cuda_graphs import DecodeGraphRunner, capture_sizes
from gptoss.engine.worker.kv_cache import allocate_kv_caches
from gptoss.engine.worker.memory import num_kv_blocks
from gptoss.engine.worker.sampler import Sampler, SamplingBatch, compute_prompt_logprobs
from gptoss.kernels.cpu import set_expert_cache_budget

if TYPE_CHECKING:
    from gptoss.engine.structured_output.grammar import BitmaskWorker, StructuredOutputState

logger = logging.getLogger(__name__)

# Rows of logits computed at once for prompt logprobs ([rows, vocab] fp32 each time).
PROMPT_LOGITS_CHUNK = 512


@dataclass
class ModelRunnerOutput:
    """seq_id -> the sampled token; seq_id -> prompt-token logprobs for the positions this step predicted
    (entry j is the logprob of prompt token `first_prompt_index[seq_id] + j`)."""

    sampled: dict[int, TokenLogprob] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # seq_id -> why its token could not be sampled
    num_non_finite: int = 0  # sampling rows whose logits had a NaN or infinity (a broken model, not a request)
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    first_prompt_index: dict[int, int] = field(default_factory=dict)


def _to_host_lists(*tensors: torch.Tensor | None) -> list[list | None]:
    """`.tolist()` of each tensor (None stays None) with a single wait for the device: on CUDA every tensor is
    copied asynchronously (into pinned memory) and the stream is synchronised once, instead of one blocking
    copy per tensor."""
    device = next((t.device for t in tensors if t is not None and t.is_cuda), None)
    if device is not None:
        tensors = tuple(t.to("cpu", non_blocking=True) if t is not None else None for t in tensors)
        torch.cuda.current_stream(device).synchronize()
    return [t.tolist() if t is not None else None for t in tensors]


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


@dataclass
class StepPlan:
    """One step as every rank runs it: the step's host tensors, and in order the hidden-state rows whose logits
    are computed (`(begin, end)`: a slice of rows; a list: those rows gathered)."""

    inputs: StepInputs
    logits_rows: list[tuple[int, int] | list[int]]

    def to_wire(self) -> tuple:
        """A picklable copy with numpy arrays for tensors (torch tensors pickle ~10x slower); tensors shared
        between layer types stay shared (pickle's memo keeps one array)."""
        arrays: dict[int, np.ndarray] = {}

        def array(t: torch.Tensor) -> np.ndarray:
            return arrays.setdefault(id(t), t.numpy())

        b = self.inputs.batch
        return (
            array(self.inputs.input_ids),
            array(self.inputs.positions),
            array(b.query_start_loc),
            array(b.seq_lens),
            {g: array(t) for g, t in b.block_tables.items()},
            {g: array(t) for g, t in b.slot_mapping.items()},
            b.max_query_len,
            b.max_seq_len,
            self.logits_rows,
        )

    @classmethod
    def from_wire(cls, wire: tuple) -> StepPlan:
        input_ids, positions, query_start_loc, seq_lens, block_tables, slot_mapping, max_q, max_s, rows = wire
        tensors: dict[int, torch.Tensor] = {}

        def tensor(a: np.ndarray) -> torch.Tensor:
            return tensors.setdefault(id(a), torch.from_numpy(a))

        batch = ForwardBatch(
            query_start_loc=tensor(query_start_loc),
            seq_lens=tensor(seq_lens),
            block_tables={g: tensor(a) for g, a in block_tables.items()},
            slot_mapping={g: tensor(a) for g, a in slot_mapping.items()},
            max_query_len=max_q,
            max_seq_len=max_s,
        )
        return cls(StepInputs(tensor(input_ids), tensor(positions), batch), rows)


class HostBlockTables:
    """Persistent host copies of the live sequences' block tables, one `[rows, width]` int32 array per group.

    Each sequence keeps one row (by seq_id) from its first step until `release`. A block table only changes by
    appending blocks at its end, by setting a prefix of entries to -1 (sliding-window blocks released:
    `seq.num_window_freed` of them), or by being replaced by a new list (preemption, a prefix hit, a fork), so a
    row is brought up to date by copying only the new entries (a whole row only when the list was replaced).
    Rebuilding every table from its Python list each step costs ~1 ms per 64 sequences of 1k tokens and grows
    with the context. Entries past a table's length are 0, as in a freshly built array.
    """

    def __init__(self, groups: list[str], num_rows: int = 16, width: int = 64) -> None:
        self.groups = list(groups)
        self.arrays = {g: np.zeros((num_rows, width), dtype=np.int32) for g in self.groups}
        self.row_of: dict[int, int] = {}
        self._free_rows = list(range(num_rows - 1, -1, -1))
        # Per group and row: the list mirrored (identity), how many entries are copied, how many are -1 already.
        self._source: dict[str, list[list[int] | None]] = {g: [None] * num_rows for g in self.groups}
        self._length = {g: [0] * num_rows for g in self.groups}
        self._freed = {g: [0] * num_rows for g in self.groups}

    @property
    def num_rows(self) -> int:
        return len(next(iter(self._length.values())))

    def _grow_rows(self) -> None:
        old = self.num_rows
        for g in self.groups:
            self.arrays[g] = np.concatenate([self.arrays[g], np.zeros_like(self.arrays[g])])
            self._source[g].extend([None] * old)
            self._length[g].extend([0] * old)
            self._freed[g].extend([0] * old)
        self._free_rows.extend(range(2 * old - 1, old - 1, -1))

    def _grow_width(self, group: str, width: int) -> None:
        array = self.arrays[group]
        new_width = max(width, 2 * array.shape[1])
        self.arrays[group] = np.pad(array, ((0, 0), (0, new_width - array.shape[1])))

    def sync(self, seq: Sequence) -> int:
        """Bring `seq`'s row up to date with its block tables; returns the row."""
        row = self.row_of.get(seq.seq_id)
        if row is None:
            if not self._free_rows:
                self._grow_rows()
            row = self._free_rows.pop()
            self.row_of[seq.seq_id] = row
        for g in self.groups:
            table = seq.block_tables[g]
            length = len(table)
            array = self.arrays[g]
            if length > array.shape[1]:
                self._grow_width(g, length)
                array = self.arrays[g]
            old_length = self._length[g][row]
            freed = seq.num_window_freed.get(g, 0)
            if self._source[g][row] is not table:
                array[row, :length] = table
                if old_length > length:
                    array[row, length:old_length] = 0
                self._source[g][row] = table
            else:
                if length > old_length:
                    array[row, old_length:length] = table[old_length:]
                old_freed = self._freed[g][row]
                if freed > old_freed:
                    array[row, old_freed:freed] = -1
            self._length[g][row] = length
            self._freed[g][row] = freed
        return row

    def gather(self, seqs: list[Sequence]) -> dict[str, torch.Tensor]:
        """Per group, the tables of `seqs` (synced first): `[len(seqs), max table length]` int32, a new host
        tensor (the rows are copied out, so later syncs do not change it)."""
        rows = [self.sync(seq) for seq in seqs]
        width = max(self._length[g][row] for row in rows for g in self.groups)
        first = rows[0]
        if rows[-1] - first == len(rows) - 1 and rows == list(range(first, first + len(rows))):
            # Consecutive rows (the usual case: rows are handed out in admission order): a slice is cheaper
            # than fancy indexing.
            return {g: torch.from_numpy(self.arrays[g][first : first + len(rows), :width].copy()) for g in self.groups}
        return {g: torch.from_numpy(self.arrays[g][rows, :width]) for g in self.groups}

    def release(self, seq_id: int) -> None:
        """Forget a finished sequence's row (its content is overwritten when the row is reused)."""
        row = self.row_of.pop(seq_id, None)
        if row is None:
            return
        for g in self.groups:
            self._source[g][row] = None
        self._free_rows.append(row)


class ModelRunner:
    """Loads the model and KV caches for `args`; `execute` runs one step."""

    def __init__(self, args: EngineArgs, config: ModelConfig, parallel: ParallelContext = SINGLE) -> None:
        self.args = args
        self.config = config
        self.parallel = parallel
        self.device = parallel.device(args.resolve_device())
        self.dtype = args.resolve_dtype(self.device)
        self.block_size = args.block_size
        if args.kernel_backend == "triton" and self.device.type != "cuda":
            ops.enable_triton_interpreter()
        self.model = GptOssModel.create(
            config, self.dtype, self.device, parallel.rank, parallel.world_size, parallel.device_group
        )
        self.model.batch_invariant = args.resolve_batch_invariant(self.device)
        self.model.kernel_backend = args.kernel_backend  # before loading: it picks the MoE weights' layout
        if args.random_weights:
            randomize_weights(self.model, seed=args.seed)
        else:
            load_weights(self.model, args.model, progress=args.load_progress, check_finite=args.check_weights)
        self.model.batch_invariant = args.resolve_batch_invariant(self.device)
        if self.device.type == "cpu":
            set_expert_cache_budget(int(args.cpu_expert_cache_gb * (1 << 30)))
        # Rank 0 hands out block ids for all ranks: each must hold as many as the smallest cache.
        self.num_blocks = min_over_ranks(num_kv_blocks(args, config, self.device, self.dtype), parallel)
        # A model with one layer type has one pool; the other type's key is never read.
        self.kv_caches = allocate_kv_caches(
            config,
            self.num_blocks,
            args.block_size,
            args.resolve_kv_dtype(self.dtype),
            self.device,
            parallel.world_size,
        )
        self.host_block_tables = HostBlockTables(list(self.num_blocks))
        generator = torch.Generator(device=self.device)
        generator.manual_seed(args.seed)
        self.sampler = Sampler(generator)
        # Grammar bitmasks (structured outputs) are filled on a worker thread; made on the first such request.
        self._bitmask_worker: BitmaskWorker | None = None
        # The model's context: no step holds a longer sequence (the KV cache may bound sequences further, see
        # Scheduler.max_model_len, but the runner exists before the block pools do).
        self.context_len = min(args.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
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
            self.context_len,
            self.block_size,
            use_graphs=use_graphs,
        )

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.model.parameters()) + sum(t.nbytes for t in self.model.buffers())

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_caches)

    def _log_memory(self) -> None:
        """What the weights and the KV cache take, and how many tokens the cache holds."""
        weight_bytes, kv_bytes = self.weight_bytes, self.kv_cache_bytes
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
            start, end = item.start, item.end
            query_start_loc.append(query_start_loc[-1] + item.num_new_tokens)
            seq_lens.append(end)
            if end - start == 1:  # a decode: no slices or generators for one token
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                block, offset = divmod(start, bs)
                for g in groups:
                    slot_mapping[g].append(seq.block_tables[g][block] * bs + offset)
                continue
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            for g in groups:
                table = seq.block_tables[g]
                slot_mapping[g].extend(table[p // bs] * bs + p % bs for p in range(start, end))
        # Padding is never read (positions >= seq_len); freed sliding entries are -1.
        block_tables = self.host_block_tables.gather([item.seq for item in plan.scheduled])
        # The [T] int64 rows in one tensor and the int32 sequence metadata in another, handed out as views, both
        # made through numpy: `torch.tensor(list)` converts element by element, ~4x the time of `np.array`.
        token_rows = torch.from_numpy(np.array([input_ids, positions, *slot_mapping.values()], dtype=np.int64))
        token_rows = token_rows.unbind(0)
        slots = dict(zip(groups, token_rows[2:], strict=True))
        if len(groups) == 1:  # one pool serves both layer types
            for other in (FULL, SLIDING):
                block_tables.setdefault(other, block_tables[groups[0]])
                slots.setdefault(other, slots[groups[0]])
        num_seqs = len(seq_lens)
        seq_info = torch.from_numpy(np.array(query_start_loc + seq_lens, dtype=np.int32))
        batch = ForwardBatch(
            query_start_loc=seq_info[: num_seqs + 1],
            seq_lens=seq_info[num_seqs + 1 :],
            block_tables=block_tables,
            slot_mapping=slots,
            max_query_len=max(item.num_new_tokens for item in plan.scheduled),
            max_seq_len=max(seq_lens),
        )
        return StepInputs(token_rows[0], token_rows[1], batch)

    # ---- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        if plan.is_empty:
            return out
        # Structured-output rows: their bitmasks are computed on a worker thread (llguidance drops the GIL)
        # while this thread builds the inputs and launches the forward; `_sample` waits for them.
        grammar = self._submit_grammar_bitmasks([item.seq for item in plan.scheduled if item.samples], out)
        # The rows that need logits, in the order they are computed: prompt-logprob chunks, then sampling rows.
        logits_rows: list[tuple[int, int] | list[int]] = []
        prompt_spans: list[tuple[ScheduledSequence, int, int]] = []
        row = 0
        sample_rows: list[int] = []
        samplers: list[ScheduledSequence] = []
        for item in plan.scheduled:
            span = self._prompt_logprob_span(item) if item.seq.want_prompt_logprobs else None
            if span is not None:
                first, last = span
                prompt_spans.append((item, first, last))
                begin, end = row + first - 1 - item.start, row + last - item.start
                logits_rows.extend(
                    (b, min(b + PROMPT_LOGITS_CHUNK, end)) for b in range(begin, end, PROMPT_LOGITS_CHUNK)
                )
            row += item.num_new_tokens
            if item.samples:
                sample_rows.append(row - 1)
                samplers.append(item)
        if samplers:
            logits_rows.append((0, row) if len(sample_rows) == row else sample_rows)
        step = StepPlan(self.prepare_inputs(plan), logits_rows)
        if self.parallel.world_size > 1:
            broadcast_object(step.to_wire(), self.parallel)
        logits = self._run_step(step)  # in inference mode already
        chunks = iter(logits)
        for item, first, last in prompt_spans:
            num_chunks = -(-(last - first + 1) // PROMPT_LOGITS_CHUNK)
            self._prompt_logprobs(item, first, [next(chunks) for _ in range(num_chunks)], out)
        if samplers:
            self._sample(logits[-1], samplers, out, grammar)
        return out

    @torch.inference_mode()
    def run_step(self, step: StepPlan) -> list[torch.Tensor]:
        """The forward pass of `step` and the fp32 logits `[rows, V]` of each entry of `step.logits_rows`.

        With tensor parallelism every rank calls this with the same plan (the collectives inside pair up).
        """
        return self._run_step(step)

    def _run_step(self, step: StepPlan) -> list[torch.Tensor]:
        """`run_step` for a caller in inference mode (`execute`): entering it again costs ~20 us a step on a
        busy CPU, 1% of a small model's decode step."""
        inputs = step.inputs
        graphs = self.graph_runner
        if graphs is not None and graphs.fits(inputs.batch):
            hidden = graphs.run(inputs.input_ids, inputs.positions, inputs.batch)
        else:
            if inputs.input_ids.device != self.device:  # host tensors for a device; on a CPU they are in place
                inputs = inputs.to(self.device)
            hidden = self.model.forward(inputs.input_ids, inputs.positions, inputs.batch, self.kv_caches)
        logits = []
        for rows in step.logits_rows:
            if isinstance(rows, tuple):
                selected = hidden[rows[0] : rows[1]]
            else:
                # Non-blocking: a plain torch.tensor(..., device=cuda) would wait for the forward to finish.
                selected = hidden[torch.tensor(rows, dtype=torch.int64).to(hidden.device, non_blocking=True)]
            logits.append(self.model.compute_logits(selected))
        return logits

    def _submit_grammar_bitmasks(
        self, seqs: list, out: ModelRunnerOutput
    ) -> tuple[list[int], Future[torch.Tensor]] | None:
        """Start the bitmasks of the sampling rows with a grammar (structured output) -> (their row indices among
        `seqs`, the future of int32 `[len(rows), ceil(V/32)]`), or None when there are none.

        Each state first catches up on the tokens sampled since its last step (`sync`); a refused token fails
        only that request (`out.failed`).
        """
        rows: list[int] = []
        states: list[StructuredOutputState] = []
        for i, seq in enumerate(seqs):
            state = seq.grammar
            if state is None:
                continue
            if not state.sync(seq.output_token_ids):
                out.failed[seq.seq_id] = f"logits mask failed: the grammar refused an output token ({state.error})"
                continue
            rows.append(i)
            states.append(state)
        if not states:
            return None
        if self._bitmask_worker is None:
            from gptoss.engine.structured_output.grammar import BitmaskWorker  # llguidance: see LLMEngine

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
        # The sampler reads the token lists only of rows with penalties (and a seeded row's output length);
        # `output_token_ids` is a new list per call, not worth making for the other rows.
        outputs = [
            seq.output_token_ids if p.uses_penalties or p.seed is not None else ()
            for seq, p in zip(seqs, params, strict=True)
        ]
        prompts = [
            seq.prompt_token_array if p.repetition_penalty != 1.0 else () for seq, p in zip(seqs, params, strict=True)
        ]
        batch = SamplingBatch.build(params, outputs, logits.shape[-1], logits.device, prompt_token_ids=prompts)
        # A NaN or infinity in a row (broken weights, an overflow) would sample garbage, even an id outside the
        # vocabulary: such rows are sampled from zeros instead and their requests fail with a clear error.
        # A NaN reaches both a row's max and its min, +inf the max, -inf the min: two row reductions, read back
        # with the tokens (no extra wait), say it exactly at a tenth of the cost of an [N, V] `isfinite` map and
        # its reduction on a CPU.
        row_max, row_min = logits.amax(dim=-1), logits.amin(dim=-1)
        if not batch.all_greedy:  # an argmax is an id in the vocabulary whatever its row holds
            finite = torch.isfinite(row_max) & torch.isfinite(row_min)
            logits = torch.where(finite.unsqueeze(1), logits, 0.0)
        result = self.sampler(logits, batch, self._allowed_token_mask(seqs, logits, out, grammar))
        token_ids, logprobs, top_ids, top_values, row_maxes, row_mins = _to_host_lists(
            result.sampled_token_ids,
            result.sampled_logprobs,
            result.top_logprob_ids,
            result.top_logprobs,
            row_max,
            row_min,
        )
        for i, seq in enumerate(seqs):
            if not (math.isfinite(row_maxes[i]) and math.isfinite(row_mins[i])):
                out.num_non_finite += 1
                out.failed[seq.seq_id] = "the model produced non-finite logits (NaN or infinity) for this request"
            k = seq.sampling_params.logprobs or 0
            top = dict(zip(top_ids[i][:k], top_values[i][:k], strict=True)) if k and top_ids and top_values else {}
            logprob = logprobs[i] if logprobs is not None else float("nan")  # nan: not asked for, not reported
            out.sampled[seq.seq_id] = TokenLogprob(token_ids[i], logprob, top_logprobs=top)

    @staticmethod
    def _allowed_token_mask(
        seqs: list,
        logits: torch.Tensor,
        out: ModelRunnerOutput,
        grammar: tuple[list[int], Future[torch.Tensor]] | None = None,
    ) -> torch.Tensor | None:
        """`[N, V]` bool of the allowed tokens (None when no sequence is constrained).

        Grammars come as one batched bitmask (`grammar`, from `_submit_grammar_bitmasks`), unpacked on the
        logits' device; `logits_mask_fn`s are called row by row and ANDed in. A mask function that raises or
        returns a bad mask fails only its own request (`out.failed`).
        """
        if not any(seq.grammar is not None or seq.logits_mask_fn is not None for seq in seqs):
            return None
        if grammar is not None:
            from gptoss.engine.structured_output.grammar import allowed_token_mask_for_batch

            rows, future = grammar
            # From pinned memory: the copy is async; the buffer is not refilled before the next-but-one step.
            bitmask = future.result().to(logits.device, non_blocking=True)
            row_index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
            mask = allowed_token_mask_for_batch(bitmask, row_index, logits.shape[0], logits.shape[1])
        else:
            mask = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        for i, seq in enumerate(seqs):
            if seq.logits_mask_fn is None:
                continue
            try:
                row = seq.logits_mask_fn(seq.output_token_ids)
                if row is None:
                    continue
                row = torch.as_tensor(row, device=logits.device)
                if row.shape != (logits.shape[1],) or row.dtype != torch.bool or not bool(row.any()):
                    raise ValueError(f"mask must be a bool [{logits.shape[1]}] tensor allowing some token")
                mask[i] &= row
            except Exception as exc:
                out.failed[seq.seq_id] = f"logits mask failed: {type(exc).__name__}: {exc}"
        return mask

    @staticmethod
    def _prompt_logprob_span(item: ScheduledSequence) -> tuple[int, int] | None:
        """(first, last) prompt indices, inclusive, of the prompt tokens whose logprobs this chunk's rows
        predict (positions start+1 .. end), or None when there are none; row `p - 1 - start` predicts p."""
        seq = item.seq
        first = max(item.start + 1, len(seq.prompt_logprobs))  # prompt index of the first predicted token
        last = min(item.end, seq.num_prompt_tokens - 1)  # inclusive
        return None if last < first else (first, last)

    def _prompt_logprobs(
        self, item: ScheduledSequence, first: int, logits_chunks: list[torch.Tensor], out: ModelRunnerOutput
    ) -> None:
        """Logprobs of the prompt tokens from index `first` on, from the logits of the rows predicting them
        (`PROMPT_LOGITS_CHUNK` rows per chunk)."""
        seq = item.seq
        k = seq.sampling_params.prompt_logprobs or 0
        entries: list[TokenLogprob] = []
        device = logits_chunks[0].device
        num_rows = sum(chunk.shape[0] for chunk in logits_chunks)
        targets = torch.tensor(seq.token_ids[first : first + num_rows], dtype=torch.int64).to(device, non_blocking=True)
        for i, logits in enumerate(logits_chunks):
            begin = i * PROMPT_LOGITS_CHUNK
            result = compute_prompt_logprobs(logits, targets[begin : begin + PROMPT_LOGITS_CHUNK], k)
            values = result.token_logprobs.tolist()
            top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
            top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None
            for j, value in enumerate(values):
                top = dict(zip(top_ids[j], top_values[j], strict=True)) if top_ids and top_values else {}
                entries.append(TokenLogprob(seq.token_ids[first + begin + j], value, top_logprobs=top))
        out.prompt_logprobs[seq.seq_id] = entries
        out.first_prompt_index[seq.seq_id] = first
