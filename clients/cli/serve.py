"""`quiver serve`: load the base model and serve it over gRPC; flags map 1:1 onto the server configs, and each
can also come from $QUIVER_<FIELD> or a `--config` TOML file (dataclass_args.add_sourced_config_arguments)."""

from __future__ import annotations

import argparse
import sys

from quiver.clients.cli.common import report_usage_error
from quiver.clients.cli.config_render import config_toml, log_config
from quiver.clients.cli.dataclass_args import add_sourced_config_arguments, sourced_configs_from_args
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig, ServerConfig

HELP = "start the gRPC and OpenAI-compatible HTTP server (default model: SmolLM2-135M-Instruct)"
# The --config file's tables; in the order `serve` takes the configs.
SECTIONS: dict[str, type] = {"model": ModelConfig, "engine": EngineConfig, "server": ServerConfig,
                             "adapters": AdapterConfig}
CONFIGS = tuple(SECTIONS.values())  # what tests/deploy/manifests.py builds from a manifest's flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sourced_config_arguments(parser, SECTIONS)


def run(args: argparse.Namespace) -> int:
    try:
        configs = sourced_configs_from_args(args, SECTIONS)
    except ValueError as e:
        return report_usage_error(e)
    if args.print_config:
        print(config_toml(configs), end="")
        return 0
    from quiver.server.logging_setup import configure_logging  # no torch: --print-config stays fast above

    configure_logging(configs["server"].log_format)
    log_config(configs)
    # Imported here: torch and transformers take seconds to import, client commands need neither.
    from quiver.common.errors import QuiverError
    from quiver.server.app import serve

    try:
        return serve(*configs.values())  # 0 after a drain, 1 when the engine died
    except QuiverError as e:  # the model failed to load, or the configuration does not fit the store
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a file a flag names cannot be used (--tls-*)
        return report_usage_error(e)
