"""One training run: data → PEFT adapter trained with the Hugging Face Trainer → an adapter directory Quiver registers.

The steps: resolve the base checkpoint (quiver.common.model_source) and its fingerprint; read, mix, hold out
and tokenize the data exactly as the server will prompt the adapter (quiver.training.data); wrap the base
for the method (quiver.training.methods); train with `transformers.Trainer` (evaluation and a checkpoint
every `eval_steps` in a directory beside the output, early stopping, resume from the latest checkpoint); then
write only one adapter, the best checkpoint's by eval loss (or the final one), in `save_pretrained`'s format,
beside it `quiver_adapter.json` (the hints registration reads: prompt template and base fingerprint, plus
provenance), `metrics.json` and a loss curve, and optionally register it with a running server.

The same code runs under `torchrun` or `accelerate launch`: the Trainer wraps the model in DDP, and only the
world's process zero writes outputs and registers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from quiver.adapters.metadata import sha256_file
from quiver.common.fingerprint import fingerprint
from quiver.common.model_source import default_cache_dir, resolve_checkpoint, source_name
from quiver.common.quantization import keep_nf4_compute_dtype, quantization_config
from quiver.training.config import DataConfig, MethodConfig, RegisterConfig, TrainConfig
from quiver.training.data import (
    DataSource,
    Example,
    FieldMapping,
    Message,
    detected_format,
    mix,
    parse_source,
    prompt_template_for,
    read_examples,
    split_holdout,
    tokenize_examples,
)
from quiver.training.method_defaults import with_defaults
from quiver.training.methods import BaseFacts, check_gradient_checkpointing, method_for, wrap_for_training
from quiver.training.outputs import loss_history, register_adapter, save_adapter, write_outputs
from quiver.training.time_budget import UNPLANNED_STEPS, BudgetPlan, TimeBudget

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a padded or prompt token: no loss
"""What registration uploads; metrics, plot and PEFT's README stay local."""
MAX_PROBLEMS_LOGGED = 5

Features = dict[str, list[int]]


@dataclass(frozen=True)
class TrainingData:
    """Tokenized examples, the prompt template they were built with, and where they came from."""

    train: list[Features]
    eval: list[Features]
    template: str
    files: list[dict[str, Any]]
    """Provenance of each input file: role (train/eval), path, sha256, weight, usable rows."""
    chat_template: bool = False
    """Whether text rows were rendered as a user turn of the base's chat template (quiver_adapter.json says so)."""


@dataclass(frozen=True)
class TrainResult:
    """What a run produced."""

    output: Path
    global_step: int
    final_eval_loss: float | None
    written: bool
    """Whether this process wrote the outputs (the world's process zero)."""
    registered: Any = None
    """The server's AdapterInfo when the adapter was registered (quiver.clients.adapters_types)."""


@dataclass(frozen=True)
class PaddingCollator:
    """Right-pads a batch: input ids with the pad token, attention mask with 0, labels with IGNORE_INDEX."""

    pad_token_id: int

    def __call__(self, features: list[Features]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)

        def pad(key: str, value: int) -> torch.Tensor:  # (B, T)
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }


# --- data ------------------------------------------------------------------------------------------------------


def _read(source: DataSource, mapping: FieldMapping) -> list[Example]:
    examples, problems = read_examples(source, mapping)
    if problems:
        log.warning("%s: skipped %d unusable rows, e.g. %s", source.path, len(problems),
                    "; ".join(problems[:MAX_PROBLEMS_LOGGED]))
    return examples


def provenance(role: str, source: DataSource, rows: int) -> dict[str, Any]:
    return {"role": role, "path": str(source.path), "sha256": sha256_file(source.path),
            "weight": source.weight, "rows": rows}


def as_user_turns(examples: list[Example]) -> list[Example]:
    """Text rows as one-turn chats whose user says the row's input (chat rows unchanged)."""
    return [e if e.messages is not None else dataclasses.replace(e, messages=(Message("user", e.input),))
            for e in examples]


