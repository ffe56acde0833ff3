"""Docs QA: synthesize question/answer data from library documentation with the served model, train a LoRA on it,
and show that the adapter answers held-out questions better than the base model.

1. Documents: the long descriptions (READMEs) that installed dependencies of Quiver ship in their package
   metadata — nothing is downloaded. Code blocks, HTML, tables and badges are dropped; prose stays.
2. `quiver data synth`'s code, on an in-process server over the default model: passages, a summary of each,
   questions whose answer is that summary, filtered.
3. Split by question: of each passage with two or more kept questions, one is held out (dev); the others train.
   The held-out questions are new wordings about passages the adapter learnt: closed-book recall of the
   documents, which the base model never saw in this form.
4. `quiver train`'s code trains a LoRA (question -> answer); `quiver eval`'s code scores it against the base model
   on the held-out questions (ROUGE-L and the exact-substring answer rate, plus the general-ability set), both
   prompted with the same instruction.

    python examples/docs_qa/run.py --work /tmp/docs-qa
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from quiver.adapters.registry import RegistrationOptions, open_registry
from quiver.server.local import local_server
from quiver.training.config import DataConfig, MethodConfig, TrainConfig
from quiver.training.evaluate import EvalConfig, evaluate
from quiver.training.synth import SynthConfig, synthesize
from quiver.training.train import train

# Dependencies whose READMEs are mostly prose about what the library does.
PACKAGES = ("sacrebleu", "peft", "accelerate", "transformers", "trl", "bitsandbytes", "tokenizers", "safetensors",
            "uvicorn", "httpx", "boto3", "gguf", "grpcio", "rouge-score", "fastapi", "tqdm")
INSTRUCTION = "Answer the question about Python machine-learning and web libraries."
ADAPTER = "docs-qa"
_FENCE = re.compile(r"```.*?```", re.DOTALL)
_HTML = re.compile(r"<[^>]+>")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


def prose(markdown: str) -> str:
    """The README's prose paragraphs: no code blocks, HTML, tables, badges, bare links or one-word lines."""
    text = _LINK.sub(r"\1", _HTML.sub("", _FENCE.sub("", markdown)))
    kept = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [ln for ln in paragraph.splitlines() if not ln.lstrip().startswith(("|", ">>>", "$ ", "    "))]
        joined = " ".join(ln.strip() for ln in lines).strip()
        if len(joined.split()) >= 8 and not joined.startswith(("http", "pip install")):
            kept.append(joined)
    return "\n\n".join(kept)


def write_documents(folder: Path) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for package in PACKAGES:
        try:
            meta = importlib.metadata.metadata(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        text = prose(meta.get_payload() or meta.get("Description") or "")  # type: ignore[attr-defined]
        if text:
            (folder / f"{package}.md").write_text(f"# {package}\n\n{text}\n")
            written.append({"package": package, "version": meta["Version"], "words": len(text.split())})
    return written


def split_by_question(rows: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, dev): one question of every passage with two or more goes to dev."""
    by_passage: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_passage[row["passage_id"]].append(row)
    rng = random.Random(seed)
    train_rows, dev = [], []
    for group in by_passage.values():
        if len(group) >= 2:
            held = rng.randrange(len(group))
            dev.append(group[held])
            group = group[:held] + group[held + 1:]
        train_rows += group
    return train_rows, dev


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("docs-qa-work"), help="documents, data, store, results")
    parser.add_argument("--passages", type=int, default=None, help="most passages synthesized from (default: all)")
    parser.add_argument("--min-support", type=float, default=0.3,
                        help="least share of an answer's content words in its passage (the 135M model paraphrases)")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--learning-rate", type=float, default=4e-4)
    parser.add_argument("--eval-rows", type=int, default=60, help="most held-out questions scored")
    parser.add_argument("--summary-template", default=None, help="file with the summary prompt (default: built in)")
    parser.add_argument("--question-template", default=None, help="file with the question prompt (default: built in)")
    parser.add_argument("--questions", type=int, default=3, help="questions asked per passage")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=False,
                        help="train through the base's chat template (quiver train's default); the README's numbers "
                        "were measured without it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.monotonic()
    store = args.work / "store"
    open_registry(str(store), None)
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()},
                               "documents": write_documents(args.work / "docs")}
    synth = synthesize(SynthConfig(
        store=str(store), documents=(str(args.work / "docs"),), out=str(args.work / "qa.jsonl"),
        max_passage_tokens=160, overlap_tokens=0, questions=args.questions, max_new_tokens=96, concurrency=16,
        limit=args.passages, seed=args.seed, min_support=args.min_support, summary_template=args.summary_template,
        question_template=args.question_template,
    ), local_server)
    rows = [json.loads(line) for line in (args.work / "qa.jsonl").read_text().splitlines()]
    train_rows, dev = split_by_question(rows, args.seed)
    results["synth"] = {"passages": synth.passages, "rows": len(rows), "dropped": synth.dropped,
                        "train": len(train_rows), "dev": len(dev), "seconds": round(time.monotonic() - started)}
    print(results["synth"], flush=True)

    mark = time.monotonic()
    trained = train(
        DataConfig(data=(str(write_jsonl(args.work / "train.jsonl", train_rows)),), input_field="question",
                   output_field="answer", instruction=INSTRUCTION, eval_fraction=0.0, max_length=192,
                   chat_template=args.chat_template),
        MethodConfig(method="lora"),
        TrainConfig(output=str(args.work / "adapter"), epochs=args.epochs, learning_rate=args.learning_rate,
                    batch_size=8, seed=args.seed),
    )
    results["train"] = {"steps": trained.global_step, "seconds": round(time.monotonic() - mark)}
    print(results["train"], flush=True)

    open_registry(str(store), None).register(args.work / "adapter", RegistrationOptions(name=ADAPTER, mode="replace"))
    report = evaluate(EvalConfig(
        data=str(write_jsonl(args.work / "dev.jsonl", dev)), adapter=ADAPTER, store=str(store),
        input_field="question", output_field="answer", instruction=INSTRUCTION, limit=args.eval_rows,
        max_new_tokens=96, concurrency=16, out=str(args.work / "eval.json"),
    ), local_server)
    print(report.table(), flush=True)
    results["eval"] = {"base": report.base, "adapter": report.adapted, "rows": report.counts["dev_rows"],
                       "seconds": round(report.seconds)}
    results["total_seconds"] = round(time.monotonic() - started)
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"total {results['total_seconds']} s; results in {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
