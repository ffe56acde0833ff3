"""`quiver eval`: an adapter against its base model on held-out rows, through the serving path.

Every prediction is a greedy `Generate` call of `QuiverClient` over gRPC, to a running server (`--server`) or
to one started in-process over `--model`/`--store` (`local_server`), so there is one evaluation path and it
is the one clients use. For each dev row (read by quiver.training.data, exactly as training reads it):

- adapter: the raw input with `adapter=name@version`; the server wraps it in the adapter's stored template.
- base: the same hard prompt with no adapter: the template (fetched with GetAdapter) is applied client-side,
  so both sides see the same prompt and only the adapter's weights differ.

Both are scored against the references with ROUGE-1/2/L F1 (Lin, 2004; `rouge-score`, stemmed, averaged over
rows), corpus BLEU (Papineni et al., 2002; `sacrebleu`, default 13a tokenisation), which is divided by 100
here so that every metric lies in [0, 1], and the exact-substring rate (the share of rows whose whole reference,
normalized, occurs in the prediction: for short answers, whether the answer was given). The general-ability set
(quiver.training.general_set) is sent the same way (raw with the adapter, templated for the base), scored by its
exact rules; a lower adapter accuracy suggests the adapter degrades the model outside its task.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiver.clients.client import QuiverClient
from quiver.training.config import Task
from quiver.training.data import DataSource, Example, FieldMapping, prompt_template_for, read_examples
from quiver.training.general_set import GENERAL_SET, accuracy
from quiver.training.server_options import LocalServer, ServerOptions

log = logging.getLogger(__name__)

TEXT_METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "exact_substring")
GENERAL_METRIC = "general_accuracy"
SAMPLES = 5  # predictions quoted in the report


@dataclass
class EvalConfig(ServerOptions):
    """What to evaluate, where, and how; the flags of `quiver eval` map 1:1 onto these fields."""

    data: str | None = field(default=None, metadata={"help": "dev JSONL file (any format `quiver train` reads)"})
    adapter: str | None = field(default=None, metadata={"help": "adapter to evaluate: NAME or NAME@VERSION"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N usable dev rows"})
    max_new_tokens: int = field(default=128, metadata={"help": "greedy tokens generated per dev row"})
    general: bool = field(
        default=True, metadata={"help": "also run the built-in general-ability set (quiver.training.general_set)"}
    )
    general_max_new_tokens: int = field(
        default=32, metadata={"help": "greedy tokens generated per general-ability prompt"}
    )
    out: str | None = field(default=None, metadata={"help": "JSON report path (default: eval-ADAPTER.json)"})
    task: Task = field(
        default="generate",
        metadata={"help": "generate: ROUGE/BLEU of the adapter's completions against the base model's; classify: "
                  "accuracy and macro-F1 of a classification adapter (--input-field, --label-field) against "
                  "--baseline or the majority label"},
    )
    label_field: str | None = field(
        default=None, metadata={"help": "classify: row key holding each dev row's label"}
    )
    baseline: str | None = field(
        default=None,
        metadata={"help": "classify: a classifier to compare with, e.g. the `head` one (base features + head); "
                  "default: always the adapter's most frequent training label"},
    )
    input_field: str | None = field(
        default=None, metadata={"help": "row key holding the input text (with --output-field)"}
    )
    output_field: str | None = field(
        default=None, metadata={"help": "row key holding the reference text (with --input-field)"}
    )
    instruction: str | None = field(
        default=None,
        metadata={"help": "the --instruction the adapter was trained with; only checked against its stored "
                  "template (the server applies the stored one)"},
    )

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data is required (a dev JSONL file)")
        if not self.adapter:
            raise ValueError("--adapter is required (NAME or NAME@VERSION)")
        super().__post_init__()
        for name in ("limit", "max_new_tokens", "general_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.task == "classify":
            if not self.input_field or not self.label_field or self.output_field:
                raise ValueError("--task classify needs --input-field and --label-field (and no --output-field)")
        elif self.label_field is not None or self.baseline is not None:
            raise ValueError("--label-field and --baseline apply to --task classify only")
        elif (self.input_field is None) != (self.output_field is None):
            raise ValueError("--input-field and --output-field must be given together")

    def out_path(self) -> Path:
        return Path(self.out) if self.out else Path(f"eval-{self.adapter}.json")


# --- scoring ----------------------------------------------------------------------------------------------


def rouge_f1(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over the rows (stemmed), each in [0, 1]; 0 for no rows."""
    from rouge_score import rouge_scorer

    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for name in names:
            totals[name] += scores[name].fmeasure
    count = max(1, len(predictions))
    return {name: total / count for name, total in totals.items()}


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU with one reference per row, divided by 100 into [0, 1]."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score) / 100