def load_data(config: DataConfig, tokenizer: Any, seed: int) -> TrainingData:
    """Read every file, hold out eval rows (per file, before mixing, so no repeated row leaks), mix, tokenize."""
    mapping = FieldMapping(config.input_field, config.output_field, config.instruction)
    pairs = [(source, _read(source, mapping)) for source in map(parse_source, config.data)]
    files = [provenance("train", source, len(rows)) for source, rows in pairs]
    held: list[Example] = []
    if config.eval_data:
        for source in (DataSource(Path(path)) for path in config.eval_data):
            rows = _read(source, mapping)
            held += rows
            files.append(provenance("eval", source, len(rows)))
    elif config.eval_fraction > 0:
        splits = [(source, *split_holdout(rows, config.eval_fraction, seed)) for source, rows in pairs]
        pairs = [(source, train) for source, train, _ in splits]
        held = [row for _, _, eval_rows in splits for row in eval_rows]
    mixture = mix(pairs, seed)
    template = prompt_template_for(mapping, detected_format(mixture + held))
    chat = config.chat_template and bool(getattr(tokenizer, "chat_template", None))
    if chat:  # a text row becomes the one user turn the server makes of a plain request to the adapter
        mixture, held = as_user_turns(mixture), as_user_turns(held)
    train = tokenize_examples(tokenizer, template, mixture, config.max_length)
    evaluation = tokenize_examples(tokenizer, template, held, config.max_length) if held else None
    for name, result in (("train", train), ("eval", evaluation)):
        if result is not None and (result.dropped or result.truncated):
            log.warning("%s: %d examples dropped (output longer than --max-length), %d prompts cut from the left",
                        name, len(result.dropped), result.truncated)
    log.info("data: %d training and %d eval examples; prompt template %r",
             len(train.features), len(evaluation.features) if evaluation else 0, template)
    return TrainingData(train.features, evaluation.features if evaluation else [], template, files, chat)


# --- model and trainer -----------------------------------------------------------------------------------------


def _device_type(config: TrainConfig) -> str:
    return "cuda" if config.device == "auto" and torch.cuda.is_available() else "cpu"


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(config: TrainConfig) -> torch.dtype:
    """The base weights' dtype: auto = bfloat16 on CUDA (where supported), float32 on CPU."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if _device_type(config) == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def training_arguments(run: TrainConfig, method: MethodConfig, dtype: torch.dtype, has_eval: bool,
                       cls: type[TrainingArguments] = TrainingArguments, **overrides: Any) -> TrainingArguments:
    """The Trainer's arguments (of `cls`, e.g. TRL's DPOConfig): one flag of ours each, plus the fixed choices
    explained inline; `overrides` replace or add arguments."""
    evaluate = "steps" if has_eval else "no"
    if budgeted(run):  # steps and evaluations are planned once the step time is known (training/time_budget.py)
        overrides = {"max_steps": UNPLANNED_STEPS, "eval_steps": UNPLANNED_STEPS, "save_steps": UNPLANNED_STEPS,
                     **overrides}
    return cls(**{**dict(
        output_dir=str(run.checkpoints()),
        seed=run.seed,
        data_seed=run.seed,
        num_train_epochs=run.epochs,
        max_steps=run.max_steps or -1,
        learning_rate=run.learning_rate or method_for(method).learning_rate(method),
        lr_scheduler_type=run.lr_schedule,
        warmup_steps=run.warmup if run.warmup < 1 else int(run.warmup),
        weight_decay=run.weight_decay,
        per_device_train_batch_size=run.batch_size,
        per_device_eval_batch_size=run.batch_size,
        gradient_accumulation_steps=run.grad_accum,
        eval_strategy=evaluate,
        eval_steps=run.eval_steps,
        save_strategy="steps",  # a checkpoint at every evaluation, so the best one can be restored
        save_steps=run.eval_steps,
        save_total_limit=run.save_total_limit,
        # The Trainer tracks (and never rotates away) the best checkpoint by eval loss; `train` copies its adapter
        # rather than having the Trainer load it back, which fails for a projected prefix (the checkpoint holds
        # the MLP's output, the model being trained the MLP).
        load_best_model_at_end=False,
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None,
        logging_strategy="steps",
        logging_steps=run.log_steps,
        logging_first_step=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=_device_type(run) == "cpu",  # also what makes torchrun on CPU data-parallel (gloo)
        dataloader_pin_memory=_device_type(run) == "cuda",
        report_to="none",
        remove_unused_columns=False,  # our features are exactly the model's inputs
        label_names=["labels"],  # PeftModel.forward takes **kwargs, so the Trainer cannot find them itself
        ddp_find_unused_parameters=False,  # every trainable adapter parameter is used in each step
    ), **overrides})


def budgeted(run: TrainConfig) -> bool:
    """Whether the run's steps follow from --time-budget (--max-steps wins over it)."""
    return run.time_budget is not None and run.max_steps is None


