"""server/metrics.py: the /metrics exposition through prometheus_client (an app-owned registry), the engine's
stats summed and per replica, and the vLLM-named series beside ours."""

from __future__ import annotations

import re
from pathlib import Path

from gptoss.engine.metrics import MetricsSnapshot
from gptoss.server.metrics import ServerMetrics
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the exposition by (name, labels); parsing it checks the text format too."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def replica(running: int, hits: int, finished: dict[str, int]) -> dict:
    return MetricsSnapshot(
        num_running=running,
        kv_blocks_total={"full_attention": 8},
        kv_blocks_used={"full_attention": running},
        kv_cache_usage=running / 8,
        prompt_tokens_total=10,
        prefix_hit_tokens_total=hits,
        requests_finished_total=finished,
    ).to_dict()


def test_server_counters_and_histograms_in_their_own_registry() -> None:
    first, second = ServerMetrics(), ServerMetrics()  # two apps in one process: no duplicate-name error
    for ttft in (0.02, 0.3, 4.0):
        first.count_request("/v1/chat/completions", 200)
        first.ttft.observe(ttft)
        first.e2e.observe(ttft + 1)
    first.count_request("/v1/chat/completions", 400)
    first.observe_tokens(6)
    first.in_flight = 2
    got = samples(first.render({}, None, "m"))
    chat = {("endpoint", "/v1/chat/completions")}
    assert got["gptoss_requests_total", frozenset(chat | {("status", "200")})] == 3
    assert got["gptoss_requests_total", frozenset(chat | {("status", "400")})] == 1
    assert got["gptoss_time_to_first_token_seconds_count", frozenset()] == 3
    assert got["gptoss_time_to_first_token_seconds_bucket", frozenset({("le", "0.25")})] == 1
    assert got["gptoss_time_to_first_token_seconds_bucket", frozenset({("le", "+Inf")})] == 3
    assert abs(got["gptoss_time_to_first_token_seconds_sum", frozenset()] - 4.32) < 1e-9
    assert got["vllm:time_to_first_token_seconds_count", frozenset({("model_name", "m")})] == 3
    assert got["vllm:e2e_request_latency_seconds_count", frozenset({("model_name", "m")})] == 3
    assert got["gptoss_requests_in_flight", frozenset()] == 2
    assert got["gptoss_generation_tokens_total", frozenset()] == 6
    assert got["gptoss_generation_tokens_per_second", frozenset()] == 0.6
    assert samples(second.render({}, None, "m"))["gptoss_time_to_first_token_seconds_count", frozenset()] == 0


def test_engine_stats_summed_per_replica_and_under_vllm_names() -> None:
    metrics = ServerMetrics()
    replicas = [replica(1, 4, {"stop": 2}), replica(3, 0, {"stop": 1, "length": 1})]
    total = {**replica(4, 4, {"stop": 3, "length": 1}), "kv_cache_usage": 3 / 8}
    got = samples(metrics.render(total, replicas, "gpt-oss-120b"))
    assert got["gptoss_engine_num_running", frozenset()] == 4
    assert got["gptoss_engine_prefix_hit_tokens_total", frozenset()] == 4
    assert got["gptoss_engine_requests_finished_total", frozenset({("reason", "stop")})] == 3
    assert got["gptoss_engine_kv_blocks_total", frozenset({("group", "full_attention")})] == 8
    for r, running in enumerate((1, 3)):
        label = ("replica", str(r))
        assert got["gptoss_engine_replica_num_running", frozenset({label})] == running
        assert got["gptoss_engine_replica_kv_blocks_used", frozenset({label, ("group", "full_attention")})] == running
        vllm = frozenset({("model_name", "gpt-oss-120b"), ("engine", str(r))})
        assert got["vllm:num_requests_running", vllm] == running
        assert got["vllm:kv_cache_usage_perc", vllm] == running / 8
        assert got["vllm:prefix_cache_queries_total", vllm] == 10
    one = frozenset({("model_name", "gpt-oss-120b"), ("engine", "1")})
    assert got["vllm:prefix_cache_hits_total", one] == 0
    assert got["vllm:request_success_total", one | {("finished_reason", "length")}] == 1
    # kv_blocks_total is a capacity: a gauge, though its name ends in _total.
    kinds = {f.name: f.type for f in text_string_to_metric_families(metrics.render(total, replicas, "m"))}
    assert kinds["gptoss_engine_kv_blocks_total"] == "gauge"
    assert kinds["gptoss_engine_prefix_hit_tokens"] == "counter"
    assert kinds["vllm:time_to_first_token_seconds"] == "histogram"


def test_without_replicas_vllm_series_are_engine_0() -> None:
    got = samples(ServerMetrics().render(replica(2, 1, {}), None, "m"))
    assert got["vllm:num_requests_running", frozenset({("model_name", "m"), ("engine", "0")})] == 2
    assert not any(name.startswith("gptoss_engine_replica_") for name, _ in got)


def test_readme_vllm_names_are_exported() -> None:
    """Every vLLM name README's metrics table documents is a series of /metrics, and so is every ours."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| vLLM (v1), also exported |") :].split("\n\n")[0]
    documented = set(re.findall(r"`((?:vllm:|gptoss_)[a-z0-9_:]+)", table))
    assert len(documented) >= 20
    text = ServerMetrics().render(replica(1, 0, {"stop": 1}), None, "m")
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    exported |= {f.name for f in text_string_to_metric_families(text)}
    assert documented <= exported, documented - exported
