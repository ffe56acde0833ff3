"""`quiver classify`: classify texts with a classification adapter on a running server; prints JSON Lines."""

from __future__ import annotations

import argparse
import json
import sys

from quiver.clients.cli.common import add_server_argument, report_rpc_error, report_usage_error, tls_options
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError

HELP = "classify texts with a classification (SEQ_CLS) adapter; prints each text's label and probabilities"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_argument(parser)
    parser.add_argument("texts", nargs="+", metavar="TEXT",
                        help="texts to classify; '-' reads one text per line from stdin (empty lines skipped)")
    parser.add_argument("--adapter", required=True, metavar="NAME", help="classification adapter, NAME or NAME@VERSION")


def run(args: argparse.Namespace) -> int:
    texts = [line for text in args.texts
             for line in (sys.stdin.read().splitlines() if text == "-" else [text]) if line]
    try:
        with QuiverClient(args.server, api_key=args.api_key, **tls_options(args)) as client:
            results = client.classify(texts, adapter=args.adapter)
    except QuiverRpcError as e:
        return report_rpc_error(e)
    except ValueError as e:  # a TLS file that cannot be read
        return report_usage_error(e)
    for i, result in enumerate(results):
        print(json.dumps({"index": i, "label": result.label, "probabilities": result.probabilities,
                          "prompt_tokens": result.prompt_tokens}))
    return 0