def time_budget(run: TrainConfig, setup: RunSetup, eval_rows: int) -> TimeBudget | None:
    """The callback that plans and holds a budgeted run (None without --time-budget)."""
    if not budgeted(run):
        if run.time_budget is not None:
            log.info("--max-steps %d given: --time-budget is not used", run.max_steps)
        return None
    assert run.time_budget is not None
    plan = BudgetPlan(run.time_budget * 60, run.lr_schedule, run.warmup)
    eval_batches = math.ceil(eval_rows / run.batch_size)
    return TimeBudget(plan, setup.started, eval_batches, evaluates=setup.has_eval)


def load_model(checkpoint: Path, method: MethodConfig, run: TrainConfig, args: TrainingArguments,
               dtype: torch.dtype) -> Any:
    """The base model loaded as the method needs it, prepared and wrapped in a trainable PeftModel."""
    scheme = method_for(method).quantization
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
    quant = quantization_config(scheme, dtype)
    if quant is not None:
        # Quantized weights are made on their device at load time; one copy per process under DDP.
        kwargs.update(quantization_config=quant, device_map={"": args.device})
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), **kwargs)
    # Else, on an AVX512-BF16 CPU, the first evaluation would switch every nf4 layer to bitsandbytes' bfloat16
    # inference kernel for the rest of the training as well.
    keep_nf4_compute_dtype(model, str(args.device), dtype)
    model.config.use_cache = False  # no generation during training
    facts = BaseFacts(checkpoint_dir=checkpoint, hidden_size=int(model.config.get_text_config().hidden_size))
    transformers.set_seed(run.seed)  # the adapter's initialisation
    peft_model = wrap_for_training(model, method, facts, run.gradient_checkpointing)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("%s: %d trainable parameters of %d (%.3f%%), base in %s (%s)", method.method, trainable, total,
             100 * trainable / total, str(dtype).removeprefix("torch."), scheme)
    return peft_model


class BestAdapterEarlyStopping(EarlyStoppingCallback):
    """Early stopping without its warning that the best model will not be loaded: `train` keeps the best adapter."""

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        return None  # `training_arguments` sets the eval strategy and metric the base class checks for here


def kept_eval_loss(trainer: Trainer, history: dict[str, list[dict[str, float]]], best: str | None) -> float:
    """The eval loss of the adapter that is kept: the best checkpoint's, else that of the final step."""
    if best is not None and trainer.state.best_metric is not None:
        return float(trainer.state.best_metric)
    last = history["eval_loss"][-1] if history["eval_loss"] else None
    if last is not None and last["step"] == trainer.state.global_step:
        return float(last["loss"])
    return float(trainer.evaluate()["eval_loss"])  # every process calls it: evaluation is collective under DDP


def resume_checkpoint(run: TrainConfig) -> str | None:
    """The latest checkpoint to resume from with --resume; without --resume, earlier checkpoints are an error
    (a new run would mix its checkpoints with theirs)."""
    folder = run.checkpoints()
    latest = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if latest is not None and not run.resume:
        raise ValueError(f"{folder} holds checkpoints of an earlier run: pass --resume to continue it, "
                         "or choose another --output")
    if run.resume and latest is None:
        log.info("--resume: no checkpoint in %s, starting from step 0", folder)
    return latest


# --- the run ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSetup:
    """What every kind of run (generation, classification, DPO) resolves before it builds its trainer."""

    started: float
    output: Path
    has_eval: bool
    resume_from: str | None
    checkpoint: Path
    base: dict[str, str]
    """The base's fingerprint and name, as quiver_adapter.json records them."""
    tokenizer: Any
    """The base's tokenizer, with the EOS token as pad token when it has none (padding is masked out)."""


