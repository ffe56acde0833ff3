"""The Kubernetes manifests (deploy/k8s) and Serve configs, checked against the code: flags against the CLI's
parser, environment variables against the names the code reads, and ports of containers, probes and Services
against the flags and the Serve config."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

from quiver.server.api import core

from .manifests import (
    AWS_ENV,
    DOCUMENTS,
    ENV_READERS,
    INVOCATIONS,
    QUIVER_ENV,
    SERVE_CONFIGS,
    Invocation,
    _applications,
    _container_port,
    _containers,
    _env,
    _flag_ports,
    _ids,
    _parse,
    _probes,
    _subcommand_parsers,
)


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
    for where, name, _entry in names:
        if name.startswith("QUIVER_"):
            assert name in QUIVER_ENV, f"{where}: Quiver reads no {name} (it reads {sorted(QUIVER_ENV)})"
        if name.startswith("AWS_"):
            assert name in AWS_ENV, f"{where}: {name} is not one of boto3's standard names {sorted(AWS_ENV)}"


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
            path = probe["httpGet"].get("path")
            assert path in ("/health", "/ready"), f"{invocation.label}: {kind}: {path} is not a probe route"
        if "tcpSocket" in probe:
            assert _container_port(container, probe["tcpSocket"]["port"]) in flags.values(), invocation.label
    args = _parse(invocation)
    if invocation.command == "serve":  # the pod's grace covers the server's drain
        grace = invocation.pod["spec"].get("terminationGracePeriodSeconds", 30)
        assert args.__dict__["ServerConfig.drain_seconds"] < grace, f"{invocation.label}: --drain-seconds >= the pod's"


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
