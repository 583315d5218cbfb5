"""Prometheus metrics, one registry per app (text format at ``GET /metrics``).

Counters and the time-to-first-token histogram are kept by the HTTP layer;
queue depth, slots and KV-cache figures are read from the engine's
``get_model_info()`` at scrape time, when the engine reports them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..chunks import Timings

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# the engine's get_model_info()["scheduler"] / ["kv_cache"] keys each gauge reads (absent: skipped)
_ENGINE_GAUGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "queue_depth": ("scheduler", "requests waiting for a slot", ("waiting",)),
    "slots_busy": ("scheduler", "requests holding a slot", ("running",)),
    "max_queue": ("scheduler", "wait-queue capacity (MAX_QUEUE)", ("max_queue",)),
    "slots_total": ("kv_cache", "slots (N_PARALLEL)", ("n_parallel",)),
    "kv_cache_hits": ("kv_cache", "prompts that reused a cached prefix", ("hits",)),
    "kv_cache_misses": ("kv_cache", "prompts that reused no cached prefix", ("misses",)),
    "kv_cache_tokens_reused": ("kv_cache", "prompt tokens reused from the cache",
                               ("tokens_reused",)),
    "kv_cache_tokens_evaluated": ("kv_cache", "prompt tokens evaluated",
                                  ("tokens_evaluated",)),
    "kv_cache_tokens_in_use": ("kv_cache", "KV cells in use", ("tokens_in_use",)),
    "kv_cache_bytes": ("kv_cache", "memory of the KV cache", ("bytes",)),
}


def _first_number(source: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = source.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


class _EngineCollector(Collector):
    """Reads the engine's own figures at scrape time (defensively: keys may be absent)."""

    def __init__(self, info: Callable[[], dict[str, Any]]) -> None:
        self._info = info

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            info = self._info()
        except Exception:  # a scrape must never fail because the model is loading or gone
            return
        health = info.get("engine")
        if isinstance(health, Mapping):  # the service's engine health (see engine_health.py)
            for name, doc in (("failures", "times the engine stopped on an error"),
                              ("reloads", "model reloads after an engine failure")):
                value = _first_number(health, (name,))
                if value is not None:
                    yield CounterMetricFamily(f"ggufllm_engine_{name}", doc, value=value)
        for name, (section, doc, keys) in _ENGINE_GAUGES.items():
            part = info.get(section)
            value = _first_number(part, keys) if isinstance(part, Mapping) else None
            if value is not None:
                yield GaugeMetricFamily(f"ggufllm_engine_{name}", doc, value=value)


class Metrics:
    """The server's metrics.

    Args:
        info: returns the service's ``get_model_info()`` (read at scrape time).
    """

    def __init__(self, info: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ggufllm_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("ggufllm_prompt_tokens", "prompt tokens", registry=r)
        self.cached_tokens = Counter("ggufllm_prompt_tokens_cached",
                                     "prompt tokens reused from the KV cache", registry=r)
        self.generated_tokens = Counter("ggufllm_generated_tokens", "tokens generated",
                                        registry=r)
        self.cache_hits = Counter("ggufllm_kv_cache_hits",
                                  "requests whose prompt reused cached tokens", registry=r)
        self.ttft = Histogram("ggufllm_time_to_first_token_seconds",
                              "from the request to its first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.in_flight = Gauge("ggufllm_requests_in_flight", "generation requests being served",
                               registry=r)
        self.waiting = Gauge("ggufllm_requests_waiting_first_token",
                             "requests queued or evaluating their prompt (server view)",
                             registry=r)
        r.register(_EngineCollector(info))

    def finished(self, timings: Timings | None) -> None:
        """Counts one finished generation's tokens."""
        if timings is None:
            return
        self.prompt_tokens.inc(timings.n_prompt)
        self.cached_tokens.inc(timings.n_cached)
        self.generated_tokens.inc(timings.n_generated)
        if timings.n_cached > 0:
            self.cache_hits.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
