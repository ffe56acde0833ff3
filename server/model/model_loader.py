"""Loads the one base model the server runs: checkpoint, placement, quantization, tokenizer, identity.

Everything is decided once here and recorded in `BaseModelInfo`, which ModelInfo reports to clients.
Loading is strictly local and safe: no hub access, no remote code, safetensors only (never pickle).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quiver.common.errors import ModelLoadError
from quiver.common.fingerprint import fingerprint
from quiver.common.model_source import default_cache_dir, resolve_checkpoint, source_name
from quiver.common.quantization import (
    dtype_name,
    keep_nf4_compute_dtype,
    quantization_config,
    resolve_device,
    resolve_dtype,
    resolve_quantization,
)
from quiver.server.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModelInfo:
    """What clients learn about the base model (ModelInfo RPC); adapters are checked against `fingerprint`."""

    name: str  # checkpoint directory name or GGUF file name
    fingerprint: str  # "sha256:<64 hex>", see common/fingerprint.py
    quantization: str  # "nf4" | "int8" | "none"
    device: str  # "cpu" | "cuda:0"
    dtype: str  # compute dtype of unquantized parts, e.g. "float32"
    context_length: int  # config.max_position_embeddings
    resident_bytes: int  # parameters + buffers as held in memory (after quantization)
    architecture: str  # e.g. "LlamaForCausalLM"
    has_chat_template: bool


@dataclass
class LoadedModel:
    """The base model ready to serve: in eval mode on its device, with its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: BaseModelInfo
    checkpoint_dir: Path
    eos_token_ids: frozenset[int]  # generation stops at any of these

    @property
    def view(self) -> ModelView:
        return ModelView(self.tokenizer, self.info.context_length, self.info.fingerprint, self.info.name,
                         self.checkpoint_dir)


@dataclass(frozen=True)
class ModelView:
    """What validating and tokenizing requests needs of the base model, without its weights (a front that runs
    no engine, as Ray Serve's ingress, loads only this)."""

    tokenizer: PreTrainedTokenizerBase
    context_length: int
    fingerprint: str
    name: str
    checkpoint_dir: Path


def load_model_view(config: ModelConfig) -> ModelView:
    """The tokenizer, context length and identity of `config`'s model, reading no weights."""
    from transformers import AutoConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    checkpoint_dir = resolve_checkpoint(config.model, cache_dir)
    try:
        model_config = AutoConfig.from_pretrained(str(checkpoint_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # start-up boundary, as in load_base_model
        raise ModelLoadError(f"cannot read the model config in {checkpoint_dir}: {e}") from e
    length = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(length, int) or length < 1:
        raise ModelLoadError(f"the config in {checkpoint_dir} sets no max_position_embeddings")
    return ModelView(_load_tokenizer(checkpoint_dir), length, fingerprint(checkpoint_dir), source_name(config.model),
                     checkpoint_dir)


def load_base_model(config: ModelConfig) -> LoadedModel:
    """Resolve, load and describe the base model named by `config`; any failure is a ModelLoadError."""
    # Belt and braces with local_files_only: no code path below may reach the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    scheme = resolve_quantization(config.quantize, device)
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    checkpoint_dir = resolve_checkpoint(config.model, cache_dir)

    model = _load_model(checkpoint_dir, device, dtype, scheme)
    tokenizer = _load_tokenizer(checkpoint_dir)
    info = BaseModelInfo(
        name=source_name(config.model),
        fingerprint=fingerprint(checkpoint_dir),
        quantization=scheme,
        device=device,
        dtype=dtype_name(dtype),
        context_length=_context_length(model),
        resident_bytes=int(model.get_memory_footprint()),
        architecture=type(model).__name__,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
    log.info(
        "loaded %s (%s, %s, %s on %s, %.1f MiB, fingerprint %s)",
        info.name, info.architecture, info.quantization, info.dtype, info.device,
        info.resident_bytes / 2**20, info.fingerprint,
    )
    return LoadedModel(model, tokenizer, info, checkpoint_dir, _eos_token_ids(model, tokenizer))


def _load_model(checkpoint_dir: Path, device: str, dtype: torch.dtype, scheme: str) -> PreTrainedModel:
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": device,
        "local_files_only": True,
        "trust_remote_code": False,
        "use_safetensors": True,  # refuses pickle-based *.bin checkpoints
    }
    quant = quantization_config(scheme, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), **kwargs)
    except Exception as e:  # start-up boundary: every cause becomes one clear load error
        raise ModelLoadError(f"cannot load the model in {checkpoint_dir} ({scheme} on {device}): {e}") from e
    keep_nf4_compute_dtype(model, device, dtype)
    return model.eval()


def _load_tokenizer(checkpoint_dir: Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(checkpoint_dir), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:  # start-up boundary, as above
        raise ModelLoadError(f"cannot load the tokenizer in {checkpoint_dir}: {e}") from e
    if tokenizer.pad_token is None:
        # Batched prompts are padded; the pad token is masked out, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _context_length(model: PreTrainedModel) -> int:
    text_config = model.config.get_text_config()
    length = getattr(text_config, "max_position_embeddings", None)
    if not isinstance(length, int) or length < 1:
        raise ModelLoadError(f"{type(model).__name__}'s config sets no max_position_embeddings")
    return length


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    configured = model.generation_config.eos_token_id if model.generation_config else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ModelLoadError("neither the generation config nor the tokenizer names an end-of-sequence token")
    return frozenset(ids)
