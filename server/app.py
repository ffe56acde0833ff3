"""Assembles a running Quiver server: ports first, then the model, engine and services behind them.

The ports open before the model loads (`open_ports`): gRPC health answers NOT_SERVING and HTTP `/ready` 503
while it loads, so an orchestrator sees a live process that is not ready yet. `attach` then builds the engine
and the domain services, registers the gRPC services on the running server, switches the HTTP front to the
real application and turns health SERVING. `serve` adds the health monitor, the drain on SIGTERM/SIGINT and the
exit status: 0 after a drain, 1 when the engine died.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from quiver.server.api.auth import AuthInterceptor
from quiver.server.api.calls import CallLog
from quiver.server.api.core import access_policy, adapter_catalog, request_builder, served_model_name
from quiver.server.api.generation import Generator
from quiver.server.api.metrics import ServerMetrics
from quiver.server.api.router_metrics import RouterMetricsCollector
from quiver.server.api.serving_state import Phase, ServingState
from quiver.server.config import TRANSPORT_CEILING, AdapterConfig, EngineConfig, ModelConfig, ServerConfig
from quiver.server.engine.engine import Engine
from quiver.server.grpc_front.adapter_service import AdapterService
from quiver.server.grpc_front.interceptors import StatusInterceptor, refusing_handler
from quiver.server.grpc_front.service import GenerationService
from quiver.server.http.app import HttpContext, build_app
from quiver.server.http.loading import AppSwitch, LoadingApp
from quiver.server.http.server import HttpServer
from quiver.server.lifecycle import Health, HealthMonitor, drain
from quiver.server.logging_setup import configure_logging
from quiver.server.model.model_loader import LoadedModel, load_base_model
from quiver.server.platform.allocator import MallocTrimmer, limit_malloc_arenas
from quiver.server.platform.cpu_threads import reserve_for_engine
from quiver.server.tls import Tls
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
class OpenPorts:
    """The listening servers before a model is attached: health, reflection, metrics and the probes answer."""

    server: grpc.aio.Server
    services: _DeferredServices
    health: Health
    state: ServingState
    calls: CallLog
    port: int
    http: HttpServer | None
    http_switch: AppSwitch | None
    metrics_port: int | None

    @property
    def metrics(self) -> ServerMetrics:
        return self.calls.metrics

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop(0)
        await self.server.stop(None)


@dataclass
class RunningServer:
    """A started server; `port` and `metrics_port` are the bound ports (useful when 0 was asked), `http_port` the HTTP
    front's (None when --http-port 0 turned it off)."""

    ports: OpenPorts
    engine: Engine
    base_id: str

    @property
    def port(self) -> int:
        return self.ports.port

    @property
    def metrics_port(self) -> int | None:
        return self.ports.metrics_port

    @property
    def http(self) -> HttpServer | None:
        return self.ports.http

    @property
    def http_port(self) -> int | None:
        return self.ports.http.port if self.ports.http is not None else None

    @property
    def metrics(self) -> ServerMetrics:
        return self.ports.metrics

    @property
    def state(self) -> ServingState:
        return self.ports.state

    @property
    def health(self) -> health_aio.HealthServicer:
        return self.ports.health.servicer

    async def stop(self, grace: float | None, force: asyncio.Event | None = None) -> None:
        """Drain (lifecycle.drain: new calls refused, running ones get `grace` seconds, the rest UNAVAILABLE),
        then close the ports once every call has its answer."""
        await drain(self.state, self.ports.health, self.engine, grace or 0, force)
        await asyncio.gather(self.ports.server.stop(1.0), *([self.ports.http.stop(1.0)] if self.ports.http else []))


