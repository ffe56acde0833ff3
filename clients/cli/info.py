"""`quiver info`: describe the base model a running server holds."""

from __future__ import annotations

import argparse
import dataclasses
import json

from quiver.clients.cli.common import add_server_argument, report_rpc_error, report_usage_error, tls_options
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError

HELP = "print the server's base model info, one `key: value` per line"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")


def run(args: argparse.Namespace) -> int:
    try:
        with QuiverClient(args.server, api_key=args.api_key, **tls_options(args)) as client:
            info = client.model_info()
    except QuiverRpcError as e:
        return report_rpc_error(e)
    except ValueError as e:  # a TLS file that cannot be read
        return report_usage_error(e)
    values = dataclasses.asdict(info)
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        for key, value in values.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, bool) else value}")
    return 0
