"""The manifests in deploy/ray and deploy/k8s, checked against the code they deploy.

No cluster runs here. Each check reads the YAML and holds the fields that must agree with the code to the code
itself:
- the `quiver serve` / `quiver serve-ray` flags a container passes, against the CLI's parser;
- the QUIVER_* and AWS_* environment variables the manifests set, against the names the code reads;
- the ports of containers, probes and Services, against the flags and the Serve config;
- each Serve config (deploy/ray/quiver.yaml, the RayService's serveConfigV2), against Ray's own schema, the
  application's constants and config dataclasses, and Ray's own application builder;
- GPUs and autoscaling of the engine deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import re
import shlex
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from quiver.clients.cli import COMMANDS, build_parser
from quiver.clients.cli.dataclass_args import from_args
from quiver.server import core
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig
from quiver.server.ray_serve import app as ray_app

ROOT = Path(__file__).resolve().parents[2]
MANIFEST_DIRS = (ROOT / "deploy" / "ray", ROOT / "deploy" / "k8s")
SERVE_CONFIG_FILE = ROOT / "deploy" / "ray" / "quiver.yaml"

SERVE_COMMANDS = ("serve", "serve-ray")
# Where each subcommand's ports land in the parsed flags (config class, fields): the flags map 1:1 onto them.
PORT_FIELDS = {"serve": ("ServerConfig", ("port", "http_port", "metrics_port")),
               "serve-ray": ("RayServeConfig", ("http_port", "grpc_port"))}

ARG_SECTIONS: dict[str, type] = {"model": ModelConfig, "engine": EngineConfig, "adapters": AdapterConfig,
                                 "ray": ray_app.RayServeConfig}
APP_BUILDER = "quiver.server.ray_serve.app:app_builder"

QUIVER_ENV = {core.API_KEY_ENV, core.ADMIN_TOKEN_ENV, "QUIVER_CACHE_DIR", "QUIVER_STORE_DIR"}
# The modules reading the names that have no constant; test_quiver_env_names_are_read_by_the_code keeps it honest.
ENV_READERS = {
    core.API_KEY_ENV: ("quiver.server.core",),
    core.ADMIN_TOKEN_ENV: ("quiver.server.core",),
    "QUIVER_CACHE_DIR": ("quiver.server.model_source", "quiver.adapters.stores"),
    "QUIVER_STORE_DIR": ("quiver.adapters.store",),
}
# boto3's standard environment (the store takes its endpoint and credentials from boto3's default chain).
AWS_ENV = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION"}


# ---------------------------------------------------------------------------------------------------------------
# Reading the manifests


@dataclass(frozen=True)
class Document:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.path.relative_to(ROOT)}#{self.index}"


@dataclass(frozen=True)
class ServeConfig:
    label: str
    path: Path
    body: dict[str, Any]
    rayservice: dict[str, Any] | None  # the RayService embedding it, if any


@dataclass(frozen=True)
class Invocation:
    """A container that runs `quiver serve` or `quiver serve-ray`."""

    document: Document
    container: dict[str, Any]
    pod: dict[str, Any]  # the pod template (metadata, spec) holding the container
    command: str  # "serve" or "serve-ray"
    argv: list[str]  # what follows the subcommand

    @property
    def label(self) -> str:
        return f"{self.document.label}:{self.container.get('name')}"


def _load_documents() -> list[Document]:
    documents = []
    for folder in MANIFEST_DIRS:
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            for index, body in enumerate(yaml.safe_load_all(path.read_text())):
                if body is None:
                    continue
                assert isinstance(body, dict), f"{path}#{index}: not a mapping"
                documents.append(Document(path, index, body))
    return documents


DOCUMENTS = _load_documents()


def _serve_configs() -> list[ServeConfig]:
    configs = []
    for doc in DOCUMENTS:
        if doc.body.get("kind") == "RayService":
            text = doc.body.get("spec", {}).get("serveConfigV2")
            assert isinstance(text, str), f"{doc.label}: spec.serveConfigV2 must be a YAML string"
            configs.append(ServeConfig(f"{doc.label}.serveConfigV2", doc.path, yaml.safe_load(text), doc.body))
        elif "applications" in doc.body and "kind" not in doc.body:
            configs.append(ServeConfig(doc.label, doc.path, doc.body, None))
    return configs


SERVE_CONFIGS = _serve_configs()


def _pods(node: Any) -> Iterator[dict[str, Any]]:
    """Every pod spec holder (a mapping whose `spec` has `containers`) in a manifest, e.g. a pod template."""
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and isinstance(node["spec"].get("containers"), list):
            yield node
        for value in node.values():
            yield from _pods(value)
    elif isinstance(node, list):
        for item in node:
            yield from _pods(item)


def _containers(doc: Document) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for pod in _pods(doc.body):
        for key in ("initContainers", "containers"):
            for container in pod["spec"].get(key) or []:
                yield pod, container


def _image_entrypoint() -> list[str]:
    """The Dockerfile's ENTRYPOINT: what a `quiver:*` container without `command` runs."""
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile has no exec-form ENTRYPOINT"
    entrypoint: list[str] = json.loads(match.group(1))
    return entrypoint


