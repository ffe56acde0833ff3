"""What an adapter must fit: the base model's shapes, read from config.json and safetensors headers only.

No tensor is loaded and no model is built, so the spec is the same whether the engine later holds the base in
fp32, bf16 or 4-bit: quantization changes how weights are stored in memory, not the Linear shapes LoRA targets.
Linear modules are the 2-D `<path>.weight` tensors of the checkpoint, stored as nn.Linear stores them,
(out_features, in_features); embeddings and the output head are excluded (Quiver applies LoRA to Linear layers
only) and norms are 1-D so never match.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from quiver.common.errors import ModelLoadError
from quiver.common.fingerprint import fingerprint, read_safetensors_header

# Leaf names of 2-D weights that are lookup tables or the output head, never a LoRA-able Linear.
EMBEDDING_LEAF_NAMES = frozenset(
    {"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out", "word_embeddings", "embed_positions"}
)


@dataclass(frozen=True)
class BaseModelSpec:
    """The shapes and identity of a base model that adapters are validated against."""

    fingerprint: str
    """`quiver.common.fingerprint.fingerprint` of the checkpoint directory ("sha256:<64 hex>")."""
    architecture: str
    """First entry of config.json's `architectures`, e.g. "LlamaForCausalLM" ("" when absent)."""
    model_type: str
    """config.json's `model_type`, e.g. "llama"."""
    hidden_size: int
    """Width of the residual stream and of input embeddings (what a soft prompt's rows must have)."""
    num_layers: int
    """Number of transformer blocks (`num_hidden_layers`)."""
    num_attention_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer (`num_key_value_heads`; equals `num_attention_heads` without GQA)."""
    head_dim: int
    """Width of one attention head (config `head_dim`, else hidden_size // num_attention_heads)."""
    vocab_size: int
    """Rows of the input embedding."""
    linear_modules: Mapping[str, tuple[int, int]]
    """Module path without ".weight" (e.g. "model.layers.0.self_attn.q_proj") -> (in_features, out_features)."""
    module_names: frozenset[str]
    """Leaf names of the linear modules ("q_proj", "k_proj", ..., "down_proj")."""

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (or values) across all KV heads: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim


def base_spec_from_checkpoint(checkpoint_dir: Path) -> BaseModelSpec:
    """The spec of the checkpoint in `checkpoint_dir` (config.json plus *.safetensors headers)."""
    config = _text_config(checkpoint_dir / "config.json")
    try:
        hidden_size = int(config["hidden_size"])
        num_heads = int(config["num_attention_heads"])
        num_layers = int(config["num_hidden_layers"])
        vocab_size = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{checkpoint_dir}/config.json lacks a usable architecture field: {e}") from e
    head_dim = config.get("head_dim") or hidden_size // num_heads
    linear_modules = _linear_modules(checkpoint_dir)
    architectures = config.get("architectures") or [""]
    return BaseModelSpec(
        fingerprint=fingerprint(checkpoint_dir),
        architecture=str(architectures[0]),
        model_type=str(config.get("model_type", "")),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_attention_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        vocab_size=vocab_size,
        linear_modules=MappingProxyType(linear_modules),
        module_names=frozenset(path.rsplit(".", 1)[-1] for path in linear_modules),
    )


def _text_config(config_path: Path) -> dict[str, Any]:
    # Multimodal checkpoints keep the language model's fields in `text_config`; architecture and model type
    # stay those of the top level, as PEFT's `_prepare_prompt_learning_config` does.
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {config_path}: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} is not a JSON object")
    text = config.get("text_config")
    if isinstance(text, dict):
        return {**text, "architectures": config.get("architectures"), "model_type": config.get("model_type")}
    return config


def _linear_modules(checkpoint_dir: Path) -> dict[str, tuple[int, int]]:
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{checkpoint_dir} holds no *.safetensors weights")
    modules: dict[str, tuple[int, int]] = {}
    for path in files:
        for name, entry in read_safetensors_header(path).items():
            shape = entry.get("shape", [])
            if not name.endswith(".weight") or len(shape) != 2:
                continue
            module = name.removesuffix(".weight")
            if module.rsplit(".", 1)[-1] in EMBEDDING_LEAF_NAMES:
                continue
            out_features, in_features = shape
            modules[module] = (int(in_features), int(out_features))
    return dict(sorted(modules.items()))