def setup_run(data: DataConfig, run: TrainConfig) -> RunSetup:
    """Check the run's flags against its data, find the checkpoint to resume, resolve the base and its tokenizer."""
    started = time.monotonic()
    assert run.output is not None
    has_eval = bool(data.eval_data) or data.eval_fraction > 0
    if run.early_stopping_patience and not has_eval:
        raise ValueError("--early-stopping-patience needs eval data (--eval-data or --eval-fraction > 0)")
    resume_from = resume_checkpoint(run)
    cache = Path(run.cache_dir).expanduser() if run.cache_dir else default_cache_dir()
    checkpoint = resolve_checkpoint(run.model, cache)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = {"fingerprint": fingerprint(checkpoint), "name": source_name(run.model)}
    return RunSetup(started, Path(run.output), has_eval, resume_from, checkpoint, base, tokenizer)


def run_trainer(trainer: Trainer, run: TrainConfig, has_eval: bool, resume_from: str | None
                ) -> tuple[dict[str, list[dict[str, float]]], str | None, float | None]:
    """Train; then the loss history, the checkpoint kept (the best by eval loss, with --load-best) and its eval
    loss."""
    trainer.train(resume_from_checkpoint=resume_from)
    history = loss_history(trainer.state.log_history)
    best = trainer.state.best_model_checkpoint if has_eval and run.load_best else None
    final_eval_loss = kept_eval_loss(trainer, history, best) if has_eval else None
    if final_eval_loss is not None and not math.isfinite(final_eval_loss):
        log.warning("the final eval loss is %s: lower --learning-rate", final_eval_loss)
    return history, best, final_eval_loss



def train(data: DataConfig, method: MethodConfig, run: TrainConfig, register: RegisterConfig | None = None
          ) -> TrainResult:
    """Train one adapter and write it to `run.output`; register it when `register.register` is set.

    Raises ValueError for flag combinations that cannot work, quiver.common.errors.QuiverError for bad data
    or a base model that cannot be loaded.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may reach the hub
    if run.time_budget is not None and (data.task == "classify" or method.method == "dpo"):
        raise ValueError("--time-budget plans generation training (lora, qlora, prompt-tuning, prefix-tuning); "
                         "give --epochs or --max-steps for --task classify and --method dpo")
    if data.task == "classify":
        from quiver.training.classify import train_classifier  # imports this module's helpers

        return train_classifier(data, method, run, register)
    if method.method == "dpo":
        from quiver.training.dpo import train_dpo  # imports this module's helpers, and TRL

        return train_dpo(data, method, run, register)
    if method.method == "head":
        raise ValueError("--method head trains a classification head: it needs --task classify")
    method = with_defaults(method, data)
    check_gradient_checkpointing(method, run.gradient_checkpointing)
    setup = setup_run(data, run)
    output, has_eval, tokenizer = setup.output, setup.has_eval, setup.tokenizer
    prepared = load_data(data, tokenizer, run.seed)

    dtype = resolve_dtype(run)
    args = training_arguments(run, method, dtype, has_eval)
    model = load_model(setup.checkpoint, method, run, args, dtype)
    callbacks: list[TrainerCallback] = []
    if run.early_stopping_patience:
        callbacks.append(BestAdapterEarlyStopping(run.early_stopping_patience))
    budget = time_budget(run, setup, len(prepared.eval))
    if budget is not None:
        callbacks.append(budget)
    trainer = Trainer(
        model=model, args=args, train_dataset=prepared.train,  # type: ignore[arg-type]
        eval_dataset=prepared.eval or None, data_collator=PaddingCollator(int(tokenizer.pad_token_id)),
        callbacks=callbacks,
    )
    history, best, final_eval_loss = run_trainer(trainer, run, has_eval, setup.resume_from)
    registered = None
    written = trainer.is_world_process_zero()
    if written:
        save_adapter(trainer, output, best)
        seconds = time.monotonic() - setup.started
        extra = {} if budget is None else {"time_budget": budget.plan.report(seconds, trainer.state.global_step)}
        write_outputs(trainer, output, method, run, prepared, setup.base, history, final_eval_loss, seconds, extra)
        if register is not None and register.register is not None:
            registered = register_adapter(output, register, prepared.template)
    return TrainResult(output, trainer.state.global_step, final_eval_loss, written, registered)
