"""Batched token sampling on the logits' device: one row of logits per sequence sampled this step.

Usage (model runner, once per step):

    batch = SamplingBatch.build(params_list, output_token_ids_list, vocab_size, device,
                                prompt_token_ids=prompt_token_ids_list)  # prompts only needed for
                                                                        # repetition_penalty != 1
    out = sampler(logits, batch, allowed_token_mask=None)  # logits [N, V] fp32
    out.sampled_token_ids   # [N] int64
    out.sampled_logprobs    # [N] fp32, raw-model logprob of each sampled token (None: no row asked)
    out.top_logprob_ids     # [N, K] int64 or None, K = max `logprobs` over the rows (row i uses its first
    out.top_logprobs        # [N, K] fp32 or None   params_list[i].logprobs columns, most likely first)

Processing order (per row, all vectorised over the batch): allowed-token mask (-inf where False), repetition
penalty (prompt + output tokens), frequency/presence penalties (output tokens), temperature, top_k, top_p,
min_p, then sampling. Greedy rows (temperature < 1e-5) take the argmax of the penalised logits; ties go to
the lowest token id (`greedy_token_ids`: the first maximum).

Randomness: inverse-CDF sampling with ONE uniform number per row: the token is the first index whose running
sum of (unnormalised, fp64) probabilities reaches u * total. Rows of requests with a `seed` get u from a
counter-based hash of (seed, number of tokens the request has generated so far) computed in Python
(`seeded_uniform`), so a seeded request's tokens never depend on the batch it is in (composition, order,
size) nor on any generator state, and no per-row generator or per-row loop over V is needed. Unseeded rows
draw u from `torch.rand` with the sampler's generator (torch's default generator of the device when None).
Given identical logits, CPU and CUDA pick the same token except when u * total falls within rounding error
of a token boundary (the fp64 running sums may round differently).

Logprobs are those of the model's raw distribution: `log_softmax(logits)` of the logits as passed in, before
the mask, penalties, temperature and filtering (what OpenAI reports and vLLM's default).

Cost notes: the sort needed by top_p (or top_k, which uses `torch.topk` when no row needs top_p) runs only on
the rows that use them; the penalties' [N, V] count tensors are built only when a row uses a penalty (one flat
index, one `index_add_`). An all-greedy batch builds no per-row tensor at all, and one with neither penalties
nor logprobs is sampled by a single argmax (no vocabulary-wide work besides). Building a batch is Python over
the rows (and over the prompt/output token ids when penalties are on), never over V; its host tensors reach a
CUDA device through pinned memory with non-blocking copies (the per-row [N] fp32 parameters packed in one), so
building never waits for the forward still running on the device.
Random sampling holds one fp64 [N, V] temporary (8 * N * V bytes: 400 MB at N = 256, V = 201088).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from gptoss.engine.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
# repetition_penalty 0 (allowed by the API) divides by zero; use its limit instead.
_MIN_REPETITION_PENALTY = 1e-6


def _splitmix64(x: int) -> int:
    """A 64-bit integer mix (Python ints): decorrelates consecutive seeds and steps."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, step: int) -> float:
    """The uniform in (0, 1] that picks a seeded request's token number `step`: a pure function of both."""
    key = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return ((key >> 11) + 1) * 2.0**-53


