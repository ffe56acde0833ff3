"""Each Serve config (deploy/ray/quiver.yaml, the RayService's serveConfigV2) against Ray's own schema, the
application's constants and config dataclasses, and Ray's application builder; GPUs and autoscaling of the engine
deployment."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from typing import Any

import pytest

from quiver.server.ray_serve import app as ray_app

from .manifests import (
    APP_BUILDER,
    ARG_SECTIONS,
    ROOT,
    SERVE_CONFIG_FILE,
    SERVE_CONFIGS,
    ServeConfig,
    _applications,
    _container_port,
    _deployment,
    _ids,
    _probes,
    _schema,
)


def _rayservices() -> list[ServeConfig]:
    return [c for c in SERVE_CONFIGS if c.rayservice is not None]


@pytest.mark.parametrize("config", _rayservices(), ids=_ids(_rayservices()))
def test_rayservice_ports_match_its_serve_config(config: ServeConfig):
    schema = _schema(config)
    http, grpc = schema.http_options.port, schema.grpc_options.port
    assert config.rayservice is not None
    spec = config.rayservice["spec"]
    # KubeRay's serve Service takes the ports named `serve` and `serve-*` (KubeRay >= 1.6).
    service_ports = {p["name"]: p for p in spec["serveService"]["spec"]["ports"]}
    assert set(service_ports) == {"serve", "serve-grpc"}, f"{config.label}: serveService ports {set(service_ports)}"
    for name, port in (("serve", http), ("serve-grpc", grpc)):
        assert service_ports[name]["port"] == port, f"{config.label}: serveService {name} is not on {port}"
        assert service_ports[name].get("targetPort", port) == port, f"{config.label}: serveService {name} target"
    cluster = spec["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
            for name, port in (("serve", http), ("serve-grpc", grpc)):
                if group is cluster["headGroupSpec"]:
                    assert name in ports, f"{config.label}: the head container declares no {name} port"
                if name in ports:
                    assert ports[name] == port, f"{config.label}: {container['name']} port {name} is not {port}"
            for kind, probe in _probes(container):
                if probe.get("httpGet", {}).get("path") == "/-/healthz":  # Serve's proxy health, on the HTTP port
                    assert _container_port(container, probe["httpGet"]["port"]) == http, f"{config.label}: {kind}"
    for app in _applications(config):  # RayServeConfig's ports are unused here, but must not contradict
        ray_args = (app.get("args") or {}).get("ray") or {}
        assert ray_args.get("http_port", http) == http and ray_args.get("grpc_port", grpc) == grpc, config.label


# ---------------------------------------------------------------------------------------------------------------
# 4. The Serve application


def _unknown_keys(model: Any, data: Any, where: str) -> list[str]:
    """Keys Ray's schema would silently ignore (its models allow extras): typos such as `autoscaling_confg`."""
    if not isinstance(data, dict):
        return []
    fields = {**model.model_fields, **{f.alias: f for f in model.model_fields.values() if f.alias}}
    problems = [f"{where}.{key}" for key in data if key not in fields]
    for key, value in data.items():
        if key not in fields:
            continue
        for sub in _models_in(fields[key].annotation):
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                problems += _unknown_keys(sub, item, f"{where}.{key}" + (f"[{i}]" if isinstance(value, list) else ""))
    return problems


def _models_in(annotation: Any) -> list[Any]:
    from pydantic import BaseModel

    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


@pytest.mark.parametrize("config", SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_serve_config_validates_against_rays_schema(config: ServeConfig):
    schema = pytest.importorskip("ray.serve.schema")
    try:
        schema.ServeDeploySchema.model_validate(config.body)  # what `serve deploy` and KubeRay's Serve API check
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        pytest.fail(f"{config.label}: not a valid Serve config: {e}")
    assert _unknown_keys(schema.ServeDeploySchema, config.body, config.label) == []


@pytest.mark.parametrize("config", SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_serve_application_matches_the_code(config: ServeConfig):
    (app,) = _applications(config)
    assert app["name"] == ray_app.APP_NAME
    assert app.get("route_prefix", "/") == "/"
    assert app["import_path"] == APP_BUILDER
    module, attr = app["import_path"].split(":")
    assert getattr(importlib.import_module(module), attr) is ray_app.app_builder
    servicers = (config.body.get("grpc_options") or {}).get("grpc_servicer_functions")
    assert servicers == ray_app.GRPC_SERVICERS, f"{config.label}: grpc_servicer_functions"
    for path in servicers:  # Ray's gRPC proxy imports them by this path
        module_name, _, function = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module_name), function)), path
    names = [d["name"] for d in app.get("deployments") or []]
    assert len(names) == len(set(names)), f"{config.label}: a deployment listed twice"
    assert set(names) <= {ray_app.ENGINE_DEPLOYMENT, ray_app.INGRESS_DEPLOYMENT}, f"{config.label}: {names}"


