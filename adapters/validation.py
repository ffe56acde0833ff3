"""Validation of an uploaded PEFT adapter against the resident base model.

Checks run in a fixed order, each stage raising before the next runs, and every stage reporting all of its
problems at once:
  1. files      adapter_config.json and adapter_model.safetensors present; no pickle-based weights anywhere
                (never opened)                                                        -> InvalidArgument
  2. size       all files together within `max_adapter_bytes`                         -> TooLarge (RESOURCE_EXHAUSTED)
  3. config     adapter_config.json parsed into a spec (peft_config.py)     -> InvalidArgument / FailedPrecondition
  4. tensors    safetensors framing, float dtypes, finite values (safetensors_check)  -> InvalidArgument
  5. fit        every tensor fits the base: LoRA A (r, in) / B (out, r) on a Linear of the base, ranks equal to
                the config's and within `max_rank`; soft prompts (P, hidden_size); prefixes (P, L*2*H_kv*D);
                the base fingerprint the adapter was made for, when known             -> FailedPrecondition
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from quiver.adapters.base_spec import EMBEDDING_LEAF_NAMES, BaseModelSpec
from quiver.adapters.peft_config import (
    CONFIG_FILE,
    AdapterKind,
    AdapterSpec,
    LoraSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
    PTuningSpec,
    read_peft_config,
)
from quiver.adapters.prefix import PREFIX_FILE, PREFIX_KEY, prefix_layout_problems, prefix_to_kv
from quiver.adapters.safetensors_check import capped_reasons, foreign_weight_files, load_checked_safetensors
from quiver.common.errors import FailedPrecondition, InvalidArgument, TooLarge

WEIGHTS_FILE = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"

# PEFT's LoRA keys: "base_model.model.<module path>.lora_A.weight" (".lora_A.default.weight" also accepted).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])(?:\.default)?\.weight$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# Tensor-name fragments of features PEFT may save that Quiver does not serve, and what to call them.
_UNSUPPORTED_TENSORS = {
    "lora_magnitude_vector": "DoRA magnitude",
    "lora_embedding_": "LoRA on an embedding layer",
    "modules_to_save": "a modules_to_save copy",
    "trainable_tokens": "trainable tokens",
    ".bias": "a trained bias",
}


@dataclass(frozen=True)
class ValidationLimits:
    """Limits an adapter must respect to be accepted."""

    max_rank: int = 256
    """Largest LoRA rank accepted (any module)."""
    max_adapter_bytes: int = 256 * 1024 * 1024
    """Largest total size of the files in an adapter directory, in bytes."""


@dataclass(frozen=True)
class ValidatedAdapter:
    """An adapter that fits the base, with what the store and engine need to know about it."""

    kind: AdapterKind
    """"lora", "prompt_tuning" (also P-tuning) or "prefix_tuning"."""
    peft_type: str
    """PEFT's type name from adapter_config.json ("LORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")."""
    spec: AdapterSpec
    """The typed adapter_config.json."""
    num_parameters: int
    """Elements across all saved tensors."""
    rank: int | None
    """Largest LoRA rank over the adapted modules; None for prompts and prefixes."""
    num_virtual_tokens: int | None
    """Soft prompt or prefix length; None for LoRA."""
    target_modules: tuple[str, ...]
    """Sorted leaf names of the modules that carry LoRA weights (e.g. ("q_proj", "v_proj")); () otherwise."""
    size_bytes: int
    """Total size of the files in the adapter directory, in bytes."""
    extra_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Files to store beside the adapter: for prefix tuning {PREFIX_FILE: {PREFIX_KEY: (L, 2, H_kv, P, D)}}."""
    lora_scalings: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """LoRA module path -> scale of B A x (alpha / r, or alpha / sqrt(r); rank/alpha patterns resolved)."""


@dataclass
class _Fit:
    """What a kind's fit check found: problems, or the facts of an adapter that fits."""

    reasons: list[str] = field(default_factory=list)
    rank: int | None = None
    num_virtual_tokens: int | None = None
    target_modules: tuple[str, ...] = ()
    extra_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    lora_scalings: dict[str, float] = field(default_factory=dict)


