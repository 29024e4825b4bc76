"""How many bytes one decode step must read, and the fastest that step can be on a given memory bandwidth.

A decode step of a batch of `B` sequences runs one token per sequence through the whole model. At small
batches it is bound by memory: every weight it touches is read once per step, whatever `B` is, plus each
sequence's KV cache. The count per step:

- experts: for each layer, the experts the batch routes to (all `k` of them at `B = 1`; with uniform
  routing `E * (1 - (1 - k/E)^B)` distinct ones on average), each with its MXFP4 blocks (half a byte a
  weight), its e8m0 scales (one byte per 32 weights) and its biases;
- attention: q/k/v/o projections with biases, and the sinks;
- unembedding: the `lm_head` matrix (`vocab x hidden`);
- other: the router (weight and bias), the RMS norms, and the `B` embedding rows;
- KV cache: per sequence and layer, K and V of every position the query sees (the whole context on full
  layers, at most the window on sliding ones), plus the one position it writes.

For gpt-oss-120b at batch 1 and an empty context, with bf16 weights: 1.906 GB experts, 1.912 GB attention,
1.158 GB unembedding, 0.027 GB router and norms: 5.00 GB per token, so about 670 tokens/s at 3.35 TB/s
(an H100's peak) is the ceiling of a single stream.

Tensor parallel over N GPUs (`tensor_parallel_estimate`): each rank streams its share (1/N of the attention
heads and of the vocabulary, KV heads replicated past their count; its own experts, so at batch 1 a layer waits
for the rank that drew the most of the k routed experts), and every layer pays two fixed-order reductions (an
all-gather of fp32 partials, see engine/distributed/collectives.py), each a latency `collective_latency_s`
plus its bytes over the GPU link. Predictions, not measurements: nothing here has run on more than one GPU.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

from gptoss.engine.model.config import PRESETS, ModelConfig, preset
from gptoss.kernels.reference import MXFP4_BLOCK


@dataclass(frozen=True)
class DecodeStepBytes:
    """Bytes one decode step reads, by kind (see the module docstring for what each counts)."""

    experts: float
    attention: float
    unembedding: float
    other: float
    kv_cache: float
    batch_size: int
    context_len: int

    @property
    def weights(self) -> float:
        return self.experts + self.attention + self.unembedding + self.other

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache

    def as_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["weights"] = self.weights
        out["total"] = self.total
        return out


@dataclass(frozen=True)
class Ceiling:
    """The memory-bound floor of one decode step: `seconds` per step, `tokens_per_s` for the whole batch."""

    bytes_per_step: float
    bandwidth_bytes_per_s: float
    batch_size: int

    @property
    def seconds(self) -> float:
        return self.bytes_per_step / self.bandwidth_bytes_per_s

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size / self.seconds

    @property
    def tokens_per_s_per_seq(self) -> float:
        return 1.0 / self.seconds


def expected_active_experts(config: ModelConfig, num_tokens: int) -> float:
    """Distinct experts per layer that `num_tokens` tokens route to on average, routing being uniform.

    Each token picks `k` of `E` experts, so a given expert is missed by one token with probability
    `1 - k/E` and by all of them with `(1 - k/E)^T`.
    """
    experts, k = config.num_local_experts, config.num_experts_per_tok
    if num_tokens <= 0:
        return 0.0
    if num_tokens == 1:
        return float(k)
    return experts * (1.0 - (1.0 - k / experts) ** num_tokens)


def expert_bytes(config: ModelConfig, bias_bytes: float = 2) -> float:
    """One expert's MXFP4 `gate_up_proj` and `down_proj`: packed nibbles, e8m0 scales and biases."""
    hidden, inter = config.hidden_size, config.intermediate_size
    gate_up_weights = 2 * inter * hidden
    down_weights = hidden * inter
    weights = gate_up_weights + down_weights
    return weights / 2 + weights / MXFP4_BLOCK + (2 * inter + hidden) * bias_bytes


