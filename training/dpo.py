"""`quiver train --method dpo`: a LoRA adapter trained from preferences by direct preference optimisation
(Rafailov et al., 2023) with TRL's DPOTrainer, on top of PEFT.

- The policy is the base with a LoRA (`--dpo-adapter lora`) or the same LoRA over an nf4-quantized base
  (`qlora`), from quiver.training.methods; or, with --init-adapter, an existing LoRA (e.g. an SFT one) trained on.
- The reference is never a second copy of the model: without --init-adapter it is the base with the adapter
  disabled; with it, TRL keeps a frozen copy of the initial adapter's LoRA weights (a few MB) beside it.
- --sft-weight adds the SFT loss on the chosen answers (RPO), which keeps DPO from lowering their likelihood
  together with the rejected ones'.
- The prompt template is the --instruction one (as `quiver data pairs --instruction`), or the init adapter's; the
  pairs are tokenized as the server tokenizes (quiver.training.preference_data), not by TRL.
The output is that of every `quiver train` run: the adapter in PEFT's format with quiver_adapter.json, metrics.json
(losses, and DPO's reward accuracy and margin on the held-out pairs at each evaluation) and loss.png; --register
uploads it; it serves like any LoRA.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import DPOConfig, DPOTrainer

from quiver.adapters.metadata import METADATA_FILE
from quiver.common.errors import InvalidArgument
from quiver.common.quantization import keep_nf4_compute_dtype, quantization_config
from quiver.training.config import DataConfig, MethodConfig, RegisterConfig, TrainConfig
from quiver.training.data import DataSource, FieldMapping, prompt_template_for
from quiver.training.methods import METHODS, BaseFacts
from quiver.training.outputs import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    METRICS_FILE,
    register_adapter,
    write_outputs,
)
from quiver.training.preference_data import read_preferences, split_preferences, tokenize_pairs
from quiver.training.train import (
    BestAdapterEarlyStopping,
    TrainingData,
    TrainResult,
    provenance,
    resolve_dtype,
    run_trainer,
    setup_run,
    training_arguments,
)

log = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = 5e-5  # DPO moves a trained policy: smaller steps than SFT's LoRA (2e-4)
REWARD_KEYS = {"eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin",
               "eval_rewards/chosen": "reward_chosen", "eval_rewards/rejected": "reward_rejected"}


class ServedTokensDPOTrainer(DPOTrainer):
    """DPOTrainer on datasets that are already tokenized as the server tokenizes (quiver.training.preference_data);
    TRL's own preparation (BOS added, prompt and answer tokenized as one string) is skipped."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        return dataset


def _template(data: DataConfig, method: MethodConfig, base_fingerprint: str) -> str:
    """The prompt template: the init adapter's own, else the one --instruction makes (as for SFT data). An init
    adapter trained on another base is refused (its metadata names the base's fingerprint)."""
    if method.init_adapter is None:
        return prompt_template_for(FieldMapping(instruction=data.instruction), "fields")
    own_file = Path(method.init_adapter) / METADATA_FILE
    own: dict[str, Any] = json.loads(own_file.read_text()) if own_file.exists() else {}
    trained_on = own.get("base_fingerprint")
    if trained_on is not None and trained_on != base_fingerprint:
        raise InvalidArgument("init_adapter", f"{method.init_adapter} was trained on base {trained_on}, this base is "
                              f"{base_fingerprint}")
    stored = own.get("prompt_template")
    if stored is not None and data.instruction is not None:
        raise ValueError("--instruction: the --init-adapter brings its own prompt template")
    return str(stored) if stored is not None else prompt_template_for(FieldMapping(instruction=data.instruction),
                                                                      "fields")


def _tokenized(tokenizer: Any, template: str, rows: list[Any], max_length: int, role: str) -> list[dict[str, Any]]:
    done = tokenize_pairs(tokenizer, template, rows, max_length)
    if done.dropped or done.truncated:
        log.warning("%s: %d pairs dropped (an answer longer than --max-length), %d prompts cut from the left", role,
                    done.dropped, done.truncated)
    if rows and not done.features:
        raise InvalidArgument("data", f"no {role} pair fits in --max-length {max_length}")
    return done.features