@dataclass(kw_only=True)
class SamplingBatch:
    """Per-row sampling metadata on the logits' device, built once per step by `build`.

    Optional fields are None when no row in the batch uses them, so the sampler skips that work.
    """

    num_rows: int
    vocab_size: int
    temperature: torch.Tensor | None = None  # [N] fp32, 1.0 on greedy rows; None when every row is greedy
    greedy: torch.Tensor | None = None  # [N] bool; None when every row is greedy
    all_greedy: bool
    any_greedy: bool
    # top_k / top_p apply to `filter_rows` only (non-greedy rows that use either).
    filter_rows: torch.Tensor | None = None  # [R] int64
    top_k: torch.Tensor | None = None  # [R] int64, vocab_size where disabled; None if no row uses top_k
    max_top_k: int  # max of `top_k` (known on the host: reading it back from the device would stall)
    top_p: torch.Tensor | None = None  # [R] fp32, 1.0 where disabled; None if no row uses top_p
    min_p: torch.Tensor | None = None  # [N] fp32 (0 on greedy rows)
    repetition_penalty: torch.Tensor | None = None  # [N] fp32
    seen_token_mask: torch.Tensor | None = None  # [N, V] bool: token in prompt or output (rows with rep. penalty)
    frequency_penalty: torch.Tensor | None = None  # [N] fp32
    presence_penalty: torch.Tensor | None = None  # [N] fp32
    output_token_counts: torch.Tensor | None = None  # [N, V] fp32
    seeded_rows: torch.Tensor | None = None  # [S] int64 row indices of non-greedy rows with a seed
    seeded_uniforms: torch.Tensor | None = None  # [S] fp64 in (0, 1], `seeded_uniform(seed, step)` of each
    max_num_logprobs: int  # K = max over rows of `logprobs` (0: none requested)
    # Whether any row reports logprobs: the [N, V] logsumexp is skipped when none does.
    want_logprobs: bool = True

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplingBatch:
        """Row i samples the next token of a request with `params[i]` that generated `output_token_ids[i]`.

        `prompt_token_ids[i]` is read only for rows with `repetition_penalty != 1` (may be None otherwise).
        The seeded-randomness step of row i is `len(output_token_ids[i])`, so recomputation after a
        preemption reproduces the same tokens.
        """
        num_rows = len(params)
        if len(output_token_ids) != num_rows:
            raise ValueError(f"{num_rows} params but {len(output_token_ids)} output_token_ids lists")
        if all(p.is_greedy and not p.uses_penalties and p.logprobs is None for p in params):
            # The usual batch, where an argmax is all the sampler does: one pass over the rows, not one per option
            # (a step's host work counts on a small model).
            return cls(
                num_rows=num_rows,
                vocab_size=vocab_size,
                all_greedy=True,
                any_greedy=num_rows > 0,
                max_top_k=vocab_size,
                max_num_logprobs=0,
                want_logprobs=False,
            )
        device = torch.device(device)
        greedy_list = [p.is_greedy for p in params]
        all_greedy = all(greedy_list)
        # Every [N] fp32 column this batch needs goes in one host tensor and one (non-blocking) copy.
        columns: dict[str, list[float]] = {}
        filter_rows = top_k = top_p = greedy = None
        max_top_k = vocab_size
        seeded_rows = seeded_uniforms = None
        if not all_greedy:  # greedy rows: argmax of the penalised logits, nothing else is read
            columns["temperature"] = [1.0 if g else p.temperature for p, g in zip(params, greedy_list, strict=True)]
            greedy = _to_device(torch.tensor(greedy_list, dtype=torch.bool), device)
            # top_k / top_p: only non-greedy rows (filtering never changes an argmax).
            filter_rows_list = [
                i for i, p in enumerate(params) if not greedy_list[i] and (0 < p.top_k < vocab_size or p.top_p < 1.0)
            ]
            if filter_rows_list:
                filter_rows = _to_device(torch.tensor(filter_rows_list, dtype=torch.int64), device)
                ks = [params[i].top_k if 0 < params[i].top_k < vocab_size else vocab_size for i in filter_rows_list]
                ps = [params[i].top_p for i in filter_rows_list]
                if any(k < vocab_size for k in ks):
                    top_k = _to_device(torch.tensor(ks, dtype=torch.int64), device)
                    max_top_k = max(ks)
                if any(p < 1.0 for p in ps):
                    top_p = _to_device(torch.tensor(ps, dtype=torch.float32), device)
            if any(p.min_p > 0 and not g for p, g in zip(params, greedy_list, strict=True)):
                columns["min_p"] = [0.0 if g else p.min_p for p, g in zip(params, greedy_list, strict=True)]
            seeded = [i for i, p in enumerate(params) if p.seed is not None and not greedy_list[i]]
            if seeded:
                seeded_rows = _to_device(torch.tensor(seeded, dtype=torch.int64), device)
                uniforms = [seeded_uniform(params[i].seed, len(output_token_ids[i])) for i in seeded]  # type: ignore[arg-type]
                seeded_uniforms = _to_device(torch.tensor(uniforms, dtype=torch.float64), device)

        seen_token_mask = output_token_counts = None
        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        freq_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        if rep_rows or freq_rows:
            counted_rows = set(rep_rows) | set(freq_rows)
            output_token_counts = _token_counts(
                [output_token_ids[i] if i in counted_rows else () for i in range(num_rows)],
                vocab_size,
                device,
            )
        if freq_rows:
            columns["frequency_penalty"] = [p.frequency_penalty for p in params]
            columns["presence_penalty"] = [p.presence_penalty for p in params]
        if rep_rows:
            if prompt_token_ids is None:
                raise ValueError("prompt_token_ids is required when a row has repetition_penalty != 1")
            rep_set = set(rep_rows)
            seen_token_mask = _token_mask(
                [prompt_token_ids[i] if i in rep_set else () for i in range(num_rows)],
                [output_token_ids[i] if i in rep_set else () for i in range(num_rows)],
                vocab_size,
                device,
            )
            columns["repetition_penalty"] = [max(p.repetition_penalty, _MIN_REPETITION_PENALTY) for p in params]

        values: dict[str, torch.Tensor] = {}
        if columns:
            packed = _to_device(torch.tensor(list(columns.values()), dtype=torch.float32), device)
            values = dict(zip(columns, packed.unbind(0), strict=True))
        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            temperature=values.get("temperature"),
            greedy=greedy,
            all_greedy=all_greedy,
            any_greedy=any(greedy_list),
            filter_rows=filter_rows,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=values.get("min_p"),
            repetition_penalty=values.get("repetition_penalty"),
            seen_token_mask=seen_token_mask,
            frequency_penalty=values.get("frequency_penalty"),
            presence_penalty=values.get("presence_penalty"),
            output_token_counts=output_token_counts,
            seeded_rows=seeded_rows,
            seeded_uniforms=seeded_uniforms,
            max_num_logprobs=max((p.logprobs or 0 for p in params), default=0),
            want_logprobs=any(p.logprobs is not None for p in params),
        )


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: on CUDA through pinned memory with a non-blocking copy, so building a batch
    never waits for the forward that is still running (a plain `torch.tensor(..., device=cuda)` would)."""
    if device.type == "cpu":
        return host
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _flat_token_index(token_ids: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray | None:
    """`row * V + id` of every token of every row, int64 (None when there is none). A row may be a list of ids
    or an int64 numpy array (e.g. a cached prompt: no Python loop over its tokens)."""
    parts = []
    for row, ids in enumerate(token_ids):
        if len(ids):
            array = ids if isinstance(ids, np.ndarray) else np.fromiter(ids, dtype=np.int64, count=len(ids))
            parts.append(array + row * vocab_size)
    return np.concatenate(parts) if parts else None


def _token_counts(token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[N] rows of token ids -> [N, V] fp32 occurrence counts, from one flat index (row * V + id), one
    host-to-device copy and one `index_add_` (no [N, max_len] padding)."""
    num_rows = len(token_ids)
    counts = torch.zeros(num_rows * vocab_size, dtype=torch.float32, device=device)
    index = _flat_token_index(token_ids, vocab_size)
    if index is not None:
        index_t = _to_device(torch.from_numpy(index), device)
        counts.index_add_(0, index_t, torch.ones(len(index), dtype=torch.float32, device=device))
    return counts.view(num_rows, vocab_size)