def attention_bytes(config: ModelConfig, weight_bytes: float = 2, sink_bytes: float = 4) -> float:
    """One layer's q/k/v/o weights and biases, and its sinks (kept in fp32 by the engine)."""
    hidden, q, kv = config.hidden_size, config.q_size, config.kv_size
    weights = (q + 2 * kv) * hidden + hidden * q
    biases = q + 2 * kv + hidden
    return (weights + biases) * weight_bytes + config.num_attention_heads * sink_bytes


def kv_bytes_per_seq(config: ModelConfig, context_len: int, kv_bytes: float = 2) -> float:
    """K and V one sequence reads (and its one new position writes) in a decode step at `context_len`.

    `context_len` counts the tokens already in the cache; the step's query sees those plus itself.
    """
    per_position = 2 * config.kv_size * kv_bytes  # K and V, all KV heads, one layer
    total = 0.0
    for layer in range(config.num_hidden_layers):
        seen = context_len + 1
        window = config.window_of_layer(layer)
        if window is not None:
            seen = min(seen, window)
        total += (seen + 1) * per_position  # the positions read, plus the one written
    return total


def decode_step_bytes(
    config: ModelConfig,
    batch_size: int = 1,
    context_len: int = 0,
    weight_bytes: float = 2,
    kv_bytes: float = 2,
) -> DecodeStepBytes:
    """Bytes a decode step of `batch_size` sequences, each with `context_len` cached tokens, reads.

    `weight_bytes` is the element size of the non-expert weights (2 for bf16, 4 for the CPU's fp32);
    `kv_bytes` the KV cache's. Expert biases follow `weight_bytes`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if context_len < 0:
        raise ValueError(f"context_len must be >= 0, got {context_len}")
    layers = config.num_hidden_layers
    hidden = config.hidden_size
    experts = layers * expected_active_experts(config, batch_size) * expert_bytes(config, weight_bytes)
    attention = layers * attention_bytes(config, weight_bytes)
    unembedding = config.vocab_size * hidden * weight_bytes
    router = layers * (config.num_local_experts * (hidden + 1)) * weight_bytes
    norms = (2 * layers + 1) * hidden * weight_bytes
    embedding_rows = batch_size * hidden * weight_bytes
    return DecodeStepBytes(
        experts=experts,
        attention=attention,
        unembedding=unembedding,
        other=router + norms + embedding_rows,
        kv_cache=batch_size * kv_bytes_per_seq(config, context_len, kv_bytes),
        batch_size=batch_size,
        context_len=context_len,
    )


def expected_max_experts_per_rank(config: ModelConfig, world_size: int) -> float:
    """At batch 1, the expected most experts one rank runs in a layer: `k` distinct experts drawn uniformly
    from `E`, split in `world_size` equal groups (the ranks). E[max] = sum over m of P(max > m), and
    P(max <= m) counts the draws with at most m per group: the x^k coefficient of (sum_c<=m C(g, c) x^c)^N."""
    experts, k = config.num_local_experts, config.num_experts_per_tok
    group = experts // world_size
    total = math.comb(experts, k)

    def draws_with_at_most(m: int) -> int:
        poly = [1]
        factor = [math.comb(group, c) for c in range(min(m, group) + 1)]
        for _ in range(world_size):
            nxt = [0] * min(len(poly) + len(factor) - 1, k + 1)
            for i, a in enumerate(poly):
                for j, b in enumerate(factor):
                    if i + j <= k:
                        nxt[i + j] += a * b
            poly = nxt
        return poly[k] if len(poly) > k else 0

    return sum(1 - draws_with_at_most(m) / total for m in range(k))


@dataclass(frozen=True)
class TensorParallelEstimate:
    """One rank of a tensor-parallel replica on paper: what it holds, what it caches, how fast batch 1 decodes."""

    world_size: int
    weight_bytes_per_rank: float  # resident: its experts, heads, vocabulary rows, replicated router and norms
    kv_bytes_per_token_per_rank: float  # K and V of one token in every layer, for the KV heads it holds
    kv_tokens_per_rank: int  # tokens its KV cache holds (every rank the same; all layers counted as full)
    decode_bytes_per_rank: float  # batch-1 step at the given context, expert count at its expected maximum
    collective_seconds: float  # batch-1 step: 2 reductions per layer, the embedding sum, the logits gather
    step_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.step_seconds


def tensor_parallel_estimate(
    config: ModelConfig,
    world_size: int,
    hbm_bytes: float = 80e9,
    memory_utilization: float = 0.9,
    reserve_bytes: float = 4e9,
    bandwidth_bytes_per_s: float = 3.35e12,
    link_bytes_per_s: float = 450e9,
    collective_latency_s: float = 10e-6,
    context_len: int = 0,
    weight_bytes: float = 2,
    kv_bytes: float = 2,
) -> TensorParallelEstimate:
    """Per-rank memory and batch-1 decode speed of gpt-oss split over `world_size` GPUs (see module docstring).

    Defaults: H100 SXM (80 GB, 3.35 TB/s HBM3 peak, NVLink 4 at 450 GB/s per direction), bf16 weights and KV
    cache, expert biases in fp32 (as loaded), `reserve_bytes` kept for activations and CUDA graphs, and
    ~10 us per small NCCL collective inside a CUDA graph (an assumption to replace with a measurement).
    """
    n = world_size
    layers, hidden, d = config.num_hidden_layers, config.hidden_size, config.head_dim
    q_heads = config.num_attention_heads // n
    kv_heads = max(1, config.num_key_value_heads // n)
    vocab_rows = -(-config.vocab_size // n)
    attention = (
        ((q_heads + 2 * kv_heads) * d * hidden + hidden * q_heads * d) * weight_bytes
        + ((q_heads + 2 * kv_heads) * d + hidden) * weight_bytes
        + q_heads * 4
    )
    router_norms = (
        layers * (config.num_local_experts * (hidden + 1) + 2 * hidden) * weight_bytes + hidden * weight_bytes
    )
    resident = (
        layers * attention
        + layers * (config.num_local_experts // n) * expert_bytes(config, bias_bytes=4)
        + 2 * vocab_rows * hidden * weight_bytes  # embedding and unembedding rows
        + router_norms
    )
    kv_per_token = layers * 2 * kv_heads * d * kv_bytes
    kv_tokens = int(max(0.0, hbm_bytes * memory_utilization - resident - reserve_bytes) // kv_per_token)

    seen = sum(
        min(context_len + 1, w) + 1 if (w := config.window_of_layer(i)) is not None else context_len + 2
        for i in range(layers)
    )
    decode = (
        layers * expected_max_experts_per_rank(config, n) * expert_bytes(config, bias_bytes=4)
        + layers * attention
        + vocab_rows * hidden * weight_bytes  # unembedding
        + router_norms
        + seen * 2 * kv_heads * d * kv_bytes
    )
    collectives = 0.0
    if n > 1:
        partial = hidden * 4  # one token's fp32 partial
        gather = collective_latency_s + (n - 1) * partial / link_bytes_per_s
        embedding = collective_latency_s + 2 * (n - 1) / n * hidden * weight_bytes / link_bytes_per_s
        logits = collective_latency_s + (n - 1) * vocab_rows * 4 / link_bytes_per_s
        collectives = 2 * layers * gather + embedding + logits
    step = decode / bandwidth_bytes_per_s + collectives
    return TensorParallelEstimate(n, resident, kv_per_token, kv_tokens, decode, collectives, step)


def splits_over(config: ModelConfig, world_size: int) -> bool:
    """Whether heads and experts split evenly over `world_size` ranks (KV heads split or replicate)."""
    kv = config.num_key_value_heads
    return (
        config.num_attention_heads % world_size == 0
        and config.num_local_experts % world_size == 0
        and (kv % world_size == 0 or world_size % kv == 0)
    )


def format_tensor_parallel(estimates: list[TensorParallelEstimate]) -> str:
    """A table: one line per world size (KV tokens: what every rank, hence the replica, holds)."""
    header = "TP | weights/rank GB | KV/token/rank KB | KV tokens | batch-1 GB/rank | collectives ms | step ms | tok/s"
    lines = [header]
    for e in estimates:
        lines.append(
            " | ".join(
                [
                    f"{e.world_size:2d}",
                    f"{e.weight_bytes_per_rank / 1e9:15.2f}",
                    f"{e.kv_bytes_per_token_per_rank / 1e3:16.1f}",
                    f"{e.kv_tokens_per_rank:9,d}",
                    f"{e.decode_bytes_per_rank / 1e9:15.3f}",
                    f"{e.collective_seconds * 1e3:14.3f}",
                    f"{e.step_seconds * 1e3:7.3f}",
                    f"{e.tokens_per_s:5.0f}",
                ]
            )
        )
    return "\n".join(lines)


def decode_ceiling(step: DecodeStepBytes, bandwidth_bytes_per_s: float) -> Ceiling:
    """The fastest a decode step can run when it only has to stream its bytes at `bandwidth_bytes_per_s`."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_bytes_per_s}")
    return Ceiling(step.total, bandwidth_bytes_per_s, step.batch_size)


