"""The serving metrics, defined in one place and recorded through a factory (no Ray here).

`ServingMetrics(factory)` creates every metric once through `factory(kind, name, description,
boundaries)` (kind: `counter`, `gauge` or `histogram`); the model replica passes a factory that
builds `ray.serve.metrics` objects (chameleon.serving.app), which Ray exports to Prometheus with
the deployment, replica and application tags. Without a factory (`NULL_METRICS`: tests, offline
use) recording does nothing. Names follow Prometheus conventions (`_seconds`, `_total` added by
the exporter for counters).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

MetricFactory = Callable[[str, str, str, Sequence[float] | None], Any]
"""(kind, name, description, histogram boundaries) -> object with inc / set / observe."""

# name -> (kind, description, boundaries)
DEFINITIONS: dict[str, tuple[str, str, Sequence[float] | None]] = {
    "chameleon_time_to_first_token_seconds": (
        "histogram",
        "Time from a request reaching the engine to its first generated token.",
        LATENCY_BOUNDARIES_S,
    ),
    "chameleon_inter_token_latency_seconds": (
        "histogram",
        "Time between two consecutive generated tokens of one request.",
        LATENCY_BOUNDARIES_S,
    ),
    "chameleon_queue_wait_seconds": (
        "histogram",
        "Time a request waited for a place in the running batch.",
        LATENCY_BOUNDARIES_S,
    ),
    "chameleon_request_latency_seconds": (
        "histogram",
        "Time from admission to the last token of a request.",
        LATENCY_BOUNDARIES_S,
    ),
    "chameleon_batch_size": ("histogram", "Rows in a decode step.", BATCH_BOUNDARIES),
    "chameleon_running_requests": ("gauge", "Requests in the running batch.", None),
    "chameleon_waiting_requests": ("gauge", "Requests waiting for a place in the running batch.", None),
    "chameleon_generated_tokens": ("counter", "Generated tokens.", None),
    "chameleon_prompt_tokens": ("counter", "Prompt tokens of admitted requests.", None),
    "chameleon_requests": ("counter", "Requests that finished, by finish reason.", None),
    "chameleon_edit_cache_hits": ("counter", "Group edits found resident in the edit cache.", None),
    "chameleon_edit_cache_misses": ("counter", "Group edits loaded from the store.", None),
    "chameleon_edit_cache_evictions": ("counter", "Edit cache rows reused for another edit.", None),
    "chameleon_run_switches": (
        "counter",
        "Times the running batch switched to another bank layout (run).",
        None,
    ),
}


class ServingMetrics:
    """Every serving metric; methods record one event each."""

    def __init__(self, factory: MetricFactory | None = None) -> None:
        self.enabled = factory is not None
        self.m: dict[str, Any] = {}
        if factory is not None:
            for name, (kind, desc, bounds) in DEFINITIONS.items():
                self.m[name] = factory(kind, name, desc, bounds)
        self._cache_seen: dict[int, tuple[int, int, int]] = {}

    def _observe(self, name: str, value: float) -> None:
        if self.enabled:
            self.m[name].observe(value)

    def _inc(self, name: str, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if self.enabled and value:
            self.m[name].inc(value, tags=tags) if tags else self.m[name].inc(value)

    def ttft(self, seconds: float) -> None:
        self._observe("chameleon_time_to_first_token_seconds", seconds)

    def inter_token(self, seconds: float) -> None:
        self._observe("chameleon_inter_token_latency_seconds", seconds)

    def queue_wait(self, seconds: float) -> None:
        self._observe("chameleon_queue_wait_seconds", seconds)

    def batch_size(self, rows: int) -> None:
        self._observe("chameleon_batch_size", rows)

    def engine_step(self, running: int, waiting: int) -> None:
        if self.enabled:
            self.m["chameleon_running_requests"].set(running)
            self.m["chameleon_waiting_requests"].set(waiting)

    def generated_tokens(self, n: int) -> None:
        self._inc("chameleon_generated_tokens", n)

    def run_switch(self) -> None:
        self._inc("chameleon_run_switches")

    def request_done(self, prompt_tokens: int, latency_s: float, finish_reason: str) -> None:
        self._inc("chameleon_prompt_tokens", prompt_tokens)
        self._observe("chameleon_request_latency_seconds", latency_s)
        if self.enabled:
            self.m["chameleon_requests"].inc(1, tags={"finish_reason": finish_reason})

    def edit_cache(self, cache_id: int, hits: int, misses: int, evictions: int) -> None:
        """Record an edit cache's cumulative counts (the increase since the last call)."""
        h0, m0, e0 = self._cache_seen.get(cache_id, (0, 0, 0))
        self._cache_seen[cache_id] = (hits, misses, evictions)
        self._inc("chameleon_edit_cache_hits", hits - h0)
        self._inc("chameleon_edit_cache_misses", misses - m0)
        self._inc("chameleon_edit_cache_evictions", evictions - e0)


NULL_METRICS = ServingMetrics()
"""Records nothing (no factory)."""

TAG_KEYS: dict[str, tuple[str, ...]] = {"chameleon_requests": ("finish_reason",)}
"""Tag keys a factory must declare per metric (besides the ones Serve adds)."""

PROMETHEUS_PREFIX = "ray_"
"""Ray's exporter puts every application metric under its `ray_` namespace."""


def prometheus_series(name: str) -> tuple[str, ...]:
    """The series a metric of DEFINITIONS appears as on a Ray node's Prometheus endpoint (checked
    against Ray 2.60's exporter: `ray_` prefix; counters end in `_total`; histograms are
    `_bucket`, `_sum` and `_count`). PromQL and dashboards query these names."""
    kind = DEFINITIONS[name][0]
    full = PROMETHEUS_PREFIX + name
    if kind == "counter":
        return (full + "_total",)
    if kind == "histogram":
        return (full + "_bucket", full + "_sum", full + "_count")
    return (full,)