def exact_substring(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of rows whose reference occurs whole in the prediction, both with case, punctuation and spacing
    normalized away: the answer was given, whatever else was said around it (0 for no rows)."""
    from quiver.training.synth_filters import normalized

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    hits = [bool(ref := normalized(r)) and f" {ref} " in f" {normalized(p)} "
            for p, r in zip(predictions, references, strict=True)]
    return sum(hits) / max(1, len(hits))


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Every TEXT_METRICS score of `predictions` against `references`."""
    return {**rouge_f1(predictions, references), "bleu": corpus_bleu(predictions, references),
            "exact_substring": exact_substring(predictions, references)}


# --- prompts and generation -------------------------------------------------------------------------------


def request_pair(example: Example, template: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """generate() arguments for (the adapter, the base): raw for the adapter, which the server templates;
    templated here for the base, so both see the same prompt. Chat rows template their last user turn."""
    formatted = example.input if template is None else template.format(input=example.input)
    if example.messages is None:
        return {"prompt": example.input}, {"prompt": formatted}
    raw = [{"role": m.role, "content": m.content} for m in example.messages]
    templated = [dict(m) for m in raw]
    last_user = max(i for i, m in enumerate(templated) if m["role"] == "user")
    templated[last_user]["content"] = formatted
    return {"messages": raw}, {"messages": templated}


def generate_all(
    client: QuiverClient, requests: Sequence[Mapping[str, Any]], adapter: str, max_new_tokens: int, concurrency: int
) -> list[str]:
    """Greedy completions of `requests` (generate() arguments), in order, `concurrency` calls at a time."""

    def one(request: Mapping[str, Any]) -> str:
        return client.generate(**request, adapter=adapter, max_new_tokens=max_new_tokens, temperature=0.0).text

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, requests))


def base_and_adapter(
    client: QuiverClient, examples: Sequence[Example], ref: str, template: str | None, max_new_tokens: int,
    concurrency: int,
) -> tuple[list[str], list[str]]:
    """(base predictions, adapter predictions) of `examples`, on the same prompts."""
    pairs = [request_pair(e, template) for e in examples]
    adapted = generate_all(client, [a for a, _ in pairs], ref, max_new_tokens, concurrency)
    base = generate_all(client, [b for _, b in pairs], "", max_new_tokens, concurrency)
    return base, adapted


# --- the report -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport:
    """Scores of the base model and the adapter on the dev rows (and the general set), with the settings."""

    adapter: str
    """The evaluated version, NAME@VERSION."""
    prompt_template: str | None
    """The adapter's stored template, applied to both sides."""
    base: dict[str, float]
    """Metric -> score of the base model; TEXT_METRICS and, with the general set, GENERAL_METRIC."""
    adapted: dict[str, float]
    """Metric -> score with the adapter; the same keys as `base`."""
    counts: dict[str, int]
    """dev_rows evaluated, skipped_rows (unreadable), general_items."""
    settings: dict[str, Any]
    """The configuration and where the server was."""
    seconds: float
    """Wall time of the whole evaluation."""
    samples: list[dict[str, str]]
    """The first dev rows: input, reference, base and adapter predictions."""
    general: list[dict[str, Any]]
    """Each general prompt with both predictions."""
    warnings: list[str]
    """Problems worth a look (skipped rows, a template that differs from the dev data's)."""
    base_name: str = "base"
    """What the `base` column holds: the base model, or a classifier's baseline."""

    def table(self) -> str:
        """metric | base | adapter | Δ, one row per metric."""
        lines = [f"{'metric':<18}{self.base_name:>10}{'adapter':>10}{'Δ':>10}"]
        for name, base in self.base.items():
            adapted = self.adapted[name]
            lines.append(f"{name:<18}{base:>10.4f}{adapted:>10.4f}{adapted - base:>+10.4f}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        metrics = {name: {"base": b, "adapter": self.adapted[name], "delta": self.adapted[name] - b}
                   for name, b in self.base.items()}
        return {"adapter": self.adapter, "prompt_template": self.prompt_template, "metrics": metrics,
                "counts": self.counts, "settings": self.settings, "seconds": self.seconds,
                "samples": self.samples, "general": self.general, "warnings": self.warnings}