def _token_mask(
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor:
    """[N] prompts and [N] outputs -> [N, V] bool: the id occurs in row i's prompt or output. One flat index,
    one copy, one scatter of True (no fp32 [N, V] count tensors)."""
    num_rows = len(prompt_token_ids)
    mask = torch.zeros(num_rows * vocab_size, dtype=torch.bool, device=device)
    parts = [_flat_token_index(rows, vocab_size) for rows in (prompt_token_ids, output_token_ids)]
    parts = [part for part in parts if part is not None]
    if parts:
        mask[_to_device(torch.from_numpy(np.concatenate(parts)), device)] = True
    return mask.view(num_rows, vocab_size)


@dataclass
class SamplerOutput:
    """What one sampling step returns (all on the logits' device)."""

    sampled_token_ids: torch.Tensor  # [N] int64
    sampled_logprobs: torch.Tensor | None  # [N] fp32, raw-model logprob of each sampled token; None when no
    # row asked for logprobs (`SamplingBatch.want_logprobs`)
    top_logprob_ids: torch.Tensor | None  # [N, K] int64, most likely first; None when K == 0
    top_logprobs: torch.Tensor | None  # [N, K] fp32


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, then frequency/presence penalties: [N, V] fp32 -> new [N, V] fp32."""
    if batch.repetition_penalty is not None:
        assert batch.seen_token_mask is not None
        penalty = batch.repetition_penalty.unsqueeze(1)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_token_mask, penalised, logits)
    if batch.frequency_penalty is not None:
        assert batch.presence_penalty is not None and batch.output_token_counts is not None
        counts = batch.output_token_counts
        logits = (
            logits
            - batch.frequency_penalty.unsqueeze(1) * counts
            - batch.presence_penalty.unsqueeze(1) * (counts > 0).to(logits.dtype)
        )
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_k: int | None = None
) -> torch.Tensor:
    """Mask (-inf) tokens outside each row's top_k, then outside its top_p nucleus: [R, V] -> [R, V].

    top_k [R] int64 (V = disabled), top_p [R] fp32 (1 = disabled). Ties at the k-th value are kept. The most
    likely token is always kept. Without top_p only `torch.topk(max k)` runs, not a full sort; pass `max_k`
    (the max of top_k) when the host knows it, or it is read back from the device.
    """
    if top_k is None and top_p is None:
        return logits
    if top_p is None:
        assert top_k is not None
        if max_k is None:
            max_k = int(top_k.max())
        kth_value = logits.topk(max_k, dim=-1).values.gather(1, (top_k - 1).unsqueeze(1))
        return logits.masked_fill(logits < kth_value, float("-inf"))
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # ascending: the nucleus is a suffix
    if top_k is not None:
        kth_value = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside_nucleus = cumulative <= (1.0 - top_p).unsqueeze(1)
    outside_nucleus[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(outside_nucleus, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p * (max probability): [N, V] -> [N, V]; min_p [N]."""
    # p_i < min_p * p_max  <=>  logit_i < max_logit + log(min_p); log(0) = -inf masks nothing.
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def greedy_token_ids(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row, `[N, V]` -> `[N]` int64: the first maximum (the lowest id on a tie; a NaN counts as
    the maximum), as `argmax` gives. Through `max(dim)` because torch's CPU `argmax` is ~3x slower (5 ms against
    1.6 ms for 16 x 201k fp32 logits on one thread); same ids on every device."""
    return logits.max(dim=-1).indices


class Sampler:
    """Samples one token per row; see the module docstring. Stateless apart from the unseeded generator."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator  # for unseeded rows; None = torch's default generator of the device

    def __call__(
        self, logits: torch.Tensor, batch: SamplingBatch, allowed_token_mask: torch.Tensor | None = None
    ) -> SamplerOutput:
        """logits [N, V] fp32 (not modified), allowed_token_mask [N, V] bool or None -> SamplerOutput.

        Every row of `allowed_token_mask` must allow at least one token.
        """
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits {tuple(logits.shape)} do not match a batch of {batch.num_rows} rows")
        # Detached, nothing below records autograd history: what `torch.no_grad` would ensure, without entering
        # and leaving a grad mode every step (the engine calls this in inference mode anyway).
        logits = logits.detach().float()
        processed = self.process_logits(logits, batch, allowed_token_mask)
        sampled = self._sample(processed, batch)
        sampled_logprobs = top_logprob_ids = top_logprobs = None
        if batch.want_logprobs:  # a vocabulary-wide reduction: only when some row reports logprobs
            log_normaliser = torch.logsumexp(logits, dim=-1)  # [N]
            sampled_logprobs = logits.gather(1, sampled.unsqueeze(1)).squeeze(1) - log_normaliser
            if batch.max_num_logprobs > 0:
                top_values, top_logprob_ids = logits.topk(batch.max_num_logprobs, dim=-1)
                top_logprobs = top_values - log_normaliser.unsqueeze(1)
        return SamplerOutput(sampled, sampled_logprobs, top_logprob_ids, top_logprobs)

    @staticmethod
    def process_logits(
        logits: torch.Tensor, batch: SamplingBatch, allowed_token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mask, penalties, temperature, top_k/top_p, min_p: [N, V] fp32 -> a new [N, V] fp32 tensor."""
        if allowed_token_mask is not None:
            logits = logits.masked_fill(~allowed_token_mask, float("-inf"))
        logits = apply_penalties(logits, batch)
        if batch.all_greedy:
            return logits  # argmax is all that follows; temperature and filtering cannot change it
        assert batch.temperature is not None
        logits = logits / batch.temperature.unsqueeze(1)
        if batch.filter_rows is not None:
            if batch.filter_rows.numel() == batch.num_rows:
                logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p, batch.max_top_k)
            else:
                filtered = apply_top_k_top_p(logits[batch.filter_rows], batch.top_k, batch.top_p, batch.max_top_k)
                logits = logits.index_copy(0, batch.filter_rows, filtered)
        if batch.min_p is not None:
            logits = apply_min_p(logits, batch.min_p)
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Processed logits [N, V] -> token ids [N] int64: inverse CDF on random rows, argmax on greedy."""
        if batch.all_greedy:
            return greedy_token_ids(logits)
        num_rows = logits.shape[0]
        # One uniform in (0, 1] per row; seeded rows get theirs from (seed, step) alone.
        uniform = 1.0 - torch.rand(num_rows, dtype=torch.float64, device=logits.device, generator=self.generator)
        if batch.seeded_rows is not None:
            assert batch.seeded_uniforms is not None
            uniform.index_copy_(0, batch.seeded_rows, batch.seeded_uniforms)
        # Unnormalised probabilities (max 1) accumulated in fp64: an fp32 running sum over 200k tokens would
        # be off by ~1e-6, distorting rare tokens' odds.
        weights = (logits - logits.amax(dim=-1, keepdim=True)).to(torch.float64).exp_()
        cdf = weights.cumsum_(dim=-1)
        target = (uniform * cdf[:, -1]).unsqueeze(1)  # in (0, total]
        # The first index with cdf >= target: never a zero-probability token (its cdf equals its left
        # neighbour's), and never past the end (target <= total).
        sampled = torch.searchsorted(cdf, target).squeeze(1)
        if batch.any_greedy:
            assert batch.greedy is not None
            sampled = torch.where(batch.greedy, greedy_token_ids(logits), sampled)
        return sampled


@dataclass
class PromptLogprobs:
    """Logprobs of given next tokens at each position (scoring / echo)."""

    token_logprobs: torch.Tensor  # [T] fp32
    top_logprob_ids: torch.Tensor | None  # [T, k] int64, most likely first
    top_logprobs: torch.Tensor | None  # [T, k] fp32


@torch.no_grad()
def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_top_logprobs: int = 0, chunk_size: int = 1024
) -> PromptLogprobs:
    """Raw-model logprob of `next_token_ids[t]` under `logits[t]` (+ the top `num_top_logprobs` per position).

    logits [T, V] (any float dtype; computed in fp32, `chunk_size` rows at a time to bound the temporary
    memory), next_token_ids [T] int64. For a whole prompt p of length L:
    `compute_prompt_logprobs(logits[:L-1], p[1:])`; the first prompt token has no logprob (OpenAI: None).
    """
    num_positions = logits.shape[0]
    if next_token_ids.shape != (num_positions,):
        raise ValueError(f"next_token_ids {tuple(next_token_ids.shape)} do not match logits {tuple(logits.shape)}")
    next_token_ids = next_token_ids.to(device=logits.device, dtype=torch.int64)
    token_logprobs = torch.empty(num_positions, dtype=torch.float32, device=logits.device)
    top_ids = top_values = None
    if num_top_logprobs > 0:
        top_ids = torch.empty(num_positions, num_top_logprobs, dtype=torch.int64, device=logits.device)
        top_values = torch.empty(num_positions, num_top_logprobs, dtype=torch.float32, device=logits.device)
    for start in range(0, num_positions, chunk_size):
        end = min(start + chunk_size, num_positions)
        chunk = logits[start:end].float()
        log_normaliser = torch.logsumexp(chunk, dim=-1)
        token_logprobs[start:end] = chunk.gather(1, next_token_ids[start:end].unsqueeze(1)).squeeze(1) - log_normaliser
        if top_ids is not None and top_values is not None:
            values, ids = chunk.topk(num_top_logprobs, dim=-1)
            top_ids[start:end] = ids
            top_values[start:end] = values - log_normaliser.unsqueeze(1)
    return PromptLogprobs(token_logprobs, top_ids, top_values)
