"""Engine counters for the server's /metrics: a `MetricsSnapshot` is an immutable picture taken after a step.

The engine thread updates `EngineMetrics` and publishes a fresh snapshot after every step; readers on other
threads only ever see a whole snapshot (replacing one attribute is atomic), so no lock is needed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class MetricsSnapshot:
    """Gauges (now) and counters (since start). Throughputs are over the last `window_s` seconds."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: dict[str, int] = field(default_factory=dict)  # per block group
    kv_blocks_used: dict[str, int] = field(default_factory=dict)  # referenced by a sequence
    kv_blocks_free: dict[str, int] = field(default_factory=dict)  # free, cached prefixes included
    kv_blocks_cached: dict[str, int] = field(default_factory=dict)  # holding a reusable prefix block
    kv_cache_usage: float = 0.0  # used / total of the fullest group, 0..1
    prompt_tokens_total: int = 0  # prompt tokens of admitted requests (prefix hits included)
    prefix_hit_tokens_total: int = 0  # prompt tokens served from the prefix cache
    generation_tokens_total: int = 0  # sampled tokens
    num_preemptions_total: int = 0
    requests_finished_total: dict[str, int] = field(default_factory=dict)  # by finish reason
    step_errors_total: int = 0
    steps_total: int = 0
    prompt_tokens_per_s: float = 0.0  # prefill tokens computed per second (hits excluded)
    generation_tokens_per_s: float = 0.0
    uptime_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineMetrics:
    """Counters the engine updates as it runs (engine thread only)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.start_time = time.monotonic()
        self.prompt_tokens_total = 0
        self.prefix_hit_tokens_total = 0
        self.generation_tokens_total = 0
        self.step_errors_total = 0
        self.steps_total = 0
        self.requests_finished_total: dict[str, int] = {}
        # (time, prefill tokens computed, tokens sampled) per recent step
        self._recent: deque[tuple[float, int, int]] = deque()

    def record_admission(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prompt_tokens_total += num_prompt_tokens
        self.prefix_hit_tokens_total += num_hit_tokens

    def record_step(self, num_prefill_tokens: int, num_generated: int) -> None:
        now = time.monotonic()
        self.steps_total += 1
        self.generation_tokens_total += num_generated
        self._recent.append((now, num_prefill_tokens, num_generated))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def record_finished(self, reason: str) -> None:
        self.requests_finished_total[reason] = self.requests_finished_total.get(reason, 0) + 1

    def snapshot(
        self, num_running: int, num_waiting: int, pools: dict[str, Any], num_preemptions: int
    ) -> MetricsSnapshot:
        """`pools`: group name -> `BlockPool` (read for its counts)."""
        now = time.monotonic()
        recent = [r for r in self._recent if r[0] >= now - self.window_s]
        span = max(now - recent[0][0], 1e-3) if len(recent) > 1 else 0.0
        prefill = sum(r[1] for r in recent[1:]) / span if span else 0.0
        generated = sum(r[2] for r in recent[1:]) / span if span else 0.0
        total = {g: p.num_blocks for g, p in pools.items()}
        free = {g: p.num_free_blocks for g, p in pools.items()}
        return MetricsSnapshot(
            num_running=num_running,
            num_waiting=num_waiting,
            kv_blocks_total=total,
            kv_blocks_used={g: total[g] - free[g] for g in pools},
            kv_blocks_free=free,
            kv_blocks_cached={g: len(p.cached) for g, p in pools.items()},
            kv_cache_usage=max(((total[g] - free[g]) / total[g] for g in pools), default=0.0),
            prompt_tokens_total=self.prompt_tokens_total,
            prefix_hit_tokens_total=self.prefix_hit_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions_total=num_preemptions,
            requests_finished_total=dict(self.requests_finished_total),
            step_errors_total=self.step_errors_total,
            steps_total=self.steps_total,
            prompt_tokens_per_s=prefill,
            generation_tokens_per_s=generated,
            uptime_s=now - self.start_time,
        )
