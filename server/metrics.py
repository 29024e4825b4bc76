"""Server metrics for `GET /metrics`, exposed through `prometheus_client` in a registry the app owns.

The server counts requests by endpoint and status and times tokens (time to first token, inter-token latency,
end-to-end latency) with `prometheus_client` metric objects; the engine's own numbers (running / waiting
requests, KV blocks used / free, prefix-cache hit tokens, ...) are read from `engine.metrics()` at scrape time
by a custom collector. The same numbers are exported a second time under vLLM's names (`vllm:*`, labelled
`model_name` and `engine` as vLLM labels them) so that dashboards built for vLLM read them unchanged.

Processes: the engine counters of data-parallel replicas are counted in the replica processes but forwarded to
the server with every call over their pipes (engine/data_parallel.py), and tensor-parallel ranks other than 0
count nothing (rank 0 schedules and samples), so every number lives in the server process at scrape time: the
sums and the per-replica series (`gptoss_engine_replica_*{replica="r"}`) come from those forwarded snapshots
and `prometheus_client`'s multiprocess mode (mmap files per process) has nothing to add.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
THROUGHPUT_WINDOW_S = 10.0
PREFIX = "gptoss"
# The Prometheus text format every scraper reads (prometheus_client's newest default, 1.0.0, is the same text
# but older Prometheus servers do not know the version string).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's (v1) names of the engine's numbers: (name, kind, our engine stat, meaning). README lists the pairs.
_USAGE = "Used KV blocks / total, 0..1 (the fullest block group)."
VLLM_ENGINE_SERIES = (
    ("vllm:num_requests_running", "gauge", "num_running", "Requests in the batch."),
    ("vllm:num_requests_waiting", "gauge", "num_waiting", "Requests queued."),
    ("vllm:kv_cache_usage_perc", "gauge", "kv_cache_usage", _USAGE),
    ("vllm:gpu_cache_usage_perc", "gauge", "kv_cache_usage", _USAGE + " vLLM v0's name."),
    ("vllm:prefix_cache_queries", "counter", "prompt_tokens_total", "Prompt tokens looked up in the prefix cache."),
    ("vllm:prefix_cache_hits", "counter", "prefix_hit_tokens_total", "Prompt tokens served from the prefix cache."),
    ("vllm:num_preemptions", "counter", "num_preemptions_total", "Sequences preempted (KV cache full)."),
    ("vllm:prompt_tokens", "counter", "prompt_tokens_total", "Prompt tokens of admitted requests."),
    ("vllm:generation_tokens", "counter", "generation_tokens_total", "Generated tokens."),
)
# Labels of the engine's dict-valued stats: KV block counts are per block group, finished requests per reason.
_DICT_LABELS = {"requests_finished_total": "reason"}
# Engine stats named `*_total` that are gauges, not counters (a capacity, not a count of events).
_GAUGE_TOTALS = {"kv_blocks_total"}


class ServerMetrics:
    """What the server measures itself, in its own `CollectorRegistry` (not the process-wide default, so that
    several apps in one process, as in the tests, do not collide). Called from the event loop thread only."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        p, r = PREFIX, self.registry
        self.requests = Counter(
            f"{p}_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{p}_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{p}_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Generated tokens.", registry=r)
        self.aborted = Counter(f"{p}_requests_aborted", "Requests aborted (client gone or stopped early).", registry=r)
        # Admission (server/admission.py) keeps the count as a plain int it compares with its limit; the gauge
        # reads it at scrape time.
        self.in_flight = 0
        Gauge(f"{p}_requests_in_flight", "Generation requests the server is handling now.", registry=r).set_function(
            lambda: self.in_flight
        )
        Gauge(
            f"{p}_generation_tokens_per_second",
            f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:g} s.",
            registry=r,
        ).set_function(self.tokens_per_second)
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._engine = EngineCollector(self)
        r.register(self._engine)

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe_tokens(self, count: int, now: float | None = None) -> None:
        """`count` new generated tokens (for the total and the tokens/s over the last few seconds)."""
        now = time.monotonic() if now is None else now
        self.generation_tokens.inc(count)
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
        self,
        engine_stats: dict[str, Any] | None = None,
        replica_stats: list[dict[str, Any]] | None = None,
        model_name: str = "",
    ) -> str:
        """The whole exposition text: server counters and histograms, then the engine's numeric stats (summed
        over data-parallel replicas), with several replicas each one's as `..._engine_replica_*{replica=}`,
        then the vLLM-named series. The engine's numbers are those passed here, read at this scrape."""
        self._engine.scrape = (engine_stats or {}, replica_stats, model_name)
        try:
            return generate_latest(self.registry).decode()
        finally:
            self._engine.scrape = None


