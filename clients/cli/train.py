"""`quiver train`: train a LoRA, QLoRA, prompt-tuning or prefix-tuning adapter; flags map 1:1 onto the configs.

Runs unchanged under `torchrun --nproc_per_node N "$(which quiver)" train ...` (data-parallel); only
process zero writes the adapter and registers it.
"""

from __future__ import annotations

import argparse
import sys

from quiver.clients.cli.common import report_rpc_error, report_usage_error
from quiver.clients.cli.dataclass_args import add_config_arguments, configs_from_args
from quiver.training.config import DataConfig, MethodConfig, RegisterConfig, TrainConfig

HELP = "train a LoRA, QLoRA, prompt-tuning or prefix-tuning adapter on JSONL data"
CONFIGS = (DataConfig, MethodConfig, TrainConfig, RegisterConfig)
EXIT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, CONFIGS)


def run(args: argparse.Namespace) -> int:
    try:
        data, method, train_config, register = configs_from_args(args, CONFIGS)
    except ValueError as e:
        return report_usage_error(e)
    # Imported here: torch, transformers and peft take seconds to import.
    from quiver.clients.errors import QuiverRpcError
    from quiver.common.errors import QuiverError
    from quiver.training.train import train

    try:
        result = train(data, method, train_config, register)  # type: ignore[arg-type]
    except ValueError as e:
        return report_usage_error(e)
    except QuiverError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except QuiverRpcError as e:
        print(f"the adapter was written to {train_config.output}, but registering it failed:",  # type: ignore[attr-defined]
              file=sys.stderr)
        return report_rpc_error(e)
    if result.written:
        loss = "n/a" if result.final_eval_loss is None else f"{result.final_eval_loss:.4f}"
        print(f"adapter: {result.output} (steps {result.global_step}, eval loss {loss})")
        if result.registered is not None:
            print(f"registered: {result.registered.name}@{result.registered.version}")
    return 0
