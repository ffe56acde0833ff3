"""`quiver train --task classify`: a sequence-classification adapter, in PEFT's SEQ_CLS format, that Quiver serves.

The base is loaded as transformers' `AutoModelForSequenceClassification` (the causal model's body and a new linear
head over the last token's final hidden state, `score`), and wrapped for the method:
- head: only the head trains, on the frozen model's features — the feature-based approach, which is also
  fine-tuning the output layer alone. PEFT has no head-only adapter, so it is saved as a SEQ_CLS LoRA of rank 1 on
  the first layer's query projection whose LoRA weights stay at PEFT's initialisation (B = 0: no change to the
  body), plus the trained head: any PEFT release loads it, and Quiver serves it as it serves any classifier;
- lora: LoRA on the body (as --method lora) and the head;
- prompt-tuning: a soft prompt (as --method prompt-tuning) and the head.
The adapter, `quiver_adapter.json` (with the labels, most frequent first, and the prompt template), `metrics.json`
(losses, and accuracy and macro-F1 on the held-out rows at every evaluation) and `loss.png` are written as for
generation adapters, and `--register` uploads it with its labels.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from peft import LoraConfig, PeftConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import AutoModelForSequenceClassification, EvalPrediction, Trainer, TrainerCallback

from quiver.adapters.metadata import METADATA_FILE, utc_now
from quiver.training.classify_data import (
    LabeledText,
    accuracy_and_macro_f1,
    classification_template,
    label_set,
    read_labeled,
    split_labeled,
    tokenize_labeled,
)
from quiver.training.config import DataConfig, MethodConfig, RegisterConfig, TrainConfig
from quiver.training.data import DataSource
from quiver.training.outputs import (
    ADAPTER_CONFIG,
    LOSS_PLOT,
    METRICS_FILE,
    plot_losses,
    register_adapter,
    save_adapter,
    write_json,
)
from quiver.training.train import (
    BestAdapterEarlyStopping,
    TrainResult,
    provenance,
    resolve_dtype,
    run_trainer,
    setup_run,
    training_arguments,
)

log = logging.getLogger(__name__)

LEARNING_RATES = {"head": 1e-3, "lora": 2e-4, "prompt-tuning": 3e-2}
"""Default peak learning rates per method (a head is one linear layer: larger steps than LoRA's)."""


@dataclass(frozen=True)
class ClassificationData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: tuple[str, ...]
    template: str
    files: list[dict[str, Any]]


def _read_files(specs: tuple[str, ...], role: str, text_field: str, label_field: str
                ) -> tuple[list[LabeledText], list[dict[str, Any]]]:
    """Every usable row of the files, and each file's provenance (as generation training records it)."""
    rows: list[LabeledText] = []
    files = []
    for spec in specs:
        source = DataSource(Path(spec))
        found, problems = read_labeled(source.path, text_field, label_field)
        if problems:
            log.warning("%s: skipped %d unusable rows, e.g. %s", source.path, len(problems), "; ".join(problems[:5]))
        rows += found
        files.append(provenance(role, source, len(found)))
    return rows, files


def load_classification_data(config: DataConfig, tokenizer: Any, seed: int) -> ClassificationData:
    """Read the files (weights are not used: every row once), hold out eval rows, tokenize."""
    assert config.input_field is not None and config.label_field is not None  # DataConfig checked both
    rows, files = _read_files(config.data, "train", config.input_field, config.label_field)
    held, eval_files = _read_files(config.eval_data, "eval", config.input_field, config.label_field)
    files += eval_files
    if not config.eval_data and config.eval_fraction > 0:
        rows, held = split_labeled(rows, config.eval_fraction, seed)
    labels = label_set(rows)
    if len(labels) < 2:
        raise ValueError(f"--task classify needs at least two labels in the training rows, found {list(labels)}")
    template = classification_template(config.instruction)
    train, cut = tokenize_labeled(tokenizer, template, rows, labels, config.max_length)
    evaluation, cut_eval = tokenize_labeled(tokenizer, template, held, labels, config.max_length)
    if cut or cut_eval:
        log.warning("%d texts longer than --max-length lost their start", cut + cut_eval)
    log.info("data: %d training and %d eval rows, %d labels %s", len(train), len(evaluation), len(labels),
             list(labels)[:10])
    return ClassificationData(train, evaluation, labels, template, files)


def classifier_peft_config(method: MethodConfig, checkpoint: Path) -> PeftConfig:
    """The SEQ_CLS PEFT config of `method.method` (head, lora or prompt-tuning)."""
    if method.method == "head":
        return LoraConfig(task_type="SEQ_CLS", r=1, lora_alpha=1, lora_dropout=0.0, target_modules=["q_proj"],
                          layers_to_transform=[0])
    if method.method == "lora":
        return LoraConfig(task_type="SEQ_CLS", r=method.rank, lora_alpha=method.alpha, lora_dropout=method.dropout,
                          target_modules=method.target_modules_list() or "all-linear", bias="none")
    if method.method == "prompt-tuning":
        if method.init_text is None:
            return PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=method.num_virtual_tokens)
        return PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=method.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=method.init_text,
                                  tokenizer_name_or_path=str(checkpoint))
    raise ValueError(f"--task classify trains with --method head, lora or prompt-tuning, not {method.method}")


