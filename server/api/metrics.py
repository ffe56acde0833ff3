"""Prometheus metrics of one server, in a registry of its own (several servers may share a process).

What an operator of a multi-adapter server watches: call counts and latency by status, time to first token and
between tokens, token throughput by adapter kind and, for the busiest adapters, by name (bounded:
adapter_metrics.py); the engine's forwards, queue waits, load and key/value cache; each adapter tier's hits,
cold loads, evictions, residents and bytes (engine_metrics.py); registrations and rejections; readiness; what
model runs where; process and device memory. README's "Operations" section lists them by the question each
answers. No label holds a prompt, a path or a token.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quiver.common.errors import QuiverError
from quiver.server.api.adapter_metrics import AdapterSeries
from quiver.server.api.engine_metrics import EngineCollector, EngineGauges, EngineMetrics, TierCollector
from quiver.server.engine.adapter_tiers import DeviceAdapters, HostAdapterCache
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.engine.request import GenerationRequest

if TYPE_CHECKING:
    from quiver.server.api.calls import CallRecord
    from quiver.server.tls import Tls

# Generation requests run from milliseconds (one token) to minutes (long outputs on CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
# One decode step: about a millisecond on a GPU to a few hundred on a CPU.
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, float("inf"))


def adapter_kind(request: GenerationRequest) -> str:
    """The label value of a request: its adapter's kind, or "base"."""
    return request.adapter.metadata.kind if request.adapter is not None else "base"


class RequestTimer:
    """Times one request's events as the server's call handler receives them (a stream's events queue behind
    a slow reader there; a unary call's client sees only the end), and fills in the call's record."""

    def __init__(self, metrics: ServerMetrics, request: GenerationRequest, record: CallRecord | None) -> None:
        self._metrics = metrics
        self._kind = adapter_kind(request)
        self._record = record
        if record is not None and request.adapter is not None:
            record.served_adapter = request.adapter.metadata.name
        self._start = self._last = time.perf_counter()  # submission, then the latest event with tokens
        self._first = True

    def on_event(self, event: GenerationEvent) -> None:
        now = time.perf_counter()
        tokens = len(event.token_ids)
        record = self._record
        if record is not None and event.queue_seconds is not None and record.queue_seconds is None:
            record.queue_seconds = event.queue_seconds
        if event.embedding is not None:  # a prefill-only row's one event: its prompt is processed, no token follows
            self._metrics.prompt_tokens.labels(kind=self._kind).inc(event.prompt_tokens)
            if record is not None:
                record.prompt_tokens += event.prompt_tokens
            return
        if not tokens:
            return
        if self._first:
            self._metrics.ttft.labels(kind=self._kind).observe(now - self._start)
            # At the first token the prompt is processed: counted now, so cancelled calls count too.
            self._metrics.prompt_tokens.labels(kind=self._kind).inc(event.prompt_tokens)
            if record is not None:
                record.prompt_tokens += event.prompt_tokens
                if record.ttft_seconds is None:
                    record.ttft_seconds = now - self._start
        else:
            self._metrics.inter_token.labels(kind=self._kind).observe((now - self._last) / tokens)
        self._first, self._last = False, now
        self._metrics.generation_tokens.labels(kind=self._kind).inc(tokens)
        if record is not None:
            record.generated_tokens += tokens