def validate_adapter(
    adapter_dir: Path,
    base: BaseModelSpec,
    limits: ValidationLimits,
    *,
    base_fingerprint_of_adapter: str | None = None,
) -> ValidatedAdapter:
    """Check the PEFT adapter in `adapter_dir` against `base`; raise on the first failing stage (module doc)."""
    _check_files(adapter_dir)
    size_bytes = _check_size(adapter_dir, limits)
    parsed = read_peft_config(adapter_dir)
    tensors = load_checked_safetensors(adapter_dir / WEIGHTS_FILE)
    fit = FIT_CHECKS[parsed.spec.kind](parsed.spec, tensors, base, limits)
    reasons = _identity_problems(base, base_fingerprint_of_adapter) + fit.reasons
    if reasons:
        raise FailedPrecondition(
            f"adapter does not fit base model {base.architecture or base.model_type}", reasons=capped_reasons(reasons)
        )
    return ValidatedAdapter(
        kind=parsed.spec.kind,
        peft_type=parsed.peft_type,
        spec=parsed.spec,
        num_parameters=sum(t.numel() for t in tensors.values()),
        rank=fit.rank,
        num_virtual_tokens=fit.num_virtual_tokens,
        target_modules=fit.target_modules,
        size_bytes=size_bytes,
        extra_files=fit.extra_files,
        lora_scalings=MappingProxyType(fit.lora_scalings),
    )


