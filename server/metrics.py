"""Prometheus metrics of one server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Generation requests run from milliseconds (one token) to minutes (long outputs on CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))


class ServerMetrics:
    """Request counts by method and status, end-to-end latency, engine load."""

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
        self.running = Gauge("quiver_running_sequences", "Sequences being decoded", registry=self.registry)
        self.waiting = Gauge("quiver_waiting_requests", "Requests waiting to start", registry=self.registry)

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.latency.labels(method=method).observe(seconds)

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics in a background thread; returns the bound port (useful when `port` is 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound: int = server.server_address[1]
        return bound
