"""`quiver eval --task classify`: accuracy and macro-F1 of a classification adapter on labelled dev rows, beside a
baseline: another classifier (`--baseline`, e.g. the `head` one: the feature-based approach on the base model's
features) or, without one, the majority label (the adapter's first: labels are stored most frequent first).

Predictions come from the running server's `Classify`, exactly as served. There is no general-ability check: a
classification adapter never changes what the base model generates (adapters do not touch the base), and it
cannot generate itself.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quiver.clients.client import QuiverClient
from quiver.training.classify_data import LabeledText, accuracy_and_macro_f1, read_labeled
from quiver.training.evaluate import SAMPLES, EvalConfig, EvalReport

CLASSIFY_METRICS = ("accuracy", "macro_f1")
BATCH = 64  # inputs per Classify call (each a row of the server's batch)


def predict(client: QuiverClient, texts: Sequence[str], adapter: str) -> list[str]:
    """The adapter's most likely label for each text, in order."""
    out: list[str] = []
    for start in range(0, len(texts), BATCH):
        out += [r.label for r in client.classify(list(texts[start:start + BATCH]), adapter=adapter)]
    return out


def scores(predicted: Sequence[str], actual: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    index = {label: i for i, label in enumerate(labels)}
    # A dev label the adapter does not know is always a miss, also against a baseline's unknown prediction.
    predicted_ids = [index.get(p, len(labels)) for p in predicted]
    actual_ids = [index.get(a, len(labels) + 1) for a in actual]
    return accuracy_and_macro_f1(predicted_ids, actual_ids, len(labels) + 2)


def evaluate_classifier(client: QuiverClient, config: EvalConfig, where: str) -> EvalReport:
    started = time.monotonic()
    assert config.input_field is not None and config.label_field is not None  # EvalConfig checked both
    rows, problems = read_labeled(Path(str(config.data)), config.input_field, config.label_field)
    rows = rows[: config.limit] if config.limit else rows
    info = client.get_adapter(str(config.adapter)).adapter
    if not info.labels:
        raise ValueError(f"{info.ref} is not a classification adapter (it has no labels)")
    texts, actual = [r.text for r in rows], [r.label for r in rows]
    adapted = predict(client, texts, info.ref)
    baseline_name = config.baseline or f"majority label {info.labels[0]!r}"
    baseline = predict(client, texts, config.baseline) if config.baseline else [info.labels[0]] * len(rows)
    warnings = list(problems)
    unseen = sorted(set(actual) - set(info.labels))
    if unseen:
        warnings.append(f"dev labels the adapter does not know (always wrong): {unseen[:5]}")
    return EvalReport(
        adapter=info.ref, prompt_template=info.prompt_template,
        base=scores(baseline, actual, info.labels), adapted=scores(adapted, actual, info.labels),
        counts={"dev_rows": len(rows), "skipped_rows": len(problems), "general_items": 0},
        settings=_settings(config, where, baseline_name), seconds=time.monotonic() - started,
        samples=_samples(rows, baseline, adapted), general=[], warnings=warnings, base_name="baseline",
    )


def _settings(config: EvalConfig, where: str, baseline: str) -> dict[str, Any]:
    return {"task": "classify", "data": config.data, "server": where, "model": config.model, "store": config.store,
            "limit": config.limit, "baseline": baseline, "label_field": config.label_field,
            "metrics": "accuracy; macro-F1 = the mean over labels of F1"}


def _samples(rows: list[LabeledText], baseline: list[str], adapted: list[str]) -> list[dict[str, str]]:
    return [{"input": r.text, "reference": r.label, "base": b, "adapter": a}
            for r, b, a in list(zip(rows, baseline, adapted, strict=True))[:SAMPLES]]
