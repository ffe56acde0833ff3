"""The Ray Serve application: `application(...)` builds it, `app_builder` serves it from a config file
(`serve run deploy/ray/quiver.yaml`, KubeRay's RayService), `serve_ray` runs it from `quiver serve-ray`.

Two deployments: `QuiverIngress` (HTTP and gRPC) and `QuiverEngine` (one engine per replica, one GPU each where
there are GPUs). A config file may override any deployment option by name (replicas, autoscaling on ongoing
requests, resources), as Ray Serve's config files do.
"""

from __future__ import annotations

import logging
import signal
import threading
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig

log = logging.getLogger(__name__)

APP_NAME = "quiver"
ENGINE_DEPLOYMENT = "QuiverEngine"
INGRESS_DEPLOYMENT = "QuiverIngress"
GRPC_SERVICERS = ["quiver.v1.generation_pb2_grpc.add_GenerationServiceServicer_to_server"]


@dataclass
class RayServeConfig:
    """Where and how the Ray Serve application runs; `quiver serve-ray` flags map 1:1 onto these fields."""

    ray_address: str | None = field(
        default=None, metadata={"help": "address of a running Ray cluster (default: start a local one)"})
    ray_num_cpus: int | None = field(
        default=None, metadata={"help": "CPUs of a local Ray cluster (default: every CPU)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address Ray Serve's HTTP and gRPC proxies bind"})
    http_port: int = field(default=8000, metadata={"help": "HTTP port (the OpenAI-compatible API)"})
    grpc_port: int = field(default=9000, metadata={"help": "gRPC port (quiver.v1.GenerationService)"})
    engine_replicas: int = field(default=1, metadata={"help": "engine replicas (each holds one Quiver engine)"})
    engine_cpus: float = field(default=1.0, metadata={"help": "CPUs Ray reserves for each engine replica"})
    engine_gpus: float | None = field(
        default=None, metadata={"help": "GPUs per engine replica (default: 1 where Ray sees GPUs, else 0)"})
    ingress_replicas: int = field(default=1, metadata={"help": "ingress replicas (HTTP and gRPC translation)"})
    served_model_name: str | None = field(
        default=None, metadata={"help": "the base model's id in the HTTP API's `model` (default: the model's name)"})
    api_key: str | None = field(
        default=None, metadata={"help": "key every inference call needs (default: $QUIVER_API_KEY; unset = open)"})
    max_request_bytes: int = field(default=4 * 2**20, metadata={"help": "largest HTTP request body, in bytes"})

    def __post_init__(self) -> None:
        if self.engine_replicas < 1 or self.ingress_replicas < 1:
            raise ValueError("--engine-replicas and --ingress-replicas must be >= 1")
        for name in ("http_port", "grpc_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ValueError(f"--{name.replace('_', '-')} must be in [1, 65535]")


def application(model: ModelConfig, engine: EngineConfig, adapters: AdapterConfig, ray_config: RayServeConfig
                ) -> Any:
    """The bound application: ingress over engine replicas."""
    import ray
    from ray import serve

    from quiver.server.ray_serve.engine_replica import EngineReplica
    from quiver.server.ray_serve.ingress import Ingress

    gpus = ray_config.engine_gpus
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    log.info("engine replicas: %d x (%.2f CPU, %.2f GPU)", ray_config.engine_replicas, ray_config.engine_cpus, gpus)
    engine_deployment = serve.deployment(
        name=ENGINE_DEPLOYMENT, num_replicas=ray_config.engine_replicas,
        ray_actor_options={"num_cpus": ray_config.engine_cpus, "num_gpus": gpus},
        # The replica batches what it holds: let it hold its batch and as many waiting.
        max_ongoing_requests=2 * engine.max_running, health_check_period_s=10,
    )(EngineReplica)
    ingress_deployment = serve.deployment(
        name=INGRESS_DEPLOYMENT, num_replicas=ray_config.ingress_replicas,
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=engine.max_queued,
    )(serve.ingress()(Ingress))
    engines = engine_deployment.bind(model, engine, adapters, ray_config.served_model_name)
    return ingress_deployment.bind(engines, model, engine, adapters, ray_config.served_model_name,
                                   ray_config.api_key, ray_config.max_request_bytes)


# Set by `quiver serve-ray` only: in a Serve config file, `http_options`, `grpc_options` and the cluster say these.
_CLI_ONLY = frozenset({"ray_address", "ray_num_cpus", "host", "http_port", "grpc_port"})


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config file's `value` is of the field type `hint` (as the CLI's parser would insist)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_fits(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int | (float if hint is float else int)) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _config(cls: type[Any], values: dict[str, Any] | None) -> Any:
    """`cls` from a config file's section, checked as strictly as the CLI checks its flags."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys in the config file: {sorted(unknown)}")
    if cls is RayServeConfig and (cli_only := _CLI_ONLY & set(values)):
        raise ValueError(f"{sorted(cli_only)} belong to `quiver serve-ray`; a Serve config file sets them in "
                         "http_options, grpc_options and the cluster")
    for name, value in values.items():
        if not _fits(value, hints[name]):
            raise ValueError(f"{cls.__name__}.{name}: {value!r} is not a {hints[name]}")
        if isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def app_builder(args: dict[str, Any]) -> Any:
    """For Serve config files (`import_path: quiver.server.ray_serve.app:app_builder`): `args` holds `model`,
    `engine`, `adapters` and `ray`, each a mapping onto that dataclass's fields."""
    unknown = set(args) - {"model", "engine", "adapters", "ray"}
    if unknown:
        raise ValueError(f"unknown sections in the application's args: {sorted(unknown)}")
    return application(_config(ModelConfig, args.get("model")), _config(EngineConfig, args.get("engine")),
                       _config(AdapterConfig, args.get("adapters")), _config(RayServeConfig, args.get("ray")))


def serve_ray(model: ModelConfig, engine: EngineConfig, adapters: AdapterConfig, ray_config: RayServeConfig) -> None:
    """Start (or join) Ray, serve the application until SIGINT/SIGTERM, then take it down: on a cluster of its own,
    Serve and Ray; on a shared one (`--ray-address`), only this application."""
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the replicas load: a signal meanwhile still stops cleanly
        signal.signal(sig, lambda *_: stop.set())
    if ray_config.ray_address:
        ray.init(address=ray_config.ray_address)
    else:  # a local cluster stays on loopback when the proxies do
        loopback = ray_config.host in ("127.0.0.1", "localhost", "::1")
        ray.init(num_cpus=ray_config.ray_num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1" if loopback else None)
    try:
        serve.start(http_options=HTTPOptions(host=ray_config.host, port=ray_config.http_port),
                    grpc_options=gRPCOptions(port=ray_config.grpc_port, grpc_servicer_functions=GRPC_SERVICERS))
        serve.run(application(model, engine, adapters, ray_config), name=APP_NAME, route_prefix="/")
        print(f"quiver: serving on Ray (HTTP {ray_config.host}:{ray_config.http_port}, gRPC {ray_config.host}:"
              f"{ray_config.grpc_port})", flush=True)
        while not stop.wait(timeout=1.0):  # wakes up to run the handler: Ray's threads may take the signal
            pass
    finally:
        log.info("taking the application down")
        if ray_config.ray_address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