async def open_ports(config: ServerConfig, adapter_config: AdapterConfig) -> OpenPorts:
    """Bind and start gRPC (health and reflection), HTTP (probes and metrics) and the metrics port, NOT_SERVING."""
    calls = CallLog(ServerMetrics(config.metrics_max_adapters), config.log_prompts)
    state = ServingState(Phase.LOADING)
    calls.metrics.ready.set_function(lambda: float(state.ready))
    policy = access_policy(config.api_key, adapter_config)
    server = grpc.aio.server(
        interceptors=[StatusInterceptor(calls, state, config.max_streams_per_connection, config.max_message_bytes),
                      AuthInterceptor(policy)],
        options=[("grpc.max_receive_message_length", TRANSPORT_CEILING * config.max_message_bytes)],
    )
    services = _DeferredServices()
    server.add_generic_rpc_handlers((services,))
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if config.reflection:
        reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME), server)
    health = Health(servicer, SERVICE_NAMES)
    await health.follow(state)
    tls = Tls.of(config)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, tls.grpc_credentials()) if tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    await server.start()
    http: HttpServer | None = None
    switch = AppSwitch(LoadingApp(state, calls.metrics)) if config.http_port else None
    try:
        if switch is not None:
            http = await HttpServer.start(switch, config.host, config.http_port, state, tls)
        metrics_port = calls.metrics.serve_http(config.host, config.metrics_port, tls) if config.metrics_port else None
    except BaseException:
        if http is not None:
            await http.stop(0)
        await server.stop(None)
        raise
    return OpenPorts(server, services, health, state, calls, port, http, switch, metrics_port)


async def attach(ports: OpenPorts, loaded: LoadedModel, engine_config: EngineConfig, config: ServerConfig,
                 adapter_config: AdapterConfig) -> RunningServer:
    """Build the engine and services around `loaded`, put them behind the open ports, and turn health SERVING."""
    metrics = ports.metrics
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, engine_config, metrics.engine)
    try:
        base_id = served_model_name(config.served_model_name, loaded.view)
        catalog = adapter_catalog(loaded.view, adapter_config, engine_config, base_id)
        catalog.on_registration = metrics.observe_registration
        catalog.on_deletion = engine.host_adapters.drop
        metrics.registered.set_function(lambda: float(catalog.count_servable()))
        builder = request_builder(loaded.view, engine_config, catalog)
        generator = Generator(engine, builder, metrics)
        _watch(metrics, engine, engine_config, config, base_id, loaded)
        info = model_info(loaded, engine_config, engine.packed_weight_bytes)
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationService(generator, info), ports.services)
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
            AdapterService(catalog, adapter_config.max_adapter_bytes), ports.services
        )
        if ports.http_switch is not None:
            ports.http_switch.app = build_app(HttpContext(
                generator, catalog, access_policy(config.api_key, adapter_config), ports.calls, ports.state, base_id,
                loaded.info.fingerprint, loaded.info.context_length, config.max_request_bytes,
            ))
        engine.start()
    except BaseException:
        engine.stop()  # gives the model back
        raise
    ports.state.enter(Phase.SERVING)
    await ports.health.follow(ports.state)
    log.info("serving %s on %s:%d (HTTP port %s, metrics port %s)", base_id, config.host, ports.port,
             ports.http.port if ports.http else None, ports.metrics_port)
    return RunningServer(ports, engine, base_id)


