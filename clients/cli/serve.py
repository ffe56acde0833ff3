"""`quiver serve`: load the base model and serve it over gRPC; flags map 1:1 onto the server configs."""

from __future__ import annotations

import argparse
import sys

from quiver.clients.cli.common import report_usage_error
from quiver.clients.cli.dataclass_args import add_config_arguments, configs_from_args
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig, ServerConfig

HELP = "start the gRPC and OpenAI-compatible HTTP server (default model: SmolLM2-135M-Instruct)"
CONFIGS = (ModelConfig, EngineConfig, ServerConfig, AdapterConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, CONFIGS)


def run(args: argparse.Namespace) -> int:
    try:
        model, engine, server, adapters = configs_from_args(args, CONFIGS)
    except ValueError as e:
        return report_usage_error(e)
    # Imported here: torch and transformers take seconds to import, client commands need neither.
    from quiver.common.errors import QuiverError
    from quiver.server.app import serve

    try:
        serve(model, engine, server, adapters)  # type: ignore[arg-type]
    except QuiverError as e:  # the model failed to load, or the configuration does not fit the store
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