def _metric_name(key: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in key)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class EngineCollector(Collector):
    """The engine's stats of the current scrape as metric families (a custom collector: the numbers are read
    from the engine's snapshot, not counted here), plus the vLLM-named series built from them and from the
    server's histograms."""

    def __init__(self, server: ServerMetrics) -> None:
        self.server = server
        self.scrape: tuple[dict[str, Any], list[dict[str, Any]] | None, str] | None = None

    def describe(self) -> list[Metric]:
        # Nothing fixed to describe: the families depend on the engine's stats (keeps `auto_describe` from
        # calling `collect` at registration).
        return []

    def collect(self) -> Iterator[Metric]:
        if self.scrape is None:
            return
        stats, replicas, model_name = self.scrape
        for key, value in sorted(stats.items()):
            family = _engine_family(f"{PREFIX}_engine_{_metric_name(key)}", key, [((), value)], ())
            if family is not None:
                yield family
        for key in sorted(replicas[0] if replicas else ()):
            per_replica = [((str(r),), s.get(key)) for r, s in enumerate(replicas or [])]
            family = _engine_family(f"{PREFIX}_engine_replica_{_metric_name(key)}", key, per_replica, ("replica",))
            if family is not None:
                yield family
        yield from self._vllm(stats, replicas, model_name)

    def _vllm(self, stats: dict[str, Any], replicas: list[dict[str, Any]] | None, model_name: str) -> Iterator[Metric]:
        """vLLM's (v1) names for the same numbers, labelled as vLLM labels them: `model_name`, and `engine` (the
        data-parallel replica) on the engine's series. README lists the pairs."""
        engines = [(str(r), s) for r, s in enumerate(replicas)] if replicas else [("0", stats)]

        for name, kind, key, doc in VLLM_ENGINE_SERIES:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = cls(name, doc, labels=["model_name", "engine"])
            for engine, s in engines:
                family.add_metric([model_name, engine], float(s.get(key, 0)))
            yield family
        success = CounterMetricFamily(
            "vllm:request_success", "Finished requests by reason.", labels=["model_name", "engine", "finished_reason"]
        )
        for engine, s in engines:
            for reason, count in sorted((s.get("requests_finished_total") or {}).items()):
                success.add_metric([model_name, engine, str(reason)], float(count))
        yield success
        # The server's latency histograms, renamed (the requests of all replicas: the server times them).
        server = self.server
        for vllm_name, hist in (
            ("vllm:time_to_first_token_seconds", server.ttft),
            ("vllm:inter_token_latency_seconds", server.itl),
            ("vllm:time_per_output_token_seconds", server.itl),  # vLLM's older name for the same
            ("vllm:e2e_request_latency_seconds", server.e2e),
        ):
            yield from _renamed(hist, vllm_name, {"model_name": model_name})


def _renamed(hist: Histogram, name: str, labels: dict[str, str]) -> Iterator[Metric]:
    """`hist`'s samples under another family name, with `labels` added."""
    for family in hist.collect():
        out = Metric(name, family.documentation, family.type)
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out.add_sample(name + sample.name[len(family.name) :], {**labels, **sample.labels}, sample.value)
        yield out


def _engine_family(
    name: str, key: str, values: list[tuple[tuple[str, ...], Any]], labels: tuple[str, ...]
) -> Metric | None:
    """One engine stat as a gauge or counter family; dict values become one labelled sample per key (KV block
    counts per block group, finished requests per reason). `values`: (label values, stat) pairs, one per
    replica for the per-replica families. Non-numeric stats give None."""
    counter = key.endswith("_total") and key not in _GAUGE_TOTALS
    keyed = any(isinstance(value, dict) for _, value in values)
    names = [*labels, _DICT_LABELS.get(key, "group")] if keyed else list(labels)
    samples: list[tuple[list[str], float]] = []
    for label_values, value in values:
        if keyed and isinstance(value, dict):
            samples += [([*label_values, str(k)], float(v)) for k, v in sorted(value.items()) if _number(v)]
        elif not keyed and _number(value):
            samples.append((list(label_values), float(value)))
    if not samples:
        return None
    doc = f"Engine statistic {key}."
    family: Metric = (
        CounterMetricFamily(name, doc, labels=names) if counter else GaugeMetricFamily(name, doc, labels=names)
    )
    for label_values, value in samples:
        family.add_metric(label_values, value)  # type: ignore[attr-defined]
    return family