def read_dev(config: EvalConfig) -> tuple[list[Example], list[str]]:
    """The first --limit usable rows of --data, and a "path:line: problem" per skipped row."""
    mapping = FieldMapping(config.input_field, config.output_field, config.instruction)
    examples, problems = read_examples(DataSource(Path(str(config.data))), mapping)
    return examples[: config.limit] if config.limit else examples, problems


def _template_warning(config: EvalConfig, examples: list[Example], stored: str | None) -> list[str]:
    mapping = FieldMapping(config.input_field, config.output_field, config.instruction)
    expected = prompt_template_for(mapping, examples[0].format)
    if stored is None or stored == expected:
        return []
    return [f"the adapter's template {stored!r} differs from {expected!r}, the one these dev rows and flags "
            "would train with; check --input-field/--output-field/--instruction"]


def evaluate_with(client: QuiverClient, config: EvalConfig, where: str) -> EvalReport:
    """Runs the evaluation through `client` (a server at `where`) and returns its report."""
    if config.task == "classify":
        from quiver.training.evaluate_classify import evaluate_classifier  # it builds on this module

        return evaluate_classifier(client, config, where)
    started = time.monotonic()
    examples, problems = read_dev(config)
    info = client.get_adapter(str(config.adapter)).adapter
    template = info.prompt_template
    warnings = [*problems, *_template_warning(config, examples, template)]
    for warning in warnings:
        log.warning("%s", warning)
    references = [e.output for e in examples]
    base_out, adapter_out = base_and_adapter(
        client, examples, info.ref, template, config.max_new_tokens, config.concurrency
    )
    base, adapted = text_scores(base_out, references), text_scores(adapter_out, references)
    general: list[dict[str, Any]] = []
    if config.general:
        items = [Example(item.prompt, "", 0, "general_set") for item in GENERAL_SET]
        g_base, g_adapter = base_and_adapter(
            client, items, info.ref, template, config.general_max_new_tokens, config.concurrency
        )
        base[GENERAL_METRIC] = accuracy(GENERAL_SET, g_base)
        adapted[GENERAL_METRIC] = accuracy(GENERAL_SET, g_adapter)
        general = [{"prompt": item.prompt, "answers": list(item.answers), "rule": item.rule, "base": b,
                    "adapter": a} for item, b, a in zip(GENERAL_SET, g_base, g_adapter, strict=True)]
    samples = [{"input": e.input, "reference": e.output, "base": b, "adapter": a}
               for e, b, a in list(zip(examples, base_out, adapter_out, strict=True))[:SAMPLES]]
    settings = {"data": config.data, "server": where, "model": config.model, "store": config.store,
                "limit": config.limit, "max_new_tokens": config.max_new_tokens, "temperature": 0.0,
                "general_max_new_tokens": config.general_max_new_tokens, "concurrency": config.concurrency,
                "bleu_scale": "sacrebleu corpus BLEU / 100", "rouge": "rouge-score F1, stemmed, mean over rows"}
    counts = {"dev_rows": len(examples), "skipped_rows": len(problems),
              "general_items": len(GENERAL_SET) if config.general else 0}
    return EvalReport(info.ref, template, base, adapted, counts, settings, time.monotonic() - started, samples,
                      general, warnings)


def evaluate(config: EvalConfig, local_server: LocalServer | None = None) -> EvalReport:
    """The evaluation `config` describes, on a remote server or on `local_server`'s; writes the JSON report too."""
    with config.connect(local_server) as (client, where):
        report = evaluate_with(client, config, where)
    write_report(report, config.out_path())
    return report


def write_report(report: EvalReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
