"""`quiver eval`: score an adapter against its base model on dev rows and a general-ability set.

Flags map 1:1 onto quiver.training.evaluate.EvalConfig. Prints a table (metric | base | adapter | Δ) and writes
the JSON report (--out).
"""

from __future__ import annotations

import argparse
import sys

from quiver.clients.cli.common import EXIT_RPC_ERROR, report_rpc_error, report_usage_error
from quiver.clients.cli.dataclass_args import add_dataclass_args, add_log_level, from_args, setup_logging
from quiver.training.evaluate import EvalConfig

HELP = "compare an adapter with its base model on dev data (ROUGE, BLEU) and a general-ability set"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, EvalConfig)
    add_log_level(parser, default="WARNING")


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    try:
        config = from_args(EvalConfig, args)
    except ValueError as e:
        return report_usage_error(e)
    # Imported here: the local mode loads torch and transformers.
    from quiver.clients.errors import QuiverRpcError
    from quiver.common.errors import QuiverError
    from quiver.server.local import local_server
    from quiver.training.evaluate import evaluate

    try:
        report = evaluate(config, local_server)
    except QuiverRpcError as e:
        return report_rpc_error(e)
    except QuiverError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RPC_ERROR
    except OSError as e:
        print(f"error: cannot write the report: {e}", file=sys.stderr)
        return EXIT_RPC_ERROR
    counts = report.counts
    print(f"{report.adapter}: {counts['dev_rows']} dev rows, {counts['general_items']} general prompts, "
          f"{report.seconds:.1f}s")
    print(report.table())
    print(f"report: {config.out_path()}")
    return 0
