"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand (no dependency).

The server counts requests by endpoint and status and times tokens (time to first token, inter-token
latency); the engine's own numbers (running / waiting requests, KV blocks used / free, prefix-cache hit
tokens, ...) are read from `engine.metrics()` at scrape time and exported as gauges.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
THROUGHPUT_WINDOW_S = 10.0
PREFIX = "gptoss"


class Histogram:
    """A cumulative-bucket histogram (Prometheus semantics: `le` upper bounds, plus `+Inf`, sum, count)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServerMetrics:
    """What the server measures itself. All methods are called from the event loop thread (no locks)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.aborted_total = 0
        self.in_flight = 0
        self._recent_tokens: deque[tuple[float, int]] = deque()

    def count_request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def observe_tokens(self, count: int, now: float | None = None) -> None:
        """`count` new generated tokens (for the total and the tokens/s over the last few seconds)."""
        now = time.monotonic() if now is None else now
        self.generation_tokens_total += count
        self._recent_tokens.append((now, count))
        self._trim(now)

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        return sum(c for _, c in self._recent_tokens) / THROUGHPUT_WINDOW_S

    def _trim(self, now: float) -> None:
        while self._recent_tokens and self._recent_tokens[0][0] < now - THROUGHPUT_WINDOW_S:
            self._recent_tokens.popleft()

    def render(
        self, engine_stats: dict[str, Any] | None = None, replica_stats: list[dict[str, Any]] | None = None
    ) -> str:
        """The whole exposition text: server counters and histograms, then the engine's numeric stats (summed
        over data-parallel replicas), then with several replicas each one's as `..._engine_replica_*{replica=}`."""
        p = PREFIX
        lines = [
            f"# HELP {p}_requests_total HTTP requests by endpoint and status code.",
            f"# TYPE {p}_requests_total counter",
        ]
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'{p}_requests_total{{endpoint="{_escape(endpoint)}",status="{status}"}} {count}')
        scalars = [
            ("requests_in_flight", "gauge", "Generation requests the server is handling now.", self.in_flight),
            (
                "requests_aborted_total",
                "counter",
                "Requests aborted (client gone or stopped early).",
                self.aborted_total,
            ),
            ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens_total),
            ("generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens_total),
            (
                "generation_tokens_per_second",
                "gauge",
                f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:g} s.",
                self.tokens_per_second(),
            ),
        ]
        for name, kind, help_text, value in scalars:
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}", f"{p}_{name} {value}"]
        for name, help_text, hist in (
            ("time_to_first_token_seconds", "Time from request arrival to its first generated token.", self.ttft),
            ("inter_token_latency_seconds", "Time between consecutive generated tokens of a request.", self.itl),
            ("request_latency_seconds", "Time from request arrival to its last token.", self.e2e),
        ):
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} histogram"]
            lines += hist.lines(f"{p}_{name}")
        for key, value in sorted((engine_stats or {}).items()):
            lines += _engine_stat_lines(f"{p}_engine_{_metric_name(key)}", str(key), value)
        for key in sorted(replica_stats[0] if replica_stats else ()):
            per_replica = [(f'replica="{r}"', stats.get(key)) for r, stats in enumerate(replica_stats or [])]
            lines += _engine_stat_lines(f"{p}_engine_replica_{_metric_name(key)}", str(key), per_replica)
        return "\n".join(lines) + "\n"


# Labels of the engine's dict-valued stats: KV block counts are per block group, finished requests per reason.
_DICT_LABELS = {"requests_finished_total": "reason"}


def _metric_name(key: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in key)


def _engine_stat_lines(name: str, key: str, value: Any) -> list[str]:
    """One engine stat as a gauge/counter; dict values become one labelled sample per key. A list of
    (label, value) pairs is one stat per replica (`label` is `replica="r"`)."""
    kind = "counter" if key.endswith("_total") else "gauge"
    per_replica = value if isinstance(value, list) else [("", value)]
    samples = []
    for replica, v in per_replica:
        if isinstance(v, dict):
            label = _DICT_LABELS.get(key, "group")
            samples += [
                (x, ",".join(filter(None, (replica, f'{label}="{_escape(str(k))}"')))) for k, x in sorted(v.items())
            ]
        else:
            samples.append((v, replica))
    samples = [(v, f"{{{labels}}}" if labels else "") for v, labels in samples]
    samples = [(v, labels) for v, labels in samples if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not samples:
        return []
    out = [f"# HELP {name} Engine statistic {key}.", f"# TYPE {name} {kind}"]
    out += [f"{name}{labels} {v}" for v, labels in samples]
    return out
