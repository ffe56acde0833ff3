"""`quiver embed`: embed texts with a running server; prints one JSON object per input (JSON Lines)."""

from __future__ import annotations

import argparse
import json
import sys

from quiver.clients.cli.common import add_server_argument, report_rpc_error, report_usage_error, tls_options
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError

HELP = "embed texts (the base model's pooled last hidden states, under an adapter if given); prints JSON Lines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_argument(parser)
    parser.add_argument("texts", nargs="+", metavar="TEXT",
                        help="texts to embed; '-' reads one text per line from stdin (empty lines skipped)")
    parser.add_argument("--adapter", default="", metavar="NAME",
                        help="adapter of any kind, NAME or NAME@VERSION (its prompt template applies); default: none")
    parser.add_argument("--pooling", choices=("mean", "last"), default="mean",
                        help="mean over the tokens (default) or the last token's hidden state")
    parser.add_argument("--no-normalize", action="store_true", help="keep the raw vectors (default: unit length)")


def run(args: argparse.Namespace) -> int:
    texts = [line for text in args.texts
             for line in (sys.stdin.read().splitlines() if text == "-" else [text]) if line]
    try:
        with QuiverClient(args.server, api_key=args.api_key, **tls_options(args)) as client:
            done = client.embed(texts, adapter=args.adapter, pooling=args.pooling, normalize=not args.no_normalize)
    except QuiverRpcError as e:
        return report_rpc_error(e)
    except ValueError as e:  # a TLS file that cannot be read
        return report_usage_error(e)
    for i, (vector, tokens) in enumerate(zip(done.vectors, done.prompt_tokens, strict=True)):
        print(json.dumps({"index": i, "prompt_tokens": tokens, "embedding": vector}))
    return 0
