"""A server configured the way `quiver serve` configures one: its command line (and the QUIVER_* environment)
through the CLI's own config building, then started in-process over an already loaded model (ports are always
free ones on loopback)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from quiver.clients.cli import build_parser
from quiver.clients.cli.dataclass_args import sourced_configs_from_args
from quiver.clients.cli.serve import SECTIONS

from ...server_thread import ServerThread

PORT_FIELDS = ("host", "port", "metrics_port", "http_port")


def serve_configs(argv: Sequence[str]) -> dict[str, Any]:
    """`quiver serve ARGV`'s configs by section (model, engine, server, adapters), as `serve` builds them."""
    args = build_parser().parse_args(["serve", *argv])
    return sourced_configs_from_args(args, SECTIONS)


def start_as_cli(loaded: Any, argv: Sequence[str]) -> ServerThread:
    """A server over `loaded` with the engine, server and adapter configs of `quiver serve ARGV` (`--store` is
    needed: the default store is the user's own)."""
    assert "--store" in argv
    configs = serve_configs(argv)
    server = {k: v for k, v in dataclasses.asdict(configs["server"]).items() if k not in PORT_FIELDS}
    return ServerThread(loaded, configs["adapters"].store, configs["engine"], configs["adapters"], **server)
