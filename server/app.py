"""Assembles a running Quiver server: engine, gRPC services, health, reflection and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from quiver.adapters.base_spec import base_spec_from_checkpoint
from quiver.adapters.names import parse_ref
from quiver.adapters.registry import AdapterRegistry
from quiver.adapters.store import LocalAdapterStore, StoredAdapter, default_store_dir
from quiver.adapters.validation import ValidationLimits
from quiver.server.adapter_service import AdapterService
from quiver.server.auth import AdminTokenInterceptor
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig, ServerConfig
from quiver.server.cpu_threads import reserve_for_engine
from quiver.server.engine import Engine
from quiver.server.errors import FailedPrecondition
from quiver.server.interceptors import StatusInterceptor
from quiver.server.metrics import ServerMetrics
from quiver.server.model_loader import LoadedModel, load_base_model
from quiver.server.request_builder import RequestBuilder, RequestLimits
from quiver.server.service import GenerationService
from quiver.v1 import adapters_pb2, adapters_pb2_grpc
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
ADAPTER_SERVICE_NAME = adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name
SERVICE_NAMES = (SERVICE_NAME, ADAPTER_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
# Engine load is sampled for the gauges this often.
_GAUGE_PERIOD_S = 1.0


def model_info(loaded: LoadedModel, engine_config: EngineConfig, engine_bytes: int = 0) -> pb.ModelInfoResponse:
    """`engine_bytes`: what the engine adds to the resident weights (prepacked copies on a CPU)."""
    info = loaded.info
    return pb.ModelInfoResponse(
        model_name=info.name,
        fingerprint=info.fingerprint,
        quantization=info.quantization,
        device=info.device,
        context_length=info.context_length,
        resident_bytes=info.resident_bytes + engine_bytes,
        dtype=info.dtype,
        architecture=info.architecture,
        max_new_tokens_limit=engine_config.max_new_tokens_limit,
        has_chat_template=info.has_chat_template,
    )


@dataclass
class RunningServer:
    """A started server; `port` and `metrics_port` are the bound ports (useful when 0 was asked)."""

    server: grpc.aio.Server
    engine: Engine
    health: health_aio.HealthServicer
    metrics: ServerMetrics
    port: int
    metrics_port: int | None
    _gauges: asyncio.Task[None]

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        self._gauges.cancel()
        await self.server.stop(grace)
        await asyncio.to_thread(self.engine.stop)


async def _update_gauges(engine: Engine, metrics: ServerMetrics) -> None:
    reported_preemptions = 0
    while True:
        metrics.running.set(engine.num_running)
        metrics.waiting.set(engine.num_waiting)
        metrics.cache_reserved.set(engine.cache_reserved_bytes)
        preemptions = engine.preemptions  # a count the engine thread raises: export what it gained since
        metrics.preemptions.inc(preemptions - reported_preemptions)
        reported_preemptions = preemptions
        await asyncio.sleep(_GAUGE_PERIOD_S)


def build_registry(loaded: LoadedModel, config: AdapterConfig, engine_config: EngineConfig) -> AdapterRegistry:
    store_dir = Path(config.store) if config.store else default_store_dir()
    # Registration refuses what the engine's LoRA slots could not hold: fail at the door, not per request.
    max_rank = min(config.max_rank, engine_config.max_lora_rank)
    limits = ValidationLimits(max_rank=max_rank, max_adapter_bytes=config.max_adapter_bytes)
    base = base_spec_from_checkpoint(loaded.checkpoint_dir)
    registry = AdapterRegistry(LocalAdapterStore(store_dir), base, limits)
    log.info("adapter store: %s", store_dir)
    return registry


def _interceptors(metrics: ServerMetrics, config: AdapterConfig) -> list[grpc.aio.ServerInterceptor]:
    interceptors: list[grpc.aio.ServerInterceptor] = [StatusInterceptor(metrics)]
    token = config.admin_token or os.environ.get("QUIVER_ADMIN_TOKEN")
    if token:
        interceptors.append(AdminTokenInterceptor(token))
    else:
        log.warning("adapter registration and deletion are unprotected (no --admin-token)")
    return interceptors


def _resolver(registry: AdapterRegistry, fingerprint: str) -> Callable[[str], StoredAdapter]:
    """Finds a requested adapter; one validated against another base (a shared store) is refused."""

    def resolve(ref: str) -> StoredAdapter:
        stored = registry.store.get(parse_ref(ref))
        if stored.metadata.base_fingerprint != fingerprint:
            raise FailedPrecondition(
                f"adapter {ref!r} was registered for base {stored.metadata.base_fingerprint}, "
                f"not for this server's base {fingerprint}"
            )
        return stored

    return resolve


def _add_services(
    server: grpc.aio.Server, loaded: LoadedModel, engine: Engine, engine_config: EngineConfig,
    registry: AdapterRegistry, adapter_config: AdapterConfig, metrics: ServerMetrics,
) -> None:
    limits = RequestLimits(
        context_length=loaded.info.context_length,
        max_new_tokens_limit=engine_config.max_new_tokens_limit,
        default_max_new_tokens=engine_config.default_max_new_tokens,
    )
    builder = RequestBuilder(loaded.tokenizer, limits, _resolver(registry, loaded.info.fingerprint))
    service = GenerationService(engine, builder, model_info(loaded, engine_config, engine.packed_weight_bytes), metrics)
    pb_grpc.add_GenerationServiceServicer_to_server(service, server)
    import_roots = tuple(Path(root) for root in adapter_config.import_roots)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
        AdapterService(registry, import_roots, adapter_config.max_adapter_bytes), server
    )


async def start_server(
    loaded: LoadedModel, engine_config: EngineConfig, config: ServerConfig, adapter_config: AdapterConfig
) -> RunningServer:
    """Start the engine and a grpc.aio server around an already loaded model."""
    metrics = ServerMetrics()
    metrics.cache_budget.set(engine_config.max_cache_bytes)
    registry = build_registry(loaded, adapter_config, engine_config)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, engine_config)
    server = grpc.aio.server(interceptors=_interceptors(metrics, adapter_config))
    try:
        _add_services(server, loaded, engine, engine_config, registry, adapter_config, metrics)
        metrics.watch_tiers(engine.host_adapters, engine.device_adapters)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if config.reflection:
            reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME), server)
        port = server.add_insecure_port(f"{config.host}:{config.port}")
        if port == 0:
            raise OSError(f"cannot bind gRPC to {config.host}:{config.port}")
        engine.start()
        await server.start()
        metrics_port = metrics.serve_http(config.host, config.metrics_port) if config.metrics_port else None
    except BaseException:
        await server.stop(None)  # a no-op before it started
        engine.stop()  # gives the model back
        raise
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    gauges = asyncio.create_task(_update_gauges(engine, metrics))
    log.info("serving %s on %s:%d (metrics port %s)", loaded.info.name, config.host, port, metrics_port)
    return RunningServer(server, engine, health, metrics, port, metrics_port, gauges)


async def _serve_until_signal(
    loaded: LoadedModel, engine_config: EngineConfig, config: ServerConfig, adapter_config: AdapterConfig
) -> None:
    running = await start_server(loaded, engine_config, config, adapter_config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"quiver: serving {loaded.info.name} on {config.host}:{running.port}", flush=True)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", config.grace_seconds)
    await running.stop(config.grace_seconds)


def serve(
    model_config: ModelConfig, engine_config: EngineConfig, config: ServerConfig, adapter_config: AdapterConfig
) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then drain gracefully."""
    reserve_for_engine()
    loaded = load_base_model(model_config)
    asyncio.run(_serve_until_signal(loaded, engine_config, config, adapter_config))
