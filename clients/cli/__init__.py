"""The `quiver` command: a registry of subcommands, each a module with HELP, add_arguments and run.

Subcommand modules import heavy dependencies (torch) inside `run`, so client commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand name -> module implementing it.
COMMANDS: dict[str, str] = {
    "serve": "quiver.clients.cli.serve",
    "serve-ray": "quiver.clients.cli.serve_ray",
    "generate": "quiver.clients.cli.generate",
    "embed": "quiver.clients.cli.embed",
    "classify": "quiver.clients.cli.classify",
    "info": "quiver.clients.cli.info",
    "adapters": "quiver.clients.cli.adapters",
    "train": "quiver.clients.cli.train",
    "eval": "quiver.clients.cli.eval",
    "data": "quiver.clients.cli.data",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quiver", description="Quiver: one base LLM, many task adapters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args._run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