def load_pairs(data: DataConfig, template: str, tokenizer: Any, seed: int
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(train features, eval features, file provenance); eval from --eval-data, else held out by --eval-fraction."""
    def read(spec: str, role: str) -> list[Any]:
        source = DataSource(Path(spec))
        rows, problems = read_preferences(source.path, data.prompt_field, data.chosen_field, data.rejected_field)
        if problems:
            log.warning("%s: skipped %d unusable rows, e.g. %s", source.path, len(problems), "; ".join(problems[:5]))
        files.append(provenance(role, source, len(rows)))
        return rows

    files: list[dict[str, Any]] = []
    train = [row for spec in data.data for row in read(spec, "train")]
    held = [row for spec in data.eval_data for row in read(spec, "eval")]
    if not data.eval_data and data.eval_fraction > 0:
        train, held = split_preferences(train, data.eval_fraction, seed)
    log.info("dpo data: %d training and %d eval pairs; prompt template %r", len(train), len(held), template)
    return (_tokenized(tokenizer, template, train, data.max_length, "train"),
            _tokenized(tokenizer, template, held, data.max_length, "eval"), files)


def load_policy(checkpoint: Path, method: MethodConfig, run: TrainConfig, device: Any, dtype: torch.dtype) -> Any:
    """The base (quantized for qlora) with a trainable LoRA: a new one, or --init-adapter's."""
    entry = METHODS[method.dpo_adapter]
    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
    quant = quantization_config(entry.quantization, dtype)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), **kwargs)
    keep_nf4_compute_dtype(model, str(device), dtype)  # as in quiver train: evaluations must not switch kernels
    model.config.use_cache = False
    prepared = entry.prepare(model, run.gradient_checkpointing)
    transformers.set_seed(run.seed)
    if method.init_adapter is None:
        facts = BaseFacts(checkpoint, int(model.config.get_text_config().hidden_size))
        return get_peft_model(prepared, entry.peft_config(method, facts))
    config = json.loads((Path(method.init_adapter) / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"--init-adapter must be a LoRA adapter, not {config.get('peft_type')}")
    return PeftModel.from_pretrained(prepared, method.init_adapter, is_trainable=True)


def save_policy(trainer: Any, output: Path, best_checkpoint: str | None) -> None:
    """Only the trained adapter ("default"), never TRL's frozen reference copy."""
    output.mkdir(parents=True, exist_ok=True)
    if best_checkpoint is not None:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(Path(best_checkpoint) / name, output / name)
        return
    trainer.model.save_pretrained(str(output), selected_adapters=["default"])


def reward_history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """DPO's implicit-reward metrics on the held-out pairs, one entry per evaluation."""
    return [{"step": e["step"], **{name: e[key] for key, name in REWARD_KEYS.items() if key in e}}
            for e in log_history if "eval_rewards/accuracies" in e]


def train_dpo(data: DataConfig, method: MethodConfig, run: TrainConfig, register: RegisterConfig | None = None
              ) -> TrainResult:
    """`quiver train --method dpo`: train, write and optionally register the adapter."""
    setup = setup_run(data, run)
    output, has_eval = setup.output, setup.has_eval
    template = _template(data, method, setup.base["fingerprint"])
    train_rows, eval_rows, files = load_pairs(data, template, setup.tokenizer, run.seed)
    dtype = resolve_dtype(run)
    run = replace(run, learning_rate=run.learning_rate or DEFAULT_LEARNING_RATE)
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, method.sft_weight]} if method.sft_weight else {}
    # TRL turns activation checkpointing on by default; the method's preparation applies --gradient-checkpointing.
    args = training_arguments(run, method, dtype, has_eval, DPOConfig, beta=method.beta, max_length=data.max_length,
                              label_names=[], activation_checkpointing=False, **losses)
    model = load_policy(setup.checkpoint, method, run, args.device, dtype)
    callbacks: list[TrainerCallback] = [BestAdapterEarlyStopping(run.early_stopping_patience)] \
        if run.early_stopping_patience else []
    trainer = ServedTokensDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                                     eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
                                     processing_class=setup.tokenizer, callbacks=callbacks)
    history, best, final_eval_loss = run_trainer(trainer, run, has_eval, setup.resume_from)
    registered = None
    written = trainer.is_world_process_zero()
    if written:
        save_policy(trainer, output, best)
        prepared = TrainingData(train_rows, eval_rows, template, files)
        write_outputs(trainer, output, method, run, prepared, setup.base, history, final_eval_loss,
                      time.monotonic() - setup.started)
        kept_step = (trainer.state.best_global_step if best is not None else None) or trainer.state.global_step
        _add_dpo_results(output, trainer.state.log_history, method, kept_step)
        if register is not None and register.register is not None:
            registered = register_adapter(output, register, template)
    return TrainResult(output, trainer.state.global_step, final_eval_loss, written, registered)


def _add_dpo_results(output: Path, log_history: list[dict[str, Any]], method: MethodConfig, kept_step: int) -> None:
    """metrics.json gains the reward metrics (final_*: those of the kept adapter's step); quiver_adapter.json says
    how the adapter was trained."""
    metrics = json.loads((output / METRICS_FILE).read_text())
    rewards = reward_history(log_history)
    kept = next((e for e in rewards if e["step"] == kept_step), {})
    metrics.update(eval_rewards=rewards, final_reward_accuracy=kept.get("reward_accuracy"),
                   final_reward_margin=kept.get("reward_margin"), kept_step=kept_step)
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    meta = json.loads((output / METADATA_FILE).read_text())
    meta.update(peft_type="LORA", dpo={"beta": method.beta, "adapter": method.dpo_adapter,
                                       "sft_weight": method.sft_weight, "init_adapter": method.init_adapter})
    (output / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