def _argv(doc: Document, container: dict[str, Any]) -> list[str]:
    command = [str(a) for a in container.get("command") or []]
    image = str(container.get("image", ""))
    # KubeRay replaces a Ray container's command with `ray start`; elsewhere the image's ENTRYPOINT stays.
    if not command and doc.body.get("kind") not in ("RayService", "RayCluster", "RayJob") and (
            image.split("/")[-1].startswith("quiver:") or image.split("/")[-1] == "quiver"):
        command = _image_entrypoint()
    tokens: list[str] = []
    for arg in [*command, *(str(a) for a in container.get("args") or [])]:
        # A shell wrapper (`sh -c "... quiver serve --port 1 ..."`): its script's words count too.
        tokens.extend(shlex.split(arg) if any(c.isspace() for c in arg) else [arg])
    return tokens


def _invocations() -> list[Invocation]:
    found = []
    for doc in DOCUMENTS:
        for pod, container in _containers(doc):
            tokens = _argv(doc, container)
            for i in range(len(tokens) - 1):
                if Path(tokens[i]).name == "quiver" and tokens[i + 1] in SERVE_COMMANDS:
                    rest = tokens[i + 2:]
                    ends = [j for j, t in enumerate(rest) if t in ("&&", "||", ";", "|", "&")]
                    found.append(Invocation(doc, container, pod, tokens[i + 1], rest[:ends[0]] if ends else rest))
                    break
    return found


INVOCATIONS = _invocations()


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: subparsers.choices[name] for name in SERVE_COMMANDS}