class _DeferredServices(grpc.GenericRpcHandler):
    """The Quiver services, registered before the server starts and filled in at `attach` (what the generated
    `add_*_to_server` functions call: generic handlers only, since grpc takes "registered methods", a lookup
    optimisation, only before start). Until then a Quiver method gets a handler of its arity that only refuses
    (the interceptor answers UNAVAILABLE first), so a client sees "loading", not UNIMPLEMENTED."""

    def __init__(self) -> None:
        self._handlers: tuple[grpc.GenericRpcHandler, ...] = ()

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._handlers += tuple(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        pass  # served by the generic handlers

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for handler in self._handlers:
            found = handler.service(details)
            if found is not None:
                return found
        return refusing_handler(details.method)  # type: ignore[arg-type]


def _watch(metrics: ServerMetrics, engine: Engine, engine_config: EngineConfig, config: ServerConfig,
           base_id: str, loaded: LoadedModel) -> None:
    metrics.watch_tiers(engine.host_adapters, engine.device_adapters, engine_config.max_lora_slots)
    metrics.watch_engine(engine, engine_config.max_cache_bytes)
    metrics.registry.register(RouterMetricsCollector(
        engine, base_id, engine_config.max_lora_slots, engine_config.max_cache_bytes,
        config.metrics_max_resident_adapters,
    ))
    info = loaded.info
    labels = {"model": base_id, "fingerprint": info.fingerprint, "quantization": info.quantization,
              "device": info.device, "dtype": info.dtype, "version": _version()}
    device = next(loaded.model.parameters()).device
    metrics.describe_model(labels, (lambda: _cuda_memory(device)) if device.type == "cuda" else None)


def _version() -> str:
    try:
        return importlib.metadata.version("quiver-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cuda_memory(device: torch.device) -> dict[str, int]:
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}


async def start_server(
    loaded: LoadedModel, engine_config: EngineConfig, config: ServerConfig, adapter_config: AdapterConfig
) -> RunningServer:
    """Open the ports and attach an already loaded model (what tests and embedders call)."""
    ports = await open_ports(config, adapter_config)
    try:
        return await attach(ports, loaded, engine_config, config, adapter_config)
    except BaseException:
        await ports.close()
        raise


class _Signals:
    """SIGINT/SIGTERM: the first sets `stop` (drain), a second sets `force` (end the drain now)."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.stop.is_set():
            log.warning("second signal: stopping now")
            self.force.set()
        self.stop.set()


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def serve_until_signal(model_config: ModelConfig, engine_config: EngineConfig, config: ServerConfig,
                             adapter_config: AdapterConfig,
                             on_serving: Callable[[RunningServer], None] | None = None) -> int:
    """Open the ports, load the model, serve until a signal (drain: 0) or the engine's death (1). `on_serving` is
    called with the running server once it serves (for embedders and tests)."""
    signals = _Signals()
    ports = await open_ports(config, adapter_config)
    print(f"quiver: listening on {config.host}:{ports.port} (gRPC)"
          + (f", HTTP on {config.host}:{ports.http.port}" if ports.http else "") + "; loading the model", flush=True)
    loading = asyncio.ensure_future(asyncio.to_thread(load_base_model, model_config))
    await asyncio.wait([loading, asyncio.ensure_future(signals.stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():  # a signal while loading: nothing runs yet
        await ports.close()
        return 0
    try:
        running = await attach(ports, loading.result(), engine_config, config, adapter_config)
    except BaseException:
        await ports.close()
        raise
    monitor = HealthMonitor(running.engine, ports.state, ports.health, config.engine_stall_seconds)
    watching = asyncio.create_task(monitor.run())
    print(f"quiver: serving {running.base_id}", flush=True)
    if on_serving is not None:
        on_serving(running)
    await _first(signals.stop, monitor.died)
    watching.cancel()
    if monitor.died.is_set():
        await running.stop(0)
        return 1
    log.info("draining: new calls refused, running generations get %.1fs", config.drain_seconds)
    await running.stop(config.drain_seconds, signals.force)
    return 0


def serve(model_config: ModelConfig, engine_config: EngineConfig, config: ServerConfig,
          adapter_config: AdapterConfig) -> int:
    """Serve until SIGINT/SIGTERM, then drain; the exit status (0, or 1 when the engine died)."""
    configure_logging(config.log_format)
    Tls.of(config)  # unusable TLS files stop the start here, naming their flag, before the model loads
    limit_malloc_arenas(config.malloc_arenas)  # before the threads that would each take an arena
    reserve_for_engine()
    trimmer = MallocTrimmer.start(config.malloc_trim_seconds)
    try:
        return asyncio.run(serve_until_signal(model_config, engine_config, config, adapter_config))
    finally:
        if trimmer is not None:
            trimmer.stop()
