"""Adapter methods the trainer offers: a registry from method name to its PEFT config and base-model preparation.

- lora: LoRA (Hu et al., 2021), low-rank updates B·A beside frozen linear layers.
- qlora: QLoRA (Dettmers et al., 2023), the same LoRA over a base held in 4-bit NF4 with double-quantized
  scales; `prepare_model_for_kbit_training` freezes the base and keeps norms and embeddings in float32. The
  adapter it saves is an ordinary LoRA, served on any base with the same fingerprint (quantized or not).
- prompt-tuning: prompt tuning (Lester et al., 2021), a trained soft prompt of input embeddings, optionally
  initialised from the embeddings of a text (PromptTuningInit.TEXT).
- prefix-tuning: prefix tuning (Li & Liang, 2021), trained keys and values prepended in every layer, optionally
  through an MLP reparametrisation (`prefix_projection`; PEFT saves the MLP's output, so serving is unchanged) or
  initialised from the base model's own keys and values of a text (`init_text`, training/prefix_init.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import (
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
    prepare_model_for_kbit_training,
)

from quiver.training.config import MethodConfig

# Non-reentrant checkpointing works with frozen inputs and inside DDP; the reentrant kind needs both avoided.
_CHECKPOINTING_KWARGS = {"use_reentrant": False}


@dataclass(frozen=True)
class BaseFacts:
    """What a method's PEFT config may need to know about the base model."""

    checkpoint_dir: Path
    """The base checkpoint (its tokenizer initialises a soft prompt from text)."""
    hidden_size: int
    """The base model's hidden size."""


@dataclass(frozen=True)
class TrainingMethod:
    """One adapter method: how the base is loaded and prepared, and which PEFT config wraps it."""

    default_learning_rate: float
    """Peak learning rate when --learning-rate is not given."""
    quantization: str
    """The scheme the base is loaded in (a key of quiver.common.quantization.QUANTIZATION_SCHEMES)."""
    peft_config: Callable[[MethodConfig, BaseFacts], PeftConfig]
    """The PEFT config of a new adapter."""
    prepare: Callable[[Any, bool], Any]
    """Prepares the loaded base for training; the flag asks for gradient checkpointing."""
    supports_gradient_checkpointing: bool = True
    """Whether --gradient-checkpointing works with this method."""
    initialise: Callable[[Any, MethodConfig, BaseFacts], None] | None = None
    """Sets the new adapter's starting weights where its PEFT config cannot (None: PEFT's initialisation)."""
    projected_learning_rate: float | None = None
    """The default peak learning rate when the adapter is trained through a projection (None: the same)."""

    def learning_rate(self, config: MethodConfig) -> float:
        """The default peak learning rate for `config` (training/README.md has the runs behind each)."""
        if config.prefix_projection and self.projected_learning_rate is not None:
            return self.projected_learning_rate
        return self.default_learning_rate


def _lora_config(config: MethodConfig, base: BaseFacts) -> PeftConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules_list() or "all-linear",
        bias="none",
    )


def _prompt_tuning_config(config: MethodConfig, base: BaseFacts) -> PeftConfig:
    if config.init_text is None:
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens)
    return PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=config.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=config.init_text,
        tokenizer_name_or_path=str(base.checkpoint_dir),
    )


def _prefix_tuning_config(config: MethodConfig, base: BaseFacts) -> PeftConfig:
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
        encoder_hidden_size=config.prefix_hidden_size or base.hidden_size,
    )


def _prefix_from_text(peft_model: Any, config: MethodConfig, base: BaseFacts) -> None:
    if config.init_text is not None:
        from transformers import AutoTokenizer

        from quiver.training.prefix_init import initialise_prefix_from_text

        tokenizer = AutoTokenizer.from_pretrained(str(base.checkpoint_dir))
        initialise_prefix_from_text(peft_model, tokenizer, config.init_text)


def _prepare_full_precision(model: Any, gradient_checkpointing: bool) -> Any:
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_CHECKPOINTING_KWARGS)
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad through checkpoints
    return model


def _prepare_kbit(model: Any, gradient_checkpointing: bool) -> Any:
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=_CHECKPOINTING_KWARGS
    )


METHODS: dict[str, TrainingMethod] = {
    "lora": TrainingMethod(1e-3, "none", _lora_config, _prepare_full_precision),
    "qlora": TrainingMethod(1e-3, "nf4", _lora_config, _prepare_kbit),
    # Soft prompts are few parameters starting far from a useful point: they need far larger steps than LoRA
    # (Lester et al. used 0.3 with Adafactor; 3e-2 with AdamW is PEFT's example value).
    "prompt-tuning": TrainingMethod(3e-2, "none", _prompt_tuning_config, _prepare_full_precision),
    # The prefix sits in every layer's attention, so it tolerates smaller steps than a soft prompt; the MLP far
    # smaller ones (3e-3 diverged: training/README.md). PEFT's prefix keys/values travel as a KV cache, which
    # gradient checkpointing disables.
    "prefix-tuning": TrainingMethod(
        1e-2, "none", _prefix_tuning_config, _prepare_full_precision, supports_gradient_checkpointing=False,
        initialise=_prefix_from_text, projected_learning_rate=1e-3,
    ),
}


def method_for(config: MethodConfig) -> TrainingMethod:
    """The registry entry of `config.method`."""
    if config.method not in METHODS:
        raise ValueError(f"--method {config.method!r} is not one of {', '.join(METHODS)}")
    return METHODS[config.method]


def check_gradient_checkpointing(config: MethodConfig, gradient_checkpointing: bool) -> None:
    """Refuse --gradient-checkpointing for a method it does not work with."""
    if gradient_checkpointing and not method_for(config).supports_gradient_checkpointing:
        raise ValueError(f"--gradient-checkpointing does not work with --method {config.method}")


def wrap_for_training(model: Any, config: MethodConfig, base: BaseFacts, gradient_checkpointing: bool) -> Any:
    """The base `model` prepared for `config.method` and wrapped in a trainable PeftModel (base frozen)."""
    check_gradient_checkpointing(config, gradient_checkpointing)
    method = method_for(config)
    prepared = method.prepare(model, gradient_checkpointing)
    wrapped = get_peft_model(prepared, method.peft_config(config, base))
    if method.initialise is not None:
        method.initialise(wrapped, config, base)
    return wrapped
