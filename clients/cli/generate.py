"""`quiver generate`: one completion from a running server; prints only the generated text."""

from __future__ import annotations

import argparse
import sys
from contextlib import closing
from typing import Any

from quiver.clients.cli.common import add_server_argument, report_rpc_error, report_usage_error, tls_options
from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError
from quiver.clients.types import TokenLogprob

HELP = "generate a completion (greedy unless --temperature is set) and print only its text"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_argument(parser)
    parser.add_argument(
        "prompt",
        metavar="PROMPT",
        help="prompt, sent raw (as one user message with --chat); '-' reads it from stdin as is",
    )
    parser.add_argument(
        "--adapter", default="", metavar="NAME", help="task adapter, NAME or NAME@VERSION; default: none"
    )
    parser.add_argument("--chat", action="store_true", help="send PROMPT through the model's chat template")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="default: the server's")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (the default) decodes greedily")
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens; 0 keeps all")
    parser.add_argument("--repetition-penalty", type=float, metavar="R", help="> 0; 1 disables it")
    parser.add_argument("--seed", type=int, metavar="N", help="seed of the sampler (for --temperature > 0)")
    parser.add_argument("--stop", action="append", default=[], metavar="S", help="stop before S (repeatable)")
    parser.add_argument(
        "--logprobs", type=int, metavar="N",
        help="also write each token's log-probability and the N most likely tokens to stderr, one line per "
        "token: id, log-probability, then id:log-probability pairs (tab-separated)",
    )


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The request's keyword arguments, shared by `generate` and `generate_stream`."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat:
        text: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    else:
        text = {"prompt": prompt}
    return {
        **text,
        "adapter": args.adapter,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
        "seed": args.seed,
        "logprobs": args.logprobs,
    }


def _write_logprobs(entries: list[TokenLogprob]) -> None:
    for entry in entries:
        top = "\t".join(f"{token}:{logprob:.4f}" for token, logprob in entry.top)
        sys.stderr.write(f"{entry.token_id}\t{entry.logprob:.4f}" + (f"\t{top}" if top else "") + "\n")


def run(args: argparse.Namespace) -> int:
    try:
        inputs = _inputs(args)
        with QuiverClient(args.server, api_key=args.api_key, **tls_options(args)) as client:
            if args.stream:
                logprobs: list[TokenLogprob] = []
                with closing(client.generate_stream(**inputs)) as chunks:
                    for chunk in chunks:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                        logprobs.extend(chunk.logprobs)
                print()
            else:
                generation = client.generate(**inputs)
                print(generation.text)
                logprobs = generation.logprobs
            _write_logprobs(logprobs)
    except QuiverRpcError as e:
        return report_rpc_error(e)
    except ValueError as e:
        return report_usage_error(e)
    return 0