def _check_files(adapter_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise InvalidArgument("adapter", f"{adapter_dir} is not a directory")
    problems = [f"{name} is missing" for name in (CONFIG_FILE, WEIGHTS_FILE) if not (adapter_dir / name).is_file()]
    problems += [
        f"{name} is a pickle-based or non-safetensors weights file, refused unopened (save with safetensors)"
        for name in foreign_weight_files(adapter_dir)
    ]
    if problems:
        raise InvalidArgument("adapter", "; ".join(problems))


def _check_size(adapter_dir: Path, limits: ValidationLimits) -> int:
    # Every file counts, not only the weights: the limit bounds what an upload may make the server hold.
    size = sum(path.lstat().st_size for path in adapter_dir.rglob("*") if path.is_file())
    if size > limits.max_adapter_bytes:
        raise TooLarge(
            "adapter too large",
            reasons=[f"the adapter's files are {size} bytes, over max_adapter_bytes {limits.max_adapter_bytes}"],
        )
    return size


def _identity_problems(base: BaseModelSpec, base_fingerprint_of_adapter: str | None) -> list[str]:
    if base_fingerprint_of_adapter is None or base_fingerprint_of_adapter == base.fingerprint:
        return []
    return [f"adapter was made for base {base_fingerprint_of_adapter}, this server's base is {base.fingerprint}"]


# --- LoRA -----------------------------------------------------------------------------------------------------


def _fit_lora(
    spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelSpec, limits: ValidationLimits
) -> _Fit:
    assert isinstance(spec, LoraSpec)  # FIT_CHECKS dispatches on spec.kind
    fit = _Fit()
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(tensors):
        match = _LORA_KEY.match(name)
        if match is None:
            fit.reasons.append(_unexpected_tensor(name))
        else:
            halves.setdefault(match["module"], {})[match["half"]] = tensors[name]
    if not halves:
        fit.reasons.append(f"{WEIGHTS_FILE} holds no LoRA weights")
    ranks = [spec.max_rank]
    for module, pair in halves.items():
        fit.reasons += _lora_module_problems(module, pair, spec, base)
        ranks += [t.shape[0] for half, t in pair.items() if half == "A" and t.ndim == 2]
    if max(ranks) > limits.max_rank:
        fit.reasons.insert(0, f"rank {max(ranks)} exceeds --max-rank {limits.max_rank}")
    if not fit.reasons:
        fit.rank = max(spec.rank_for(module) for module in halves)
        fit.target_modules = tuple(sorted({module.rsplit(".", 1)[-1] for module in halves}))
        fit.lora_scalings = {module: spec.scaling_for(module) for module in halves}
    return fit


def _unexpected_tensor(name: str) -> str:
    for fragment, what in _UNSUPPORTED_TENSORS.items():
        if fragment in name:
            return f"tensor {name!r} is {what}, which is not supported"
    return f"tensor {name!r} is not a LoRA weight (expected base_model.model.<module>.lora_A/lora_B.weight)"


def _lora_module_problems(
    module: str, pair: Mapping[str, torch.Tensor], spec: LoraSpec, base: BaseModelSpec
) -> list[str]:
    if module not in base.linear_modules:
        return [_unknown_module(module, base)]
    problems = [
        f"{module} has lora_{half} but no lora_{other}"
        for half, other in (("A", "B"), ("B", "A"))
        if half in pair and other not in pair
    ]
    if problems:
        return problems
    in_features, out_features = base.linear_modules[module]
    r = spec.rank_for(module)
    for half, expected in (("A", (r, in_features)), ("B", (out_features, r))):
        shape = tuple(pair[half].shape)
        if shape != expected:
            problems.append(
                f"{module}.lora_{half} has shape {shape}, expected {expected} "
                f"(rank {r}, base in/out features {in_features}/{out_features})"
            )
    if not spec.targets(module):
        problems.append(f"{module} carries LoRA weights but target_modules {spec.target_modules!r} excludes it")
    layer = _layer_index(module)
    if spec.layers_to_transform is not None and layer not in spec.layers_to_transform:
        problems.append(f"{module} carries LoRA weights but layers_to_transform is {list(spec.layers_to_transform)}")
    return problems


def _layer_index(module: str) -> int | None:
    match = _LAYER_INDEX.search(f".{module}.")
    return int(match[1]) if match else None


def _unknown_module(module: str, base: BaseModelSpec) -> str:
    leaf = module.rsplit(".", 1)[-1]
    layer = _layer_index(module)
    if leaf in EMBEDDING_LEAF_NAMES:
        return f"LoRA on {leaf} ({module}), an embedding or output head, is not supported"
    if leaf not in base.module_names:
        return f"unknown target module {leaf!r} ({module}); the base's linear modules are {sorted(base.module_names)}"
    if layer is not None and layer >= base.num_layers:
        return f"layer {layer} out of range ({module}); the base has {base.num_layers} layers"
    return f"{module} is not a linear module of the base"


# --- Soft prompts (prompt tuning, P-tuning) and prefixes ---------------------------------------------------------


def _single_embedding(tensors: dict[str, torch.Tensor], fit: _Fit) -> torch.Tensor | None:
    fit.reasons += [
        f"tensor {name!r} is unexpected; a prompt adapter holds only {PROMPT_KEY!r}"
        for name in sorted(tensors)
        if name != PROMPT_KEY
    ]
    if PROMPT_KEY not in tensors:
        fit.reasons.append(f"{WEIGHTS_FILE} has no {PROMPT_KEY!r} tensor")
        return None
    return tensors[PROMPT_KEY]


def _fit_prompt(spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelSpec, _: ValidationLimits) -> _Fit:
    fit = _Fit()
    embeddings = _single_embedding(tensors, fit)
    assert isinstance(spec, PromptTuningSpec | PTuningSpec)  # FIT_CHECKS dispatches on spec.kind
    num_tokens = spec.num_virtual_tokens
    if spec.token_dim != base.hidden_size:
        fit.reasons.append(f"token_dim {spec.token_dim} differs from the base's hidden_size {base.hidden_size}")
    if embeddings is not None and tuple(embeddings.shape) != (num_tokens, base.hidden_size):
        fit.reasons.append(
            f"{PROMPT_KEY} has shape {tuple(embeddings.shape)}, expected "
            f"(num_virtual_tokens {num_tokens}, hidden_size {base.hidden_size})"
        )
    fit.num_virtual_tokens = num_tokens
    return fit


def _fit_prefix(spec: AdapterSpec, tensors: dict[str, torch.Tensor], base: BaseModelSpec, _: ValidationLimits) -> _Fit:
    assert isinstance(spec, PrefixTuningSpec)  # FIT_CHECKS dispatches on spec.kind
    fit = _Fit(num_virtual_tokens=spec.num_virtual_tokens)
    embeddings = _single_embedding(tensors, fit)
    expected = {"num_layers": base.num_layers, "token_dim": base.kv_dim, "num_attention_heads": base.num_kv_heads}
    for name, want in expected.items():
        if getattr(spec, name) != want:
            fit.reasons.append(
                f"prefix {name} {getattr(spec, name)} differs from the base's {want} "
                "(PEFT uses num_kv_heads * head_dim and num_kv_heads for GQA)"
            )
    if embeddings is not None:
        fit.reasons += prefix_layout_problems(tuple(embeddings.shape), spec.num_virtual_tokens, base)
    if not fit.reasons and embeddings is not None:
        fit.extra_files = {PREFIX_FILE: {PREFIX_KEY: prefix_to_kv(embeddings, base)}}
    return fit


FitCheck = Callable[[AdapterSpec, dict[str, torch.Tensor], BaseModelSpec, ValidationLimits], _Fit]
FIT_CHECKS: dict[AdapterKind, FitCheck] = {
    "lora": _fit_lora,
    "prompt_tuning": _fit_prompt,
    "prefix_tuning": _fit_prefix,
}
