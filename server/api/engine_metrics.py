"""The engine's side of the metrics: what it reports as it works (forwards, queue waits, cold loads: an
`EngineObserver`) and what a scrape reads of its state (load, key/value cache, adapter tiers and slots).

Buckets are fitted to LLM serving: a forward takes about a millisecond on a GPU to seconds for a long prefill on
a CPU; a queue wait or a cold load from microseconds to minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quiver.server.engine.adapter_tiers import DeviceAdapters, HostAdapterCache
from quiver.server.engine.observer import EngineObserver, Phase, Tier

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, float("inf"))
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
_ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, float("inf"))
_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, float("inf"))


class EngineMetrics(EngineObserver):
    """Histograms of the engine's forwards (by phase), queue waits and cold loads (by tier)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.step_seconds = Histogram(
            "quiver_step_duration_seconds",
            "Duration of one engine forward, by phase (prefill: a group of prompts or a chunk of a long one; decode: "
            "one token for every running row)",
            ["phase"], buckets=_STEP_BUCKETS, registry=registry,
        )
        self.step_rows = Histogram(
            "quiver_step_rows", "Rows (sequences) in one engine forward, by phase: the running batch size at decode",
            ["phase"], buckets=_ROW_BUCKETS, registry=registry,
        )
        self.step_tokens = Histogram(
            "quiver_step_tokens", "Positions computed by one engine forward, by phase (soft prompts included)",
            ["phase"], buckets=_TOKEN_BUCKETS, registry=registry,
        )
        self.queue_wait = Histogram(
            "quiver_queue_wait_seconds", "From a request's submission to the engine to its first prefill forward",
            buckets=_WAIT_BUCKETS, registry=registry,
        )
        self.load_seconds = Histogram(
            "quiver_adapter_load_duration_seconds",
            "Cold loads of an adapter, by tier: host = from the store into host memory, device = from host memory "
            "into a device slot",
            ["tier"], buckets=_WAIT_BUCKETS, registry=registry,
        )
        for phase in Phase:  # every series exists from the start, so dashboards and alerts see zeros, not gaps
            for metric in (self.step_seconds, self.step_rows, self.step_tokens):
                metric.labels(phase=phase.value)
        for tier in Tier:
            self.load_seconds.labels(tier=tier.value)

    def forward(self, phase: Phase, seconds: float, rows: int, tokens: int) -> None:
        self.step_seconds.labels(phase=phase.value).observe(seconds)
        self.step_rows.labels(phase=phase.value).observe(rows)
        self.step_tokens.labels(phase=phase.value).observe(tokens)

    def queued(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def adapter_loaded(self, tier: Tier, seconds: float) -> None:
        self.load_seconds.labels(tier=tier.value).observe(seconds)


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


class EngineCollector(Collector):
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


class TierCollector(Collector):
    """Reads the adapter tiers' running totals, residents, bytes and LoRA slots at scrape time."""

    def __init__(self, host: HostAdapterCache, device: DeviceAdapters, lora_slots: int) -> None:
        self._host = host
        self._device = device
        self._lora_slots = lora_slots

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
        resident = GaugeMetricFamily("quiver_adapters_resident", "Adapters held by the tier", labels=["tier"])
        for tier, cache in ((Tier.HOST, self._host), (Tier.DEVICE, self._device)):
            stats = cache.stats
            for name, family in families.items():
                family.add_metric([tier.value], getattr(stats, name))
            size.add_metric([tier.value], cache.nbytes)
            resident.add_metric([tier.value], cache.resident)
        yield from families.values()
        yield size
        yield resident
        yield GaugeMetricFamily("quiver_lora_slots", "LoRA slots on the device (--max-lora-slots)",
                                value=self._lora_slots)
        yield GaugeMetricFamily("quiver_lora_slots_used", "LoRA slots holding an adapter",
                                value=self._device.slots_used)
