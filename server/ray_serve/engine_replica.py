"""Ray Serve's engine deployment: each replica holds one Quiver engine (one GPU where there are GPUs) over the shared
adapter store.

Requests arrive prepared by the ingress (server/ray_serve/remote.py) with their adapter's publication as
`name@version#digest`, which is also their multiplexed model id: Ray routes a request to a replica whose
multiplexed loader has seen that id, and the loader starts loading the adapter into this replica's host tier.
Quiver's own tiers stay the memory manager (bytes, slots, pins); Ray's per-replica model count is only a routing
hint. Each replica exports, through Ray's metrics (tagged with the replica), how many requests found their adapter
already in host memory and how many adapters each tier loaded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray import serve

from quiver.adapters.store import StoredAdapter
from quiver.common.errors import NotFound
from quiver.server.api.core import adapter_catalog, request_builder, served_model_name
from quiver.server.api.generation import Generator
from quiver.server.api.metrics import ServerMetrics
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.model.model_loader import load_base_model
from quiver.server.platform.cpu_threads import reserve_for_engine
from quiver.server.ray_serve.remote import PortableRequest, adapter_id, parse_adapter_id

# Adapters Ray counts as held per replica when routing: generous, since Quiver's tiers decide what stays in memory.
ROUTING_MODELS_PER_REPLICA = 64
_EXPORT_PERIOD_S = 1.0
_KNOWN_VERSIONS = 4096  # resolved versions remembered per replica (a dict entry each)


class ReplicaMetrics:
    """This replica's figures in Ray's metrics (each series tagged with the replica by Ray Serve)."""

    def __init__(self, engine: Engine) -> None:
        from ray.serve import metrics

        self._engine = engine
        self._requests = metrics.Counter(
            "quiver_replica_requests", description="Requests by whether their adapter was already in host memory "
            "(yes, no; none: the base model)", tag_keys=("adapter_held",))
        self._loads = metrics.Counter(
            "quiver_replica_adapter_loads", description="Adapters loaded into the tier", tag_keys=("tier",))
        self._running = metrics.Gauge("quiver_replica_running_sequences", description="Sequences being decoded")
        self._waiting = metrics.Gauge("quiver_replica_waiting_requests", description="Requests waiting to start")
        self._reported = {"host": 0, "device": 0}

    def request(self, held: str) -> None:
        self._requests.inc(tags={"adapter_held": held})

    async def export(self) -> None:
        tiers = {"host": self._engine.host_adapters, "device": self._engine.device_adapters}
        while True:
            for tier, cache in tiers.items():
                loads = cache.stats.loads
                if loads > self._reported[tier]:
                    self._loads.inc(loads - self._reported[tier], tags={"tier": tier})
                    self._reported[tier] = loads
            self._running.set(self._engine.num_running)
            self._waiting.set(self._engine.num_waiting)
            await asyncio.sleep(_EXPORT_PERIOD_S)


class EngineReplica:
    """One engine over the shared store; `generate` streams a prepared request's events."""

    def __init__(self, model: ModelConfig, engine: EngineConfig, adapters: AdapterConfig,
                 served_name: str | None = None) -> None:
        reserve_for_engine()
        loaded = load_base_model(model)
        self._engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, engine)
        base_id = served_model_name(served_name, loaded.view)
        self._catalog = adapter_catalog(loaded.view, adapters, engine, base_id)
        self._generator = Generator(self._engine, request_builder(loaded.view, engine, self._catalog),
                                    ServerMetrics())
        self._engine.start()
        self._metrics = ReplicaMetrics(self._engine)
        self._exporter: asyncio.Task[None] | None = None
        self._known: dict[str, StoredAdapter] = {}  # name@version -> its stored version, oldest first
        self._info = {"name": loaded.info.name, "fingerprint": loaded.info.fingerprint,
                      "quantization": loaded.info.quantization, "device": loaded.info.device,
                      "dtype": loaded.info.dtype, "context_length": loaded.info.context_length,
                      "resident_bytes": loaded.info.resident_bytes + self._engine.packed_weight_bytes,
                      "architecture": loaded.info.architecture, "max_new_tokens_limit": engine.max_new_tokens_limit,
                      "has_chat_template": loaded.info.has_chat_template}

    @serve.multiplexed(max_num_models_per_replica=ROUTING_MODELS_PER_REPLICA)
    async def _adapter(self, model_id: str) -> StoredAdapter:
        """Ray's loader for a multiplexed id (`name@version#digest`): the exact publication the ingress resolved, its
        host load started. It only resolves (Ray runs one loader at a time per replica): requests wait for the
        load in the engine's scheduler, as any cold adapter's do."""
        ref, digest = parse_adapter_id(model_id)
        stored = await asyncio.to_thread(self._catalog.resolve, ref)
        if adapter_id(stored) != model_id:  # deleted and registered again under the same number since: fail closed
            raise NotFound(f"adapter {ref} ({digest}) is no longer in the store")
        self._engine.host_adapters.fetch(stored)  # start the load (a waiter cancelling can no longer stop it)
        return stored

    async def generate(self, sent: PortableRequest) -> AsyncIterator[GenerationEvent]:
        if self._exporter is None:
            self._exporter = asyncio.create_task(self._metrics.export())
        request, held = sent.request, "none"
        if sent.adapter_id:  # one publication: immutable, so what was resolved for it once stays right
            known = self._known.get(sent.adapter_id)
            held = "yes" if known is not None and self._engine.host_adapters.holds(known) else "no"
            stored = await self._adapter(sent.adapter_id)
            self._known[sent.adapter_id] = stored
            while len(self._known) > _KNOWN_VERSIONS:
                self._known.pop(next(iter(self._known)))
            request = replace(request, adapter=stored)
        self._metrics.request(held)
        async for event in self._generator.run([request]).events():
            yield event

    async def model_info(self) -> dict[str, Any]:
        return self._info

    def check_health(self) -> None:
        """Ray restarts a replica whose engine thread died."""
        if not self._engine.alive:
            raise RuntimeError("the engine thread is not running")

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.stop()