def format_breakdown(step: DecodeStepBytes, bandwidth_bytes_per_s: float | None = None) -> str:
    """A few human lines: GB by kind, total, and the ceiling when a bandwidth is given."""
    scale, unit = (1e9, "GB") if step.total >= 1e8 else (1e6, "MB")
    lines = [
        f"decode step, batch {step.batch_size}, context {step.context_len}:",
        f"  experts (MXFP4 + scales + bias) {step.experts / scale:8.3f} {unit}",
        f"  attention projections           {step.attention / scale:8.3f} {unit}",
        f"  unembedding                     {step.unembedding / scale:8.3f} {unit}",
        f"  router, norms, embedding rows   {step.other / scale:8.3f} {unit}",
        f"  KV cache                        {step.kv_cache / scale:8.3f} {unit}",
        f"  total                           {step.total / scale:8.3f} {unit}",
    ]
    if bandwidth_bytes_per_s:
        ceiling = decode_ceiling(step, bandwidth_bytes_per_s)
        lines.append(
            f"  at {bandwidth_bytes_per_s / 1e9:.1f} GB/s: {ceiling.seconds * 1e3:.3f} ms/step, "
            f"{ceiling.tokens_per_s:.1f} tokens/s ({ceiling.tokens_per_s_per_seq:.1f} per sequence)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m gptoss.engine.model.roofline --preset gpt-oss-120b --batch 1 --context 4096 --bandwidth-gbs 3350`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-oss-120b", choices=sorted(PRESETS))
    parser.add_argument("--config", default=None, help="a checkpoint folder or config.json (overrides --preset)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=0)
    parser.add_argument("--weight-bytes", type=float, default=2)
    parser.add_argument("--kv-bytes", type=float, default=2)
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth in GB/s")
    parser.add_argument(
        "--tensor-parallel",
        default=None,
        help="comma-separated world sizes (e.g. 1,2,4,8): per-rank memory and batch-1 speed on H100s instead",
    )
    args = parser.parse_args(argv)
    config = ModelConfig.from_json(args.config) if args.config else preset(args.preset)
    if args.tensor_parallel:
        bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else 3.35e12
        sizes = [int(n) for n in args.tensor_parallel.split(",")]
        print(
            format_tensor_parallel(
                [
                    tensor_parallel_estimate(
                        config, n, bandwidth_bytes_per_s=bandwidth, context_len=args.context, kv_bytes=args.kv_bytes
                    )
                    for n in sizes
                ]
            )
        )
        return 0
    step = decode_step_bytes(config, args.batch, args.context, args.weight_bytes, args.kv_bytes)
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else None
    print(format_breakdown(step, bandwidth))
    return 0


__all__ = [
    "Ceiling",
    "DecodeStepBytes",
    "attention_bytes",
    "decode_ceiling",
    "decode_step_bytes",
    "expected_active_experts",
    "expected_max_experts_per_rank",
    "expert_bytes",
    "format_breakdown",
    "format_tensor_parallel",
    "kv_bytes_per_seq",
    "splits_over",
    "tensor_parallel_estimate",
]

if __name__ == "__main__":
    raise SystemExit(main())
