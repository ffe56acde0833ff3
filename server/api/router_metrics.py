"""The metrics inference routers read, with vLLM's names, types and meanings, and which adapters are resident.

Kubernetes' Gateway API Inference Extension (its endpoint picker, llm-d's scheduler) scores replicas from a few
gauges and routes on the request's `model`; its default profile reads vLLM's names, so Quiver exports those:
- `vllm:num_requests_waiting`: requests waiting to start (queued, or preempted and waiting to resume);
- `vllm:num_requests_running`: sequences in the running batch;
- `vllm:kv_cache_usage_perc`: the key/value cache the batch holds (as admission counts it), 0-1 of
  `--max-cache-bytes`, as the engine thread last published it (at most 0.1 s before);
- `vllm:lora_requests_info`: labels `max_lora` (LoRA slots on the device), `running_lora_adapters` and
  `waiting_lora_adapters` (comma-separated adapter names of running and waiting requests, any kind); the value is
  the sample's Unix time, by which the picker finds the newest.
Beside them, `quiver_adapter_resident{adapter="name@version",kind}` = 1 for adapters in device memory (what a
router would most like to know and vLLM does not say), at most `max_series` of them, most recently used first;
`quiver_adapters_resident{tier="device"}` counts them all (engine_metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from quiver.server.engine.engine_load import EngineLoad


class EngineView(Protocol):
    """What the engine reports (server/engine/engine.py)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def load(self) -> EngineLoad: ...


class RouterMetricsCollector(Collector):
    """Reads the engine at scrape time; `model_name` is the served base model's id."""

    def __init__(self, engine: EngineView, model_name: str, max_lora: int, cache_budget: int, max_series: int) -> None:
        self._engine = engine
        self._model = model_name
        self._max_lora = max_lora
        self._budget = cache_budget
        self._max_series = max_series

    def collect(self) -> Iterator[Metric]:
        engine, model = self._engine, [self._model]
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to start", labels=["model_name"])
        waiting.add_metric(model, engine.num_waiting)
        running = GaugeMetricFamily("vllm:num_requests_running", "Sequences being decoded", labels=["model_name"])
        running.add_metric(model, engine.num_running)
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "Key/value cache held by the running batch, as a fraction of --max-cache-bytes",
            labels=["model_name"],
        )
        load = engine.load  # the cache with the rows it counted, as one snapshot of the engine thread
        usage.add_metric(model, min(1.0, load.cache_reserved_bytes / self._budget))
        yield from (waiting, running, usage)
        yield from self._lora_info(load)
        yield from self._resident(load)

    def _lora_info(self, load: EngineLoad) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Adapters of running and waiting requests; the value is the sample's Unix time",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric([str(self._max_lora), ",".join(load.running), ",".join(load.waiting)], time.time())
        yield info

    def _resident(self, load: EngineLoad) -> Iterator[Metric]:
        resident = GaugeMetricFamily(
            "quiver_adapter_resident",
            f"1 for each adapter version in device memory (the {self._max_series} most recently used at most)",
            labels=["adapter", "kind"],
        )
        for adapter in load.resident[: self._max_series]:
            resident.add_metric([f"{adapter.name}@{adapter.version}", adapter.kind], 1)
        yield resident
