"""Prometheus metrics of one server, in a registry of its own (several servers may share a process).

What an operator of a multi-adapter server watches, as vLLM and LoRAX export it: call counts and latency by
status, time to first token and between tokens, token throughput by adapter kind (not by adapter name: a store
may hold thousands), engine load and key/value cache reservation, and each adapter tier's hits, loads,
evictions and bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quiver.server.engine.adapter_tiers import DeviceAdapters, HostAdapterCache
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.engine.request import GenerationRequest

# Generation requests run from milliseconds (one token) to minutes (long outputs on CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
# One decode step: about a millisecond on a GPU to a few hundred on a CPU.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, float("inf"))


def adapter_kind(request: GenerationRequest) -> str:
    """The label value of a request: its adapter's kind, or "base"."""
    return request.adapter.metadata.kind if request.adapter is not None else "base"


class RequestTimer:
    """Times one request's events as the server's call handler receives them (a stream's events queue behind
    a slow reader there; a unary call's client sees only the end)."""

    def __init__(self, metrics: ServerMetrics, request: GenerationRequest) -> None:
        self._metrics = metrics
        self._kind = adapter_kind(request)
        self._last = time.perf_counter()  # submission, then the latest event with tokens
        self._first = True

    def on_event(self, event: GenerationEvent) -> None:
        now = time.perf_counter()
        tokens = len(event.token_ids)
        if tokens:
            gap = now - self._last
            if self._first:
                self._metrics.ttft.labels(kind=self._kind).observe(gap)
                # At the first token the prompt is processed: counted now, so cancelled calls count too.
                self._metrics.prompt_tokens.labels(kind=self._kind).inc(event.prompt_tokens)
            else:
                self._metrics.inter_token.labels(kind=self._kind).observe(gap / tokens)
            self._first, self._last = False, now
            self._metrics.generation_tokens.labels(kind=self._kind).inc(tokens)


class EngineGauges(Protocol):
    """What the engine reports of its load (server/engine/engine.py)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def cache_reserved_bytes(self) -> int: ...

    @property
    def preemptions(self) -> int: ...


class _EngineCollector(Collector):
    """Reads the engine's load at scrape time."""

    def __init__(self, engine: EngineGauges, cache_budget: int) -> None:
        self._engine = engine
        self._budget = cache_budget

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        yield GaugeMetricFamily("quiver_running_sequences", "Sequences being decoded", value=engine.num_running)
        yield GaugeMetricFamily(
            "quiver_waiting_requests", "Requests waiting to start (queued, or preempted and waiting to resume)",
            value=engine.num_waiting,
        )
        yield GaugeMetricFamily(
            "quiver_cache_reserved_bytes",
            "Key/value cache bytes admission counts for the batch: every row at its longest, or with --preempt at "
            "its length now",
            value=engine.cache_reserved_bytes,
        )
        yield GaugeMetricFamily(
            "quiver_cache_budget_bytes", "Key/value cache bytes the batch may take (--max-cache-bytes)",
            value=self._budget,
        )
        yield CounterMetricFamily(
            "quiver_preemptions",
            "Sequences taken out of the batch to keep its key/value cache within --max-cache-bytes (--preempt); "
            "each resumes by recomputing its tokens",
            value=engine.preemptions,
        )


class _TierCollector(Collector):
    """Reads the adapter tiers' running totals at scrape time."""

    def __init__(self, host: HostAdapterCache, device: DeviceAdapters) -> None:
        self._tiers = {"host": host, "device": device}

    def collect(self) -> Iterator[Metric]:
        families = {
            "hits": CounterMetricFamily(
                "quiver_adapter_hits", "Requests whose adapter was already in the tier", labels=["tier"]
            ),
            "misses": CounterMetricFamily(
                "quiver_adapter_misses", "Requests whose adapter had to be loaded into the tier", labels=["tier"]
            ),
            "loads": CounterMetricFamily("quiver_adapter_loads", "Adapters loaded into the tier", labels=["tier"]),
            "evictions": CounterMetricFamily(
                "quiver_adapter_evictions", "Adapters evicted from the tier to make room", labels=["tier"]
            ),
        }
        size = GaugeMetricFamily("quiver_adapter_bytes", "Bytes of adapters held by the tier", labels=["tier"])
        for tier, cache in self._tiers.items():
            stats = cache.stats
            families["hits"].add_metric([tier], stats.hits)
            families["misses"].add_metric([tier], stats.misses)
            families["loads"].add_metric([tier], stats.loads)
            families["evictions"].add_metric([tier], stats.evictions)
            size.add_metric([tier], cache.nbytes)
        yield from families.values()
        yield size


class ServerMetrics:
    """Request counts by method and status, end-to-end latency, token timing and counts, engine load, tiers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "quiver_requests",
            "gRPC calls finished, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "quiver_request_duration_seconds",
            "End-to-end gRPC call latency, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "quiver_time_to_first_token_seconds",
            "From submission to the engine to the first generated token, by adapter kind",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "quiver_inter_token_latency_seconds",
            "Time between two generated tokens of one request, by adapter kind",
            ["kind"],
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "quiver_prompt_tokens", "Prompt tokens of requests that got a first token, by adapter kind", ["kind"],
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "quiver_generation_tokens", "Tokens generated, by adapter kind", ["kind"], registry=self.registry
        )
        self.http_requests = Counter(
            "quiver_http_requests",
            "HTTP requests finished (OpenAI-compatible and admin routes), by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "quiver_http_request_duration_seconds",
            "End-to-end HTTP request latency (to the last byte of a stream), by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.latency.labels(method=method).observe(seconds)

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route=route, status=str(status)).inc()
        self.http_latency.labels(route=route).observe(seconds)

    def timer(self, request: GenerationRequest) -> RequestTimer:
        """Start timing `request` now (call it right before submitting it)."""
        return RequestTimer(self, request)

    def watch_tiers(self, host: HostAdapterCache, device: DeviceAdapters) -> None:
        """Export the adapter tiers' hits, loads, evictions and bytes."""
        self.registry.register(_TierCollector(host, device))

    def watch_engine(self, engine: EngineGauges, cache_budget: int) -> None:
        """Export the engine's load, read at each scrape (never older than the scrape)."""
        self.registry.register(_EngineCollector(engine, cache_budget))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what /metrics serves)."""
        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics in a background thread; returns the bound port (useful when `port` is 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound: int = server.server_address[1]
        return bound
