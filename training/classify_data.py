"""Classification data: JSONL rows with a text and a label, their label set, a held-out split, and tokenization.

Tokenization follows the serving path: the input is formatted by the prompt template (`{input}`, or the
instruction above it) and tokenized without special tokens; a classification row is read at its last token
(server/engine/pooling.py), so a text longer than `max_length` loses its start, never its end.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quiver.common.errors import InvalidArgument


@dataclass(frozen=True)
class LabeledText:
    text: str
    label: str


def read_labeled(path: Path, text_field: str, label_field: str) -> tuple[list[LabeledText], list[str]]:
    """The usable rows of a JSONL file, and a "path:line: problem" for each skipped one. A label may be a string
    or an integer (kept as its decimal text); a file with no usable row raises InvalidArgument."""
    rows: list[LabeledText] = []
    problems: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            problems.append(f"{path}:{number}: not JSON ({e})")
            continue
        text = row.get(text_field) if isinstance(row, dict) else None
        label = row.get(label_field) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{path}:{number}: no text in {text_field!r}")
        elif isinstance(label, bool) or not isinstance(label, str | int) or not str(label).strip():
            problems.append(f"{path}:{number}: no string or integer label in {label_field!r}")
        else:
            rows.append(LabeledText(text, str(label)))
    if not rows:
        raise InvalidArgument("data", f"{path}: no usable row ({'; '.join(problems[:3]) or 'the file is empty'})")
    return rows, problems


def label_set(rows: list[LabeledText]) -> tuple[str, ...]:
    """The labels, most frequent first (ties by name): the head's output order."""
    counts = Counter(row.label for row in rows)
    return tuple(sorted(counts, key=lambda label: (-counts[label], label)))


def split_labeled(rows: list[LabeledText], fraction: float, seed: int) -> tuple[list[LabeledText], list[LabeledText]]:
    """(train, eval): the `fraction` of rows (at least one) whose seeded hash of the text is smallest, so the split
    depends only on the rows and the seed, and repeated texts land on the same side."""
    def key(row: LabeledText) -> str:
        return hashlib.sha256(f"{seed}\0{row.text}".encode()).hexdigest()

    wanted = max(1, round(fraction * len(rows)))
    if wanted >= len(rows):
        raise InvalidArgument("eval_fraction", f"holds out {wanted} of {len(rows)} rows: nothing left to train on")
    cut = key(sorted(rows, key=key)[wanted - 1])
    return [r for r in rows if key(r) > cut], [r for r in rows if key(r) <= cut]


def classification_template(instruction: str | None) -> str:
    """The prompt template rows are formatted with (and registered with, so serving formats inputs the same)."""
    if instruction is None:
        return "{input}"
    escaped = instruction.replace("{", "{{").replace("}", "}}")
    return f"{escaped}\n\n{{input}}"


def tokenize_labeled(tokenizer: Any, template: str, rows: list[LabeledText], labels: tuple[str, ...],
                     max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Model features (input_ids, attention_mask, labels: the label's index) and how many texts lost their start.
    Rows whose label is not in `labels` (an eval label never seen in training) are refused."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({row.label for row in rows} - index.keys())
    if unknown:
        raise InvalidArgument("data", f"eval labels never seen in training: {unknown[:5]}")
    features, cut = [], 0
    for row in rows:
        ids = list(tokenizer(template.format(input=row.text), add_special_tokens=False)["input_ids"])
        if len(ids) > max_length:
            ids, cut = ids[-max_length:], cut + 1
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": index[row.label]})
    return features, cut


def accuracy_and_macro_f1(predicted: list[int], actual: list[int], classes: int) -> dict[str, float]:
    """Accuracy and the unweighted mean over classes of F1 (a class never predicted nor present scores 0 and is
    left out of the mean, as scikit-learn's `f1_score(average="macro")` with labels present)."""
    correct = sum(p == a for p, a in zip(predicted, actual, strict=True))
    scores = []
    for c in range(classes):
        tp = sum(p == c and a == c for p, a in zip(predicted, actual, strict=True))
        fp = sum(p == c and a != c for p, a in zip(predicted, actual, strict=True))
        fn = sum(p != c and a == c for p, a in zip(predicted, actual, strict=True))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / len(actual) if actual else 0.0,
            "macro_f1": sum(scores) / len(scores) if scores else 0.0}
