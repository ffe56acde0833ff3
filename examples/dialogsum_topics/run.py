"""DialogSum topics: classify dialogues into their 8 most frequent topics, and retrieve summaries by question.

Two classification adapters are trained on the CPU with `quiver train --task classify`'s code, registered in a
store under --work and scored with `quiver eval --task classify`'s code, all through Quiver's serving path:
- head: a linear head on the frozen base model's features (the feature-based approach, output layer only);
- lora: LoRA on the base model's layers with the head.

DialogSum's dev split has only 23 dialogues of these topics (0 to 11 each), so a stratified 20 % of the training
dialogues of each topic is held out as the dev set every score is reported on; the 23 dev-split dialogues are
scored as well. The baseline is the majority topic.

The retrieval demo embeds the 500 dev-split summaries with the served model (`Embed`), embeds the hand-written
questions of queries.jsonl (each names the summary it looks for), and reports recall@5 and MRR by cosine
similarity for the base model and under an adapter (the topic LoRA: an adapter changes the representation).

The data (Chen et al., 2021; CC BY-NC-SA 4.0) is never copied into the repository: pass its folder.

    python examples/dialogsum_topics/run.py --data-dir ../shared/data/dialogsum --work /tmp/dialogsum-topics
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from quiver.adapters.registry import RegistrationOptions, open_registry
from quiver.clients.client import QuiverClient
from quiver.server.local import local_server
from quiver.training.config import DataConfig, MethodConfig, TrainConfig
from quiver.training.evaluate import EvalConfig, evaluate
from quiver.training.train import train

HERE = Path(__file__).resolve().parent
TEXT, LABEL = "dialogue", "topic"
# Method -> (epochs, peak learning rate), the measured settings: both train in under 30 minutes on 2 cores.
METHODS: dict[str, tuple[float, float]] = {"head": (6.0, 3e-3), "lora": (1.5, 5e-4)}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split(data_dir: Path, work: Path, topics: int, holdout: float, seed: int) -> dict[str, Any]:
    """train.jsonl and heldout.jsonl (a stratified `holdout` of each topic's training dialogues) and dev.jsonl
    (the dev split's dialogues of the same topics) under `work`; the topics, most frequent first."""
    rows = read_jsonl(data_dir / "train.jsonl")
    chosen = [topic for topic, _ in Counter(row[LABEL] for row in rows).most_common(topics)]
    rng = random.Random(seed)
    train_rows: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    for topic in chosen:
        group = [{TEXT: row[TEXT], LABEL: topic} for row in rows if row[LABEL] == topic]
        rng.shuffle(group)
        cut = round(len(group) * holdout)
        held += group[:cut]
        train_rows += group[cut:]
    rng.shuffle(train_rows)
    dev = [{TEXT: row[TEXT], LABEL: row[LABEL]} for row in read_jsonl(data_dir / "dev.jsonl") if row[LABEL] in chosen]
    write_jsonl(work / "train.jsonl", train_rows)
    write_jsonl(work / "heldout.jsonl", held)
    write_jsonl(work / "dev.jsonl", dev)
    return {"topics": chosen, "train": len(train_rows), "heldout": len(held), "dev_split": len(dev),
            "per_topic": dict(Counter(row[LABEL] for row in train_rows + held))}


def train_one(method: str, args: argparse.Namespace) -> dict[str, Any]:
    epochs, rate = METHODS[method]
    started = time.monotonic()
    result = train(
        DataConfig(data=(str(args.work / "train.jsonl"),), task="classify", input_field=TEXT, label_field=LABEL,
                   eval_fraction=0.0, max_length=args.max_length),
        MethodConfig(method=method),  # type: ignore[arg-type]
        TrainConfig(output=str(args.work / method), epochs=epochs, learning_rate=rate, batch_size=args.batch_size,
                    seed=args.seed),
    )
    return {"steps": result.global_step, "epochs": epochs, "learning_rate": rate,
            "train_seconds": round(time.monotonic() - started, 1)}


def score(method: str, data: Path, baseline: str | None, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    report = evaluate(EvalConfig(
        data=str(data), adapter=f"topics-{method}", store=str(args.work / "store"), task="classify",
        input_field=TEXT, label_field=LABEL, baseline=baseline, out=str(args.work / f"eval-{method}-{tag}.json"),
    ), local_server)
    print(report.table(), flush=True)
    return {"baseline": report.settings["baseline"], "baseline_scores": report.base, "adapter_scores": report.adapted,
            "rows": report.counts["dev_rows"], "eval_seconds": round(report.seconds, 1)}


def ranks(corpus: np.ndarray, queries: np.ndarray, targets: list[int]) -> list[int]:
    """1-based rank of each query's target among the corpus by cosine similarity (rows are unit vectors)."""
    similarity = queries @ corpus.T  # (Q, N)
    return [int((similarity[q] > similarity[q, t]).sum()) + 1 for q, t in enumerate(targets)]


def retrieval(args: argparse.Namespace, adapters: list[str]) -> dict[str, Any]:
    """Recall@5 and MRR of the questions against the dev summaries, per pooling, for the base and each adapter."""
    dev = read_jsonl(args.data_dir / "dev.jsonl")
    index = {row["fname"]: i for i, row in enumerate(dev)}
    queries = read_jsonl(HERE / "queries.jsonl")
    targets = [index[q["fname"]] for q in queries]
    summaries = [row["summary"] for row in dev]
    out: dict[str, Any] = {"corpus": len(summaries), "queries": len(queries), "runs": []}
    with local_server(None, str(args.work / "store")) as target, QuiverClient(target) as client:
        for adapter in ["", *adapters]:
            for pooling in ("mean", "last"):
                started = time.monotonic()
                corpus = np.concatenate([
                    np.asarray(client.embed(summaries[i:i + 32], adapter=adapter, pooling=pooling).vectors)
                    for i in range(0, len(summaries), 32)])
                asked = np.asarray(client.embed([q["question"] for q in queries], adapter=adapter,
                                                pooling=pooling).vectors)
                found = ranks(corpus, asked, targets)
                run = {"adapter": adapter or "(base)", "pooling": pooling,
                       "recall_at_5": round(sum(r <= 5 for r in found) / len(found), 3),
                       "mrr": round(float(np.mean([1 / r for r in found])), 3),
                       "seconds": round(time.monotonic() - started, 1)}
                print(run, flush=True)
                out["runs"].append(run)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with train.jsonl and dev.jsonl")
    parser.add_argument("--work", type=Path, default=Path("dialogsum-topics-work"), help="outputs, store, results")
    parser.add_argument("--topics", type=int, default=8, help="the N most frequent training topics")
    parser.add_argument("--holdout", type=float, default=0.2, help="share of each topic's dialogues held out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per dialogue (cut from the left)")
    parser.add_argument("--methods", default="head,lora", help="comma-separated: head, lora")
    parser.add_argument("--steps", default="train,eval,retrieval", help="comma-separated: train, eval, retrieval")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    steps, methods = args.steps.split(","), args.methods.split(",")
    results_file = args.work / "results.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.exists() else {}
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    results["data"] = split(args.data_dir, args.work, args.topics, args.holdout, args.seed)
    registry = open_registry(str(args.work / "store"), None)
    for method in methods:
        entry = results.setdefault("adapters", {}).setdefault(method, {})
        if "train" in steps:
            entry.update(train_one(method, args))
            registry.register(args.work / method, RegistrationOptions(name=f"topics-{method}", mode="replace"))
        if "eval" in steps:
            entry["heldout"] = score(method, args.work / "heldout.jsonl", None, args, "heldout")
            entry["dev_split"] = score(method, args.work / "dev.jsonl", None, args, "dev")
        results_file.write_text(json.dumps(results, indent=2))
    if "retrieval" in steps:
        results["retrieval"] = retrieval(args, [f"topics-{m}" for m in methods if m == "lora"])
    results_file.write_text(json.dumps(results, indent=2))
    print(f"results in {results_file}")


if __name__ == "__main__":
    main()
