"""DialogSum DPO: preference-tune a LoRA so its summaries move from the base model's towards the human ones.

1. `quiver data pairs`' code asks an in-process server for the base model's greedy summary of each of the first
   --pairs training dialogues (prompted with the instruction "Summarize the conversation."): chosen = the
   reference summary, rejected = the base model's.
2. `quiver train --method dpo`'s code trains a LoRA on those pairs (reference = the base, adapter disabled).
3. `quiver eval`'s code scores the adapter against the base model on the first --eval-rows dev dialogues
   (ROUGE-1/2/L, BLEU, exact substring, the general-ability set), both prompted with the same instruction.

The data (Chen et al., 2021; CC BY-NC-SA 4.0) is never copied into the repository: pass its folder.

    python examples/dialogsum_dpo/run.py --data-dir ../shared/data/dialogsum --work /tmp/dialogsum-dpo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from quiver.adapters.registry import RegistrationOptions, open_registry
from quiver.server.local import local_server
from quiver.training.config import DataConfig, MethodConfig, TrainConfig
from quiver.training.evaluate import EvalConfig, evaluate
from quiver.training.pairs import PairsConfig, make_pairs
from quiver.training.train import train

INSTRUCTION = "Summarize the conversation."
ADAPTER = "dialogsum-dpo"


def prompts(data_dir: Path, work: Path, rows: int) -> Path:
    """The first `rows` training dialogues with their summaries, as `quiver data pairs` reads them."""
    path = work / "prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with (data_dir / "train.jsonl").open() as source, path.open("w") as out:
        for i, line in enumerate(source):
            if i >= rows:
                break
            row = json.loads(line)
            out.write(json.dumps({"dialogue": row["dialogue"], "summary": row["summary"]}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with train.jsonl and dev.jsonl")
    parser.add_argument("--work", type=Path, default=Path("dialogsum-dpo-work"), help="outputs, store and results")
    parser.add_argument("--pairs", type=int, default=240, help="first N training dialogues made into pairs")
    parser.add_argument("--steps", type=int, default=40, help="DPO optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft-weight", type=float, default=1.0, help="weight of the SFT term (0: pure DPO)")
    parser.add_argument("--max-length", type=int, default=320, help="tokens of prompt plus answer")
    parser.add_argument("--eval-rows", type=int, default=40, help="first N dev dialogues scored")
    parser.add_argument("--reuse-pairs", action="store_true", help="keep --work/pairs.jsonl of an earlier run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.monotonic()
    store = args.work / "store"
    open_registry(str(store), None)  # an empty store for the in-process server
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}

    pairs_file = args.work / "pairs.jsonl"
    if args.reuse_pairs and pairs_file.exists():
        results["pairs"] = {"reused": str(pairs_file), "pairs": len(pairs_file.read_text().splitlines())}
    else:
        result = make_pairs(PairsConfig(
            store=str(store), prompts=str(prompts(args.data_dir, args.work, args.pairs)), out=str(pairs_file),
            prompt_field="dialogue", reference_field="summary", instruction=INSTRUCTION, samples=1, temperature=0.0,
            max_new_tokens=64, concurrency=16,
        ), local_server)
        results["pairs"] = {"prompts": result.prompts, "pairs": result.pairs,
                            "seconds": round(time.monotonic() - started)}
    print(results["pairs"], flush=True)

    mark = time.monotonic()
    trained = train(
        DataConfig(data=(str(pairs_file),), instruction=INSTRUCTION, eval_fraction=0.1, max_length=args.max_length),
        MethodConfig(method="dpo", beta=args.beta, sft_weight=args.sft_weight),
        TrainConfig(output=str(args.work / "adapter"), max_steps=args.steps, learning_rate=args.learning_rate,
                    batch_size=args.batch_size, eval_steps=max(1, args.steps // 3), seed=args.seed),
    )
    metrics = json.loads((args.work / "adapter" / "metrics.json").read_text())
    results["train"] = {"steps": trained.global_step, "eval_loss": trained.final_eval_loss,
                        "reward_accuracy": metrics["final_reward_accuracy"],
                        "reward_margin": metrics["final_reward_margin"],
                        "seconds": round(time.monotonic() - mark)}
    print(results["train"], flush=True)

    open_registry(str(store), None).register(args.work / "adapter", RegistrationOptions(name=ADAPTER, mode="replace"))
    report = evaluate(EvalConfig(
        data=str(args.data_dir / "dev.jsonl"), adapter=ADAPTER, store=str(store), input_field="dialogue",
        output_field="summary", instruction=INSTRUCTION, limit=args.eval_rows, max_new_tokens=64,
        out=str(args.work / "eval.json"),
    ), local_server)
    print(report.table(), flush=True)
    results["eval"] = {"base": report.base, "adapter": report.adapted, "seconds": round(report.seconds)}
    results["total_seconds"] = round(time.monotonic() - started)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"total {results['total_seconds']} s; results in {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
