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
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    config = ModelConfig.from_json(args.config) if args.config else preset(args.preset)
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
    "expert_bytes",
    "format_breakdown",
    "kv_bytes_per_seq",
]

if __name__ == "__main__":
    raise SystemExit(main())
