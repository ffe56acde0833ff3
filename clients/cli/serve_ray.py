"""`quiver serve-ray`: serve on Ray Serve (engine replicas behind one ingress, adapter-affinity routing); flags map
1:1 onto the model, engine and adapter configs and onto RayServeConfig, and each can also come from
$QUIVER_<FIELD> or a `--config` TOML file (dataclass_args.add_sourced_config_arguments)."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from quiver.clients.cli.common import report_usage_error
from quiver.clients.cli.config_render import config_toml, log_config
from quiver.clients.cli.dataclass_args import add_sourced_config_arguments, sourced_configs_from_args
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig
from quiver.server.ray_serve.app import RayServeConfig

HELP = "serve on Ray Serve: engine replicas behind one HTTP/gRPC ingress, routed by adapter (needs quiver-serve[ray])"
# The --config file's tables, named as a Serve config file's application args (server/ray_serve/app.py:app_builder).
SECTIONS: dict[str, type] = {"model": ModelConfig, "engine": EngineConfig, "adapters": AdapterConfig,
                             "ray": RayServeConfig}
CONFIGS = tuple(SECTIONS.values())  # what tests/deploy/manifests.py builds from a manifest's flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sourced_config_arguments(parser, SECTIONS)


def run(args: argparse.Namespace) -> int:
    try:
        # The replicas read $QUIVER_API_KEY / $QUIVER_ADMIN_TOKEN themselves: secrets stay out of Serve's app args.
        configs = sourced_configs_from_args(args, SECTIONS, secrets_from_env=False)
    except ValueError as e:
        return report_usage_error(e)
    if args.print_config:
        print(config_toml(configs), end="")
        return 0
    if importlib.util.find_spec("ray") is None:
        print("error: quiver serve-ray needs Ray Serve: pip install 'quiver-serve[ray]'", file=sys.stderr)
        return 1
    log_config(configs)
    from quiver.common.errors import QuiverError
    from quiver.server.ray_serve.app import serve_ray

    try:
        serve_ray(*configs.values())
    except QuiverError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
