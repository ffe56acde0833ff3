"""What the client subcommands share: the `--server` flag and how a failed call is reported."""

from __future__ import annotations

import argparse
import os
import sys

from quiver.clients.errors import QuiverRpcError
from quiver.clients.types import DEFAULT_TARGET

SERVER_ENV = "QUIVER_SERVER"
"""Environment variable that overrides the default `--server`."""
API_KEY_ENV = "QUIVER_API_KEY"
"""Environment variable of the default `--api-key` (which keeps the key out of `ps`)."""

EXIT_RPC_ERROR = 1
"""Exit status of a command whose call failed."""
EXIT_USAGE = 2
"""Exit status of a command given arguments it cannot send (argparse uses 2 as well)."""


def add_server_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV, DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"address of the Quiver server (default: ${SERVER_ENV} or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the key of a server started with --api-key (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--tls-ca", help="PEM CA of the server's certificate: connect over TLS")
    parser.add_argument("--tls-cert", help="PEM client certificate, for a server requiring mutual TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")


def tls_options(args: argparse.Namespace) -> dict[str, str | None]:
    """The client's TLS keyword arguments from the flags `add_server_argument` added."""
    return {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def report_rpc_error(error: QuiverRpcError) -> int:
    """Prints `error: CODE: details` on stderr; returns the exit status."""
    print(f"error: {error.code.name}: {error.details}", file=sys.stderr)
    return EXIT_RPC_ERROR


def report_usage_error(error: ValueError) -> int:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_USAGE
