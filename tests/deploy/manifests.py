"""Reading the manifests in deploy/ray and deploy/k8s for the checks against the code: every YAML document, the
containers that run `quiver serve` / `quiver serve-ray` and their command lines, and the Serve configs (the config
file and each RayService's serveConfigV2)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from quiver.clients.cli import COMMANDS, build_parser
from quiver.clients.cli.dataclass_args import from_args
from quiver.server.api import core
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
    core.API_KEY_ENV: ("quiver.server.api.core",),
    core.ADMIN_TOKEN_ENV: ("quiver.server.api.core",),
    "QUIVER_CACHE_DIR": ("quiver.common.model_source", "quiver.adapters.stores"),
    "QUIVER_STORE_DIR": ("quiver.adapters.store", "quiver.adapters.stores"),
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


def _probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if container.get(kind):
            yield kind, container[kind]