def load_classifier(checkpoint: Path, method: MethodConfig, data: ClassificationData, pad_token_id: int,
                    dtype: torch.dtype, seed: int) -> Any:
    """The base with a new head for `data.labels`, wrapped for the method; for `head`, only the head trains."""
    model = AutoModelForSequenceClassification.from_pretrained(
        str(checkpoint), num_labels=len(data.labels), id2label=dict(enumerate(data.labels)),
        label2id={label: i for i, label in enumerate(data.labels)}, dtype=dtype, local_files_only=True,
        use_safetensors=True)
    model.config.pad_token_id = pad_token_id  # the model finds each row's last token by it
    transformers.set_seed(seed)
    peft_model = get_peft_model(model, classifier_peft_config(method, checkpoint))
    if method.method == "head":
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(False)  # B stays 0: the body is the base's
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("classify %s: %d trainable parameters of %d (%.3f%%)", method.method, trainable, total,
             100 * trainable / total)
    return peft_model


@dataclass(frozen=True)
class ClassCollator:
    """Right-pads input ids with the pad token and the attention mask with 0; labels (B,) as they are."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        return {
            "input_ids": torch.tensor([f["input_ids"] + [self.pad_token_id] * (width - len(f["input_ids"]))
                                       for f in features]),
            "attention_mask": torch.tensor([f["attention_mask"] + [0] * (width - len(f["attention_mask"]))
                                            for f in features]),
            "labels": torch.tensor([f["labels"] for f in features]),
        }


def scores(prediction: EvalPrediction, classes: int) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return accuracy_and_macro_f1(np.argmax(logits, axis=-1).tolist(), np.asarray(prediction.label_ids).tolist(),
                                 classes)


def train_classifier(data: DataConfig, method: MethodConfig, run: TrainConfig,
                     register: RegisterConfig | None = None) -> TrainResult:
    """`quiver train --task classify`: train, write and optionally register a classification adapter."""
    if run.gradient_checkpointing:
        raise ValueError("--gradient-checkpointing is not offered with --task classify")
    setup = setup_run(data, run)
    output, has_eval, tokenizer, checkpoint = setup.output, setup.has_eval, setup.tokenizer, setup.checkpoint
    prepared = load_classification_data(data, tokenizer, run.seed)
    classifier_peft_config(method, checkpoint)  # an unsupported method fails before the model loads
    dtype = resolve_dtype(run)
    rate = run.learning_rate or LEARNING_RATES[method.method]
    if method.method == "prompt-tuning" and run.batch_size > 1:
        # PEFT gives the model only embeddings (the soft prompt before them), so transformers reads each row at the
        # batch's last position: padding for every row but the longest. One row per forward, the same examples
        # per optimizer step through gradient accumulation.
        log.info("prompt-tuning classifier: batch %d as %d accumulated rows of one", run.batch_size, run.batch_size)
        run = replace(run, batch_size=1, grad_accum=run.grad_accum * run.batch_size)
    args = training_arguments(replace(run, learning_rate=rate), method, dtype, has_eval)
    model = load_classifier(checkpoint, method, prepared, int(tokenizer.pad_token_id), dtype, run.seed)
    callbacks: list[TrainerCallback] = [BestAdapterEarlyStopping(run.early_stopping_patience)] \
        if run.early_stopping_patience else []
    trainer = Trainer(model=model, args=args, train_dataset=prepared.train,  # type: ignore[arg-type]
                      eval_dataset=prepared.eval or None, data_collator=ClassCollator(int(tokenizer.pad_token_id)),
                      compute_metrics=lambda p: scores(p, len(prepared.labels)), callbacks=callbacks)
    history, best, final_eval_loss = run_trainer(trainer, run, has_eval, setup.resume_from)
    registered = None
    written = trainer.is_world_process_zero()
    if written:
        save_adapter(trainer, output, best)
        write_classifier_outputs(trainer, output, method, run, prepared, setup.base, history, final_eval_loss, best,
                                 time.monotonic() - setup.started)
        if register is not None and register.register is not None:
            registered = register_adapter(output, register, prepared.template, prepared.labels)
    return TrainResult(output, trainer.state.global_step, final_eval_loss, written, registered)


def write_classifier_outputs(trainer: Trainer, output: Path, method: MethodConfig, run: TrainConfig,
                             data: ClassificationData, base: dict[str, str], history: dict[str, Any],
                             final_eval_loss: float | None, best: str | None, seconds: float) -> None:
    """quiver_adapter.json (with the labels), metrics.json (with accuracy and macro-F1) and loss.png."""
    import json

    state = trainer.state
    evaluations = [{"step": e["step"], "accuracy": e["eval_accuracy"], "macro_f1": e["eval_macro_f1"]}
                   for e in state.log_history if "eval_accuracy" in e]
    kept_step = state.best_global_step if best is not None else state.global_step
    kept = next((e for e in reversed(evaluations) if e["step"] == kept_step), evaluations[-1] if evaluations else None)
    write_json(output / METADATA_FILE, {
        "prompt_template": data.template, "labels": list(data.labels), "task": "classify",
        "base_fingerprint": base["fingerprint"], "base_model": base["name"], "method": method.method,
        "peft_type": json.loads((output / ADAPTER_CONFIG).read_text())["peft_type"], "data": data.files,
        "steps": state.global_step, "eval_loss": final_eval_loss, "seed": run.seed, "trained_at": utc_now(),
    })
    write_json(output / METRICS_FILE, {
        **history, "eval_scores": evaluations, "final_eval_loss": final_eval_loss,
        "final_accuracy": kept["accuracy"] if kept else None, "final_macro_f1": kept["macro_f1"] if kept else None,
        "labels": list(data.labels), "best_step": state.best_global_step, "global_step": state.global_step,
        "epochs": state.epoch, "train_examples": len(data.train), "eval_examples": len(data.eval),
        "seconds": round(seconds, 3),
    })
    plot_losses(history, output / LOSS_PLOT, f"classify {method.method} on {base['name']}")
    log.info("classifier written to %s (step %d, eval loss %s, accuracy %s)", output, state.global_step,
             final_eval_loss, kept["accuracy"] if kept else None)