@pytest.mark.parametrize("config", SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_serve_args_are_the_config_dataclasses(config: ServeConfig):
    (app,) = _applications(config)
    args = app.get("args") or {}
    assert set(args) <= set(ARG_SECTIONS), f"{config.label}: args sections {sorted(set(args) - set(ARG_SECTIONS))}"
    for section, cls in ARG_SECTIONS.items():
        values = args.get(section) or {}
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(values) <= fields, f"{config.label}: args.{section}: {sorted(set(values) - fields)} not in {cls}"
        try:
            ray_app._config(cls, values)  # as app_builder builds it: invalid values fail too
        except (TypeError, ValueError) as e:
            pytest.fail(f"{config.label}: args.{section}: {e}")
        hints = typing.get_type_hints(cls)
        for key, value in values.items():  # what the CLI's types and choices check, and _config does not
            assert _fits(value, hints[key]), f"{config.label}: args.{section}.{key}: {value!r} is not {hints[key]}"


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a config field's type (the types config dataclasses use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is tuple:  # tuple[str, ...]: a YAML list
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@pytest.fixture(scope="module")
def serve_build() -> Any:
    """Build an application as Serve's controller does: import, call the builder with `args`, build the graph."""
    pytest.importorskip("ray.serve")
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    def build(app: dict[str, Any]) -> dict[str, Any]:
        application = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app.get("args", {}))
        built = build_app(application, name=app["name"])
        return {d.name: d for d in built.deployments}

    return build


@pytest.mark.parametrize("config", SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_serve_application_builds_with_the_overrides(config: ServeConfig, serve_build: Any):
    (app,) = _applications(config)
    deployments = serve_build(app)
    assert set(deployments) == {ray_app.ENGINE_DEPLOYMENT, ray_app.INGRESS_DEPLOYMENT}
    for override in app.get("deployments") or []:
        options = {k: v for k, v in override.items() if k != "name"}
        try:
            deployment = deployments[override["name"]].options(**options)
        except (TypeError, ValueError) as e:
            pytest.fail(f"{config.label}: deployment {override['name']}: {e}")
        autoscaling = options.get("autoscaling_config")
        if autoscaling:  # Ray only warns when autoscaling can never happen
            assert autoscaling["target_ongoing_requests"] <= deployment.max_ongoing_requests, (
                f"{config.label}: {override['name']} target_ongoing_requests above its max_ongoing_requests "
                f"({deployment.max_ongoing_requests})")


# ---------------------------------------------------------------------------------------------------------------
# 5. GPUs and autoscaling


@pytest.mark.parametrize("config", SERVE_CONFIGS, ids=_ids(SERVE_CONFIGS))
def test_engine_deployment_autoscales(config: ServeConfig):
    (app,) = _applications(config)
    engine = _deployment(app, ray_app.ENGINE_DEPLOYMENT)
    assert engine is not None, f"{config.label}: no {ray_app.ENGINE_DEPLOYMENT} options"
    autoscaling = engine.get("autoscaling_config") or {}
    assert {"target_ongoing_requests", "min_replicas", "max_replicas"} <= set(autoscaling), config.label
    assert 1 <= autoscaling["min_replicas"] <= autoscaling["max_replicas"], config.label
    assert not isinstance(engine.get("num_replicas"), int), f"{config.label}: num_replicas beside autoscaling"
    # The ray section must not say something else than the deployment options that replace it.
    ray_args = (app.get("args") or {}).get("ray") or {}
    actor = engine.get("ray_actor_options") or {}
    for arg, option in (("engine_gpus", "num_gpus"), ("engine_cpus", "num_cpus")):
        if arg in ray_args and option in actor:
            assert ray_args[arg] == actor[option], f"{config.label}: args.ray.{arg} != ray_actor_options.{option}"
    ingress = _deployment(app, ray_app.INGRESS_DEPLOYMENT) or {}
    if "ingress_replicas" in ray_args and isinstance(ingress.get("num_replicas"), int):
        assert ray_args["ingress_replicas"] == ingress["num_replicas"], config.label


def _gpus(container: dict[str, Any]) -> int:
    resources = container.get("resources") or {}
    limit = int((resources.get("limits") or {}).get("nvidia.com/gpu", 0))
    request = (resources.get("requests") or {}).get("nvidia.com/gpu")
    assert request is None or int(request) == limit, f"{container.get('name')}: GPU requests must equal limits"
    return limit


@pytest.mark.parametrize("config", _rayservices(), ids=_ids(_rayservices()))
def test_rayservice_engine_gets_a_gpu(config: ServeConfig):
    (app,) = _applications(config)
    engine = _deployment(app, ray_app.ENGINE_DEPLOYMENT)
    assert engine is not None
    gpus_per_replica = (engine.get("ray_actor_options") or {}).get("num_gpus")
    assert gpus_per_replica == 1, f"{config.label}: {ray_app.ENGINE_DEPLOYMENT} must ask for num_gpus: 1"
    assert config.rayservice is not None
    workers = config.rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs") or []
    capacity = 0
    for group in workers:
        gpus = sum(_gpus(c) for c in group["template"]["spec"]["containers"])
        capacity += gpus * group.get("maxReplicas", group.get("replicas", 1))
    assert capacity >= 1, f"{config.label}: no worker group requests nvidia.com/gpu"
    max_replicas = engine["autoscaling_config"]["max_replicas"]
    assert capacity >= max_replicas * gpus_per_replica, (
        f"{config.label}: the GPU workers hold {capacity} GPUs, the engine scales to {max_replicas} replicas")


# ---------------------------------------------------------------------------------------------------------------
# 6. One application


@pytest.mark.parametrize("config", _rayservices(), ids=_ids(_rayservices()))
def test_rayservice_embeds_the_serve_config_file(config: ServeConfig):
    (file_config,) = [c for c in SERVE_CONFIGS if c.path == SERVE_CONFIG_FILE]
    assert config.body == file_config.body, (
        f"{config.label} differs from {SERVE_CONFIG_FILE.relative_to(ROOT)}: keep the two applications the same")
