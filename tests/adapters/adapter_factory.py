"""Real PEFT adapters for tests: each helper loads a base checkpoint, wraps it with `peft.get_peft_model`,
fills every trainable adapter parameter with seeded random values (PEFT zero-initialises LoRA's B and may
zero prefix encoders, which would hide layout bugs) and saves with `save_pretrained`, exactly the files a
user would upload.

    make_lora(base_dir, out_dir, r=8)                       -> out_dir (adapter_config.json + adapter_model.safetensors)
    make_prompt_tuning(base_dir, out_dir, num_virtual_tokens=4)
    make_prefix_tuning(base_dir, out_dir, prefix_projection=True)
    make_p_tuning(base_dir, out_dir)
    peft_model_for(base_dir, config, seed=0)                -> the in-memory PeftModel (for reference outputs)
    load_peft_model(base_dir, adapter_dir)                  -> PeftModel.from_pretrained, in eval/inference mode
    make_classifier(base_dir, out_dir, "lora", num_labels=3) -> a SEQ_CLS adapter with its trained head
    load_peft_classifier(adapter_dir, num_labels)           -> AutoPeftModelForSequenceClassification, the reference
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

# Scale of the random adapter weights: large enough to change outputs, small enough to stay finite in fp16.
RANDOM_SCALE = 0.1


def load_base(base_dir: Path) -> Any:
    """The base model of a checkpoint directory, in float32 and eval mode."""
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def peft_model_for(base_dir: Path, config: PeftConfig, *, seed: int = 0) -> Any:
    """`get_peft_model(base, config)` with every trainable parameter drawn from N(0, RANDOM_SCALE²) under `seed`."""
    model = get_peft_model(load_base(base_dir), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(noise * RANDOM_SCALE)
    return model.eval()


def make_adapter(base_dir: Path, out_dir: Path, config: PeftConfig, *, seed: int = 0) -> Path:
    """Build, randomise and `save_pretrained` an adapter for any PEFT config; returns `out_dir`."""
    peft_model_for(base_dir, config, seed=seed).save_pretrained(out_dir)
    return out_dir


def make_lora(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    lora_alpha: int | None = None,
    target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    **config: Any,
) -> Path:
    """A LoRA adapter (alpha defaults to 2r); extra keyword arguments go to `LoraConfig` unchanged."""
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        target_modules=targets,
        use_rslora=use_rslora,
        **config,
    )
    return make_adapter(base_dir, out_dir, lora, seed=seed)


def make_prompt_tuning(
    base_dir: Path, out_dir: Path, *, num_virtual_tokens: int = 4, seed: int = 0, **config: Any
) -> Path:
    """A prompt-tuning adapter (soft prompt of `num_virtual_tokens` input embeddings)."""
    prompt = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, **config)
    return make_adapter(base_dir, out_dir, prompt, seed=seed)


def make_prefix_tuning(
    base_dir: Path,
    out_dir: Path,
    *,
    num_virtual_tokens: int = 4,
    prefix_projection: bool = False,
    encoder_hidden_size: int = 32,
    seed: int = 0,
    **config: Any,
) -> Path:
    """A prefix-tuning adapter; with `prefix_projection` PEFT saves the MLP's output, not the MLP."""
    prefix = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=prefix_projection,
        encoder_hidden_size=encoder_hidden_size,
        **config,
    )
    return make_adapter(base_dir, out_dir, prefix, seed=seed)


def make_p_tuning(
    base_dir: Path,
    out_dir: Path,
    *,
    num_virtual_tokens: int = 4,
    encoder_hidden_size: int = 32,
    seed: int = 0,
    **config: Any,
) -> Path:
    """A P-tuning adapter; PEFT saves the prompt encoder's output embeddings, not the encoder."""
    p_tuning = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        encoder_hidden_size=encoder_hidden_size,
        **config,
    )
    return make_adapter(base_dir, out_dir, p_tuning, seed=seed)


def load_peft_model(base_dir: Path, adapter_dir: Path) -> PeftModel:
    """The reference: PEFT itself loading a saved adapter onto the base, in inference mode."""
    return PeftModel.from_pretrained(load_base(base_dir), adapter_dir).eval()


def make_classifier(base_dir: Path, out_dir: Path, method: str, *, num_labels: int = 3, seed: int = 0) -> Path:
    """A SEQ_CLS adapter (`method` "lora" on every linear, or "prompt" tuning with 4 virtual tokens) and its head
    (PEFT's `modules_to_save`), all randomised, saved as PEFT saves it."""
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels, dtype=torch.float32)
    config: PeftConfig = (LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear") if method == "lora"
                          else PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * RANDOM_SCALE * 4)
    model.save_pretrained(str(out_dir))
    return out_dir


def load_peft_classifier(adapter_dir: Path, num_labels: int) -> Any:
    """The reference: PEFT's AutoPeftModelForSequenceClassification loading a saved SEQ_CLS adapter (the base's
    head sized for `num_labels`, then replaced by the adapter's)."""
    from peft import AutoPeftModelForSequenceClassification

    return AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, num_labels=num_labels,
                                                                  dtype=torch.float32).eval()
