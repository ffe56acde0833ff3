"""`quiver data`: training data made with a server. `synth` writes question/context/answer rows from documents;
`pairs` writes preference pairs for `quiver train --method dpo`. Flags map 1:1 onto SynthConfig and PairsConfig
(quiver.training.synth, quiver.training.pairs); both talk to --server, or to an in-process server over
--model/--store.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from quiver.clients.cli.common import EXIT_RPC_ERROR, report_rpc_error, report_usage_error
from quiver.clients.cli.dataclass_args import add_dataclass_args, add_log_level, from_args, setup_logging

HELP = "make training data with a server: `synth` (QA rows from documents), `pairs` (DPO preference pairs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from quiver.training.pairs import PairsConfig
    from quiver.training.synth import SynthConfig

    sub = parser.add_subparsers(dest="data_command", required=True, metavar="STEP")
    synth = sub.add_parser("synth", help="question/context/answer rows from documents, written by the served model")
    add_dataclass_args(synth, SynthConfig)
    add_log_level(synth, default="WARNING")
    synth.set_defaults(_data_run=_synth)
    pairs = sub.add_parser("pairs", help="prompt/chosen/rejected rows: samples of a server, ranked by a judge")
    add_dataclass_args(pairs, PairsConfig)
    add_log_level(pairs, default="WARNING")
    pairs.set_defaults(_data_run=_pairs)


def _synth(args: argparse.Namespace) -> Any:
    from quiver.server.local import local_server
    from quiver.training.synth import SynthConfig, synthesize

    config = from_args(SynthConfig, args)
    result = synthesize(config, local_server)
    print(f"{result.passages} passages ({result.skipped} done before): {result.rows} rows written to {config.out}; "
          f"dropped: {dict(sorted(result.dropped.items())) or 'none'}")
    return result


def _pairs(args: argparse.Namespace) -> Any:
    from quiver.server.local import local_server
    from quiver.training.pairs import PairsConfig, make_pairs

    config = from_args(PairsConfig, args)
    result = make_pairs(config, local_server)
    print(f"{result.prompts} prompts: {result.pairs} pairs written to {config.out}, {result.ties} without a pair")
    return result


def run(args: argparse.Namespace) -> int:
    setup_logging(args)
    from quiver.clients.errors import QuiverRpcError
    from quiver.common.errors import QuiverError

    try:
        args._data_run(args)
    except ValueError as e:
        return report_usage_error(e)
    except QuiverRpcError as e:
        return report_rpc_error(e)
    except (QuiverError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RPC_ERROR
    return 0