def _parse(invocation: Invocation) -> argparse.Namespace:
    """The container's command line parsed by the real parser, its configs built (and validated) as `run` does."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args([invocation.command, *invocation.argv])
    except SystemExit:
        pytest.fail(f"{invocation.label}: `quiver {invocation.command}` rejects its arguments: {stderr.getvalue()}")
    module = importlib.import_module(COMMANDS[invocation.command])
    for cls in module.CONFIGS:
        try:
            from_args(cls, args)
        except ValueError as e:
            pytest.fail(f"{invocation.label}: invalid `quiver {invocation.command}` flags: {e}")
    return args


def _flag_ports(invocation: Invocation) -> dict[str, int]:
    """`--flag` -> port for the ports the command line sets (or leaves at their defaults); 0 (off) left out."""
    args = _parse(invocation)
    cls, fields = PORT_FIELDS[invocation.command]
    ports = {f"--{f.replace('_', '-')}": getattr(args, f"{cls}.{f}") for f in fields}
    return {flag: port for flag, port in ports.items() if port}


def _container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    if str(port).isdigit():
        return int(port)
    named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    assert port in named, f"{container.get('name')}: no container port named {port!r}"
    return int(named[port])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def _applications(config: ServeConfig) -> list[dict[str, Any]]:
    apps = config.body.get("applications")
    assert isinstance(apps, list) and apps, f"{config.label}: no applications"
    return apps


def _deployment(app: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((d for d in app.get("deployments") or [] if d.get("name") == name), None)


def _schema(config: ServeConfig) -> Any:
    schema = pytest.importorskip("ray.serve.schema")
    return schema.ServeDeploySchema.model_validate(config.body)


def _ids(items: list[Any]) -> list[str]:
    return [item.label for item in items]


def test_the_manifests_are_found():
    names = {doc.path.name for doc in DOCUMENTS}
    assert {"quiver.yaml", "rayservice.yaml", "deployment.yaml"} <= names
    assert len(SERVE_CONFIGS) == 2  # deploy/ray/quiver.yaml and the RayService's serveConfigV2
    assert any(inv.command == "serve" for inv in INVOCATIONS)  # the plain Deployment: the checks below run


# ---------------------------------------------------------------------------------------------------------------
# 1. Flags


@pytest.mark.parametrize("invocation", INVOCATIONS, ids=_ids(INVOCATIONS))
def test_flags_are_options_of_the_subcommand(invocation: Invocation):
    parser = _subcommand_parsers()[invocation.command]
    options = {option for action in parser._actions for option in action.option_strings}
    for token in invocation.argv:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in options, f"{invocation.label}: `quiver {invocation.command}` has no option {flag}"
    _parse(invocation)  # and the whole command line parses into valid configs


# ---------------------------------------------------------------------------------------------------------------
# 2. Environment


def _env_names() -> list[tuple[str, str, dict[str, Any]]]:
    """(where, name, entry) for every environment variable the manifests set, on containers and in runtime_envs."""
    names = []
    for doc in DOCUMENTS:
        for _, container in _containers(doc):
            for name, entry in _env(container).items():
                names.append((f"{doc.label}:{container.get('name')}", name, entry))
    for config in SERVE_CONFIGS:
        for app in _applications(config):
            runtime_envs = [app.get("runtime_env") or {}] + [
                (d.get("ray_actor_options") or {}).get("runtime_env") or {} for d in app.get("deployments") or []]
            for runtime_env in runtime_envs:
                for name, value in (runtime_env.get("env_vars") or {}).items():
                    names.append((f"{config.label}:{app.get('name')}", name, {"name": name, "value": value}))
    return names


def test_env_names_are_ones_the_code_reads():
    names = _env_names()
    assert {core.API_KEY_ENV, core.ADMIN_TOKEN_ENV, "AWS_ACCESS_KEY_ID"} <= {name for _, name, _ in names}
    for where, name, entry in names:
        if name.startswith("QUIVER_"):
            assert name in QUIVER_ENV, f"{where}: Quiver reads no {name} (it reads {sorted(QUIVER_ENV)})"
        if name.startswith("AWS_"):
            assert name in AWS_ENV, f"{where}: {name} is not one of boto3's standard names {sorted(AWS_ENV)}"
        if name == "QUIVER_STORE_DIR":  # a directory only: an s3:// store is named by --store / adapters.store
            assert "://" not in str(entry.get("value", "")), f"{where}: QUIVER_STORE_DIR must be a directory"


@pytest.mark.parametrize("name", sorted(ENV_READERS))
def test_quiver_env_names_are_read_by_the_code(name: str):
    assert name in QUIVER_ENV
    for module in ENV_READERS[name]:
        source = inspect.getsource(importlib.import_module(module))
        constants = [c for c in ("API_KEY_ENV", "ADMIN_TOKEN_ENV") if getattr(core, c) == name]
        assert f'"{name}"' in source or any(f"environ.get({c})" in source for c in constants), (
            f"{module} no longer reads ${name}")


# ---------------------------------------------------------------------------------------------------------------
# 3. Ports


def _probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if container.get(kind):
            yield kind, container[kind]


@pytest.mark.parametrize("invocation", INVOCATIONS, ids=_ids(INVOCATIONS))
def test_container_ports_and_probes_use_the_flags_ports(invocation: Invocation):
    flags = _flag_ports(invocation)
    container = invocation.container
    declared = sorted(int(p["containerPort"]) for p in container.get("ports") or [])
    assert declared == sorted(flags.values()), (
        f"{invocation.label}: container ports {declared} differ from the flags' {flags}")
    for kind, probe in _probes(container):
        if "grpc" in probe:
            assert invocation.command == "serve", f"{invocation.label}: {kind}: Ray's proxy serves no grpc.health.v1"
            assert probe["grpc"]["port"] == flags["--port"], f"{invocation.label}: {kind} is not on --port"
            assert probe["grpc"].get("service", "") == "", f"{invocation.label}: {kind}: Quiver's overall health is ''"
        if "httpGet" in probe:
            port = _container_port(container, probe["httpGet"]["port"])
            assert port == flags["--http-port"], f"{invocation.label}: {kind} is not on --http-port"
            assert probe["httpGet"].get("path") == "/health", f"{invocation.label}: {kind}: Quiver's route is /health"
        if "tcpSocket" in probe:
            assert _container_port(container, probe["tcpSocket"]["port"]) in flags.values(), invocation.label
    args = _parse(invocation)
    if invocation.command == "serve":  # the pod's grace covers the server's drain
        grace = invocation.pod["spec"].get("terminationGracePeriodSeconds", 30)
        assert args.__dict__["ServerConfig.grace_seconds"] < grace, f"{invocation.label}: --grace-seconds >= the pod's"


@pytest.mark.parametrize("invocation", INVOCATIONS, ids=_ids(INVOCATIONS))
def test_services_target_the_flags_ports(invocation: Invocation):
    labels = invocation.pod.get("metadata", {}).get("labels") or {}
    flags = _flag_ports(invocation)
    services = [doc for doc in DOCUMENTS if doc.body.get("kind") == "Service" and doc.path == invocation.document.path
                and (selector := doc.body["spec"].get("selector")) and selector.items() <= labels.items()]
    assert services, f"{invocation.label}: no Service in {invocation.document.path.name} selects its pods"
    for service in services:
        for port in service.body["spec"]["ports"]:
            target = _container_port(invocation.container, port.get("targetPort", port["port"]))
            assert target in flags.values(), f"{service.label}: port {port.get('name')} targets {target}, not {flags}"


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
