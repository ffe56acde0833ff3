"""Assembles a running Quiver server: engine, gRPC services, health, reflection and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from quiver.server.api.access import AccessPolicy
from quiver.server.api.adapter_catalog import AdapterCatalog
from quiver.server.api.auth import AuthInterceptor
from quiver.server.api.core import access_policy, adapter_catalog, request_builder, served_model_name
from quiver.server.api.generation import Generator
from quiver.server.api.metrics import ServerMetrics
from quiver.server.api.router_metrics import RouterMetricsCollector
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig, ServerConfig
from quiver.server.engine.engine import Engine
from quiver.server.grpc_front.adapter_service import AdapterService
from quiver.server.grpc_front.interceptors import StatusInterceptor
from quiver.server.grpc_front.service import GenerationService
from quiver.server.http.app import HttpContext, build_app
from quiver.server.http.gate import ServingState
from quiver.server.http.server import HttpServer
from quiver.server.model.model_loader import LoadedModel, load_base_model
from quiver.server.platform.cpu_threads import reserve_for_engine
from quiver.v1 import adapters_pb2, adapters_pb2_grpc
from quiver.v1 import generation_pb2 as pb
from quiver.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
ADAPTER_SERVICE_NAME = adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name
SERVICE_NAMES = (SERVICE_NAME, ADAPTER_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)


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
    """A started server; `port` and `metrics_port` are the bound ports (useful when 0 was asked), `http_port` the HTTP
    front's (None when --http-port 0 turned it off)."""

    server: grpc.aio.Server
    engine: Engine
    health: health_aio.HealthServicer
    metrics: ServerMetrics
    port: int
    metrics_port: int | None
    http: HttpServer | None
    base_id: str

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def stop(self, grace: float | None) -> None:
        """Drain: health NOT_SERVING, new calls refused (UNAVAILABLE / 503), those in flight get `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), *([self.http.stop(grace)] if self.http else []))
        await asyncio.to_thread(self.engine.stop)


@dataclass(frozen=True)
class _Core:
    """The domain services both fronts translate onto."""

    generator: Generator
    catalog: AdapterCatalog
    policy: AccessPolicy
    base_id: str


def _core(loaded: LoadedModel, engine: Engine, engine_config: EngineConfig, config: ServerConfig,
          adapter_config: AdapterConfig, metrics: ServerMetrics) -> _Core:
    base_id = served_model_name(config.served_model_name, loaded.view)
    catalog = adapter_catalog(loaded.view, adapter_config, engine_config, base_id)
    builder = request_builder(loaded.view, engine_config, catalog)
    policy = access_policy(config.api_key, adapter_config)
    return _Core(Generator(engine, builder, metrics), catalog, policy, base_id)


def _grpc_server(core: _Core, loaded: LoadedModel, engine: Engine, engine_config: EngineConfig,
                 config: ServerConfig, adapter_config: AdapterConfig, metrics: ServerMetrics
                 ) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
    server = grpc.aio.server(interceptors=[StatusInterceptor(metrics), AuthInterceptor(core.policy)])
    info = model_info(loaded, engine_config, engine.packed_weight_bytes)
    pb_grpc.add_GenerationServiceServicer_to_server(GenerationService(core.generator, info), server)
    adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
        AdapterService(core.catalog, adapter_config.max_adapter_bytes), server
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if config.reflection:
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME), server)
    return server, health


def _watch(metrics: ServerMetrics, engine: Engine, engine_config: EngineConfig, config: ServerConfig,
           base_id: str) -> None:
    metrics.watch_tiers(engine.host_adapters, engine.device_adapters)
    metrics.watch_engine(engine, engine_config.max_cache_bytes)
    metrics.registry.register(RouterMetricsCollector(
        engine, base_id, engine_config.max_lora_slots, engine_config.max_cache_bytes,
        config.metrics_max_resident_adapters,
    ))


async def _start_http(core: _Core, loaded: LoadedModel, config: ServerConfig, metrics: ServerMetrics
                      ) -> HttpServer | None:
    if not config.http_port:
        return None
    state = ServingState()
    app = build_app(HttpContext(
        core.generator, core.catalog, core.policy, metrics, state, core.base_id, loaded.info.fingerprint,
        loaded.info.context_length, config.max_request_bytes,
    ))
    return await HttpServer.start(app, config.host, config.http_port, state)


async def start_server(
    loaded: LoadedModel, engine_config: EngineConfig, config: ServerConfig, adapter_config: AdapterConfig
) -> RunningServer:
    """Start the engine, the gRPC server and the HTTP front around an already loaded model."""
    metrics = ServerMetrics()
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, engine_config)
    server: grpc.aio.Server | None = None
    http: HttpServer | None = None
    try:
        core = _core(loaded, engine, engine_config, config, adapter_config, metrics)
        server, health = _grpc_server(core, loaded, engine, engine_config, config, adapter_config, metrics)
        _watch(metrics, engine, engine_config, config, core.base_id)
        port = server.add_insecure_port(f"{config.host}:{config.port}")
        if port == 0:
            raise OSError(f"cannot bind gRPC to {config.host}:{config.port}")
        engine.start()
        await server.start()
        http = await _start_http(core, loaded, config, metrics)
        metrics_port = metrics.serve_http(config.host, config.metrics_port) if config.metrics_port else None
    except BaseException:
        if http is not None:
            await http.stop(0)
        if server is not None:
            await server.stop(None)  # a no-op before it started
        engine.stop()  # gives the model back
        raise
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s:%d (HTTP port %s, metrics port %s)", core.base_id, config.host, port,
             http.port if http else None, metrics_port)
    return RunningServer(server, engine, health, metrics, port, metrics_port, http, core.base_id)


async def _serve_until_signal(
    loaded: LoadedModel, engine_config: EngineConfig, config: ServerConfig, adapter_config: AdapterConfig
) -> None:
    running = await start_server(loaded, engine_config, config, adapter_config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    http = f", HTTP on {config.host}:{running.http_port}" if running.http_port else ""
    print(f"quiver: serving {running.base_id} on {config.host}:{running.port} (gRPC){http}", flush=True)
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
