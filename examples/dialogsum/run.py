"""DialogSum example: train adapters on the CPU, each within a time budget, and score each against the base model.

The defaults are the measured run (README.md): LoRA, prefix tuning and prompt tuning, 30 minutes each with only
`quiver train`'s defaults, then scored on the first 100 dev dialogues — about 1 h 45 min on 2 CPU cores.

The data (Chen et al., 2021; CC BY-NC-SA 4.0) is never copied into the repository: pass its folder.

    python examples/dialogsum/run.py --data-dir ../shared/data/dialogsum --work /tmp/dialogsum

Every adapter uses the instruction "Summarize the conversation." as its hard prompt, so the base model is
scored zero-shot with the same instruction. Everything goes through Quiver's own trainer, store and serving
path; the summary table and `results.json` land in --work.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from quiver.adapters.registry import RegistrationOptions, open_registry
from quiver.server.local import local_server
from quiver.training.config import DataConfig, MethodConfig, TrainConfig
from quiver.training.evaluate import EvalConfig, evaluate
from quiver.training.train import train

INSTRUCTION = "Summarize the conversation."
FIELDS = {"input_field": "dialogue", "output_field": "summary", "instruction": INSTRUCTION}
# Name -> quiver train's method. Its rate, shape and initialisation are quiver train's defaults for the method
# (what a user passing only data, fields, instruction and a budget gets) unless --learning-rate is given.
METHODS = {"lora": "lora", "prompt": "prompt-tuning", "prefix": "prefix-tuning", "qlora": "qlora"}

# A QLoRA adapter is scored where it is meant to be served: over the nf4 base it was trained on (`quiver serve
# --quantize nf4`, the GPU default); every other adapter, and the base beside it, over the float32 base.
SERVED_OVER = {"qlora": "nf4"}


def _subset(source: Path, dest: Path, rows: int) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with source.open() as inp, dest.open("w") as out:
        for i, line in enumerate(inp):
            if i >= rows:
                break
            out.write(line)
    return dest


def _train(name: str, args: argparse.Namespace, train_file: Path) -> dict[str, Any]:
    method = METHODS[name]
    started = time.monotonic()
    if args.steps is None:
        run = TrainConfig(output=str(args.work / name), time_budget=args.time_budget, seed=args.seed,
                          learning_rate=args.learning_rate)
    else:
        run = TrainConfig(output=str(args.work / name), max_steps=args.steps, learning_rate=args.learning_rate,
                          batch_size=args.batch_size, eval_steps=max(1, args.steps // 4), seed=args.seed)
    result = train(
        DataConfig(data=(str(train_file),), eval_fraction=0.05, chat_template=args.chat_template,
                   **({} if args.max_length is None else {"max_length": args.max_length}), **FIELDS),
        MethodConfig(method=method),  # type: ignore[arg-type]
        run,
    )
    return {"steps": result.global_step, "eval_loss": result.final_eval_loss,
            "train_seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with train.jsonl and dev.jsonl")
    parser.add_argument("--work", type=Path, default=Path("dialogsum-work"), help="outputs, store and results")
    parser.add_argument("--train-rows", type=int, default=2000, help="first N training dialogues")
    parser.add_argument("--time-budget", type=float, default=30.0,
                        help="minutes per adapter, with quiver train's defaults for everything else")
    parser.add_argument("--steps", type=int, default=None,
                        help="fixed optimizer steps per adapter instead of --time-budget")
    parser.add_argument("--batch-size", type=int, default=4, help="with --steps")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per example (prompt cut from the left); default: quiver train's (512)")
    parser.add_argument("--eval-rows", type=int, default=100, help="first N dev dialogues scored (500: all)")
    parser.add_argument("--methods", default="lora,prefix,prompt", help="comma-separated: lora, prompt, prefix, qlora")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                        help="train through the base's chat template (quiver train's default)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="peak rate for every method instead of its default (for tuning runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.monotonic()
    train_file = _subset(args.data_dir / "train.jsonl", args.work / "train-subset.jsonl", args.train_rows)
    registry = open_registry(str(args.work / "store"), None)
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}, "adapters": {}}
    for name in args.methods.split(","):
        entry = _train(name, args, train_file)
        adapter = f"dialogsum-{name}"
        registry.register(args.work / name, RegistrationOptions(name=adapter, mode="replace"))
        report = evaluate(EvalConfig(
            data=str(args.data_dir / "dev.jsonl"), adapter=adapter, store=str(args.work / "store"),
            limit=args.eval_rows, max_new_tokens=64, out=str(args.work / f"eval-{name}.json"), **FIELDS,
        ), partial(local_server, quantize=SERVED_OVER.get(name, "auto")))
        print(report.table(), flush=True)
        entry.update(base=report.base, adapter=report.adapted, eval_seconds=round(report.seconds, 1))
        results["adapters"][name] = entry
    results["total_seconds"] = round(time.monotonic() - started, 1)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"total {results['total_seconds']} s; results in {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
