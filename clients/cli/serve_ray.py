"""`quiver serve-ray`: serve on Ray Serve (engine replicas behind one ingress, adapter-affinity routing); flags map
1:1 onto the model, engine and adapter configs and onto RayServeConfig."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from quiver.clients.cli.common import report_usage_error
from quiver.clients.cli.dataclass_args import add_config_arguments, configs_from_args
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig
from quiver.server.ray_serve.app import RayServeConfig

HELP = "serve on Ray Serve: engine replicas behind one HTTP/gRPC ingress, routed by adapter (needs quiver-serve[ray])"
CONFIGS = (ModelConfig, EngineConfig, AdapterConfig, RayServeConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, CONFIGS)


def run(args: argparse.Namespace) -> int:
    try:
        model, engine, adapters, ray_config = configs_from_args(args, CONFIGS)
    except ValueError as e:
        return report_usage_error(e)
    if importlib.util.find_spec("ray") is None:
        print("error: quiver serve-ray needs Ray Serve: pip install 'quiver-serve[ray]'", file=sys.stderr)
        return 1
    from quiver.common.errors import QuiverError
    from quiver.server.ray_serve.app import serve_ray

    try:
        serve_ray(model, engine, adapters, ray_config)  # type: ignore[arg-type]
    except QuiverError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