def rejection_reason(error: QuiverError) -> str:
    """A registration's rejection as a bounded label: its error class in snake case (`failed_precondition`)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


class _ModelInfo(Collector):
    """`quiver_model_info` (value 1) with what runs where, and device memory on CUDA."""

    def __init__(self, labels: dict[str, str], cuda_device: Callable[[], dict[str, int]] | None) -> None:
        self._labels = labels
        self._cuda = cuda_device

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("quiver_model_info", "The served base model and how it runs (always 1)",
                                 labels=list(self._labels))
        info.add_metric(list(self._labels.values()), 1)
        yield info
        if self._cuda is not None:
            for name, value in self._cuda().items():
                yield GaugeMetricFamily(f"quiver_cuda_memory_{name}_bytes", f"CUDA memory {name} by torch",
                                        value=value)


class ServerMetrics:
    """Request counts by method and status, end-to-end latency, token timing and counts, engine load, tiers,
    registrations, readiness and memory. `max_adapters`: adapters labelled by name (--metrics-max-adapters)."""

    def __init__(self, max_adapters: int = 20) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "quiver_requests", "gRPC calls finished, by method and status code", ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "quiver_request_duration_seconds", "End-to-end gRPC call latency, by method", ["method"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.ttft = Histogram(
            "quiver_time_to_first_token_seconds",
            "From submission to the engine to the first generated token, by adapter kind",
            ["kind"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.inter_token = Histogram(
            "quiver_inter_token_latency_seconds", "Time between two generated tokens of one request, by adapter kind",
            ["kind"], buckets=_TOKEN_BUCKETS, registry=self.registry,
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
            ["route", "status"], registry=self.registry,
        )
        self.http_latency = Histogram(
            "quiver_http_request_duration_seconds",
            "End-to-end HTTP request latency (to the last byte of a stream), by route",
            ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self._registration_metrics()
        self.ready = Gauge("quiver_ready", "1 when a Generate would be served now (health SERVING), else 0",
                           registry=self.registry)
        self.adapters = AdapterSeries(self.registry, max_adapters, _LATENCY_BUCKETS)
        self.engine = EngineMetrics(self.registry)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds

    def _registration_metrics(self) -> None:
        self.registrations = Counter(
            "quiver_adapter_registrations", "Adapters registered (a new name or version), by kind", ["kind"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "quiver_adapter_rejections",
            "Registrations refused, by reason (the error: invalid_argument, failed_precondition for an adapter that "
            "does not fit the base, too_large, already_exists...)",
            ["reason"], registry=self.registry,
        )
        self.registered = Gauge(
            "quiver_adapters_registered", "Adapters (names) this server can serve: registered for its base",
            registry=self.registry,
        )

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.latency.labels(method=method).observe(seconds)

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route=route, status=str(status)).inc()
        self.http_latency.labels(route=route).observe(seconds)

    def observe_registration(self, kind: str | None, error: QuiverError | None) -> None:
        """One registration: accepted (its adapter's `kind`) or refused with `error`."""
        if error is not None:
            self.rejections.labels(reason=rejection_reason(error)).inc()
        elif kind is not None:
            self.registrations.labels(kind=kind).inc()

    def timer(self, request: GenerationRequest, record: CallRecord | None = None) -> RequestTimer:
        """Start timing `request` now (call it right before submitting it); `record` is its call's, if any."""
        return RequestTimer(self, request, record)

    def watch_tiers(self, host: HostAdapterCache, device: DeviceAdapters, lora_slots: int) -> None:
        """Export the adapter tiers' hits, loads, evictions, residents, bytes and LoRA slots."""
        self.registry.register(TierCollector(host, device, lora_slots))

    def watch_engine(self, engine: EngineGauges, cache_budget: int) -> None:
        """Export the engine's load, read at each scrape (never older than the scrape)."""
        self.registry.register(EngineCollector(engine, cache_budget))

    def describe_model(self, labels: dict[str, str], cuda_memory: Callable[[], dict[str, int]] | None) -> None:
        """Export `quiver_model_info` with `labels` (model, fingerprint, quantization, device, dtype, version) and,
        on CUDA, `cuda_memory()` (allocated and reserved bytes) at each scrape."""
        self.registry.register(_ModelInfo(labels, cuda_memory))

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (what /metrics serves)."""
        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int, tls: Tls | None = None) -> int:
        """Serve /metrics in a background thread, over TLS when `tls` is given (mutual with its client CA); returns
        the bound port (useful when `port` is 0)."""
        options = {} if tls is None else {"certfile": tls.cert, "keyfile": tls.key, "client_cafile": tls.client_ca,
                                           "client_auth_required": tls.client_ca is not None}
        server, _thread = start_http_server(port, addr=host, registry=self.registry, **options)  # type: ignore[arg-type]
        bound: int = server.server_address[1]
        return bound
