"""PEFT's adapter_config.json read into small typed specs, refusing every feature Quiver does not serve.

Supported (PEFT's on-disk format, as `save_pretrained` writes it):
  LORA            LoRA (Hu et al., 2021): W x + (alpha / r) B A x on Linear layers; rsLoRA (Kalajdzievski, 2023)
                  scales by alpha / sqrt(r). `rank_pattern`/`alpha_pattern` (per-module rank and alpha) are
                  supported and resolved exactly as PEFT does (`LoraSpec.rank_for`, `scaling_for`);
                  `layers_to_transform`, `layers_pattern` and `exclude_modules` only restrict which modules carry
                  weights, so they are accepted and checked against the saved tensors.
  PROMPT_TUNING   Prompt tuning (Lester et al., 2021): `num_virtual_tokens` learned input embeddings.
  P_TUNING        P-tuning (Liu et al., 2021): PEFT saves its prompt encoder's *output*, so on disk it is a
                  plain soft prompt, served as prompt tuning.
  PREFIX_TUNING   Prefix tuning (Li & Liang, 2021): learned keys/values prepended in every layer. With
                  `prefix_projection` PEFT saves the MLP's output, so on disk it is always the flat prefix.

Everything else is refused with FailedPrecondition listing every unsupported feature at once (other peft types,
DoRA, modules_to_save, biases, fan_in_fan_out, QA-LoRA, Megatron, trainable tokens, target_parameters, layer
replication, LoRA variants, initialisations that rewrite the base weights, task types other than CAUSAL_LM and
SEQ_CLS, unknown fields set to a non-default value). A SEQ_CLS adapter's `modules_to_save` may name only its
classification head. Malformed JSON or wrongly typed fields are InvalidArgument.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from quiver.adapters.metadata import AdapterTask
from quiver.adapters.safetensors_check import capped_reasons
from quiver.common.errors import FailedPrecondition, InvalidArgument

CONFIG_FILE = "adapter_config.json"
ALL_LINEAR = "all-linear"
AdapterKind = Literal["lora", "prompt_tuning", "prefix_tuning"]


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter's hyperparameters."""

    kind: ClassVar[AdapterKind] = "lora"
    r: int
    """Default rank of every adapted module."""
    lora_alpha: float
    """Default alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    use_rslora: bool
    """Rank-stabilised scaling alpha / sqrt(r)."""
    target_modules: tuple[str, ...] | str | None
    """Leaf names or module paths; or "all-linear"; or a regex PEFT fullmatches on module paths; None: unstated."""
    exclude_modules: tuple[str, ...] | str | None = None
    """Modules PEFT skipped, same forms as target_modules."""
    rank_pattern: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Regex (matched on a module path's tail) -> rank overriding r for matching modules."""
    alpha_pattern: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Regex -> alpha overriding lora_alpha for matching modules."""
    layers_to_transform: tuple[int, ...] | None = None
    """Layer indices PEFT adapted; None: every layer."""

    @property
    def scaling(self) -> float:
        """The default modules' scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return _scale(self.lora_alpha, self.r, self.use_rslora)

    @property
    def max_rank(self) -> int:
        """The largest rank any module may have (r or a rank_pattern value)."""
        return max([self.r, *self.rank_pattern.values()])

    def rank_for(self, module_path: str) -> int:
        """The rank PEFT gives `module_path` (e.g. "model.layers.0.self_attn.q_proj")."""
        key = _pattern_key(self.rank_pattern, module_path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_path: str) -> float:
        """The alpha PEFT gives `module_path`."""
        key = _pattern_key(self.alpha_pattern, module_path)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling_for(self, module_path: str) -> float:
        """The scale PEFT applies to B A x in `module_path`."""
        return _scale(self.alpha_for(module_path), self.rank_for(module_path), self.use_rslora)

    def targets(self, module_path: str) -> bool:
        """Whether PEFT's target/exclude matching (`check_target_module_exists`) selects `module_path`."""
        if self.exclude_modules is not None and _matches(self.exclude_modules, module_path):
            return False
        if self.target_modules is None or self.target_modules == ALL_LINEAR:
            return True
        return _matches(self.target_modules, module_path)


@dataclass(frozen=True)
class PromptTuningSpec:
    """A soft prompt: `num_virtual_tokens` rows of input embeddings prepended to the prompt."""

    kind: ClassVar[AdapterKind] = "prompt_tuning"
    num_virtual_tokens: int
    """Rows of the saved `prompt_embeddings`."""
    token_dim: int
    """Width of each row; must equal the base's hidden_size."""


@dataclass(frozen=True)
class PTuningSpec:
    """P-tuning, stored by PEFT as its encoder's output: served exactly like a PromptTuningSpec."""

    kind: ClassVar[AdapterKind] = "prompt_tuning"
    num_virtual_tokens: int
    """Rows of the saved `prompt_embeddings` (already the encoder's output)."""
    token_dim: int
    """Width of each row; must equal the base's hidden_size."""


@dataclass(frozen=True)
class PrefixTuningSpec:
    """A prefix: per layer, `num_virtual_tokens` keys and values prepended to the attention cache."""

    kind: ClassVar[AdapterKind] = "prefix_tuning"
    num_virtual_tokens: int
    """Prefix length in positions."""
    num_layers: int
    """Layers the prefix covers; must equal the base's."""
    token_dim: int
    """Keys' width per layer; PEFT sets it to num_kv_heads * head_dim for GQA bases."""
    num_attention_heads: int
    """Heads the keys are split into; PEFT sets it to num_kv_heads for GQA bases."""
    prefix_projection: bool
    """Trained through an MLP; informational, since PEFT saves the MLP's output."""


AdapterSpec = LoraSpec | PromptTuningSpec | PTuningSpec | PrefixTuningSpec


def _scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _pattern_key(patterns: Mapping[str, Any], module_path: str) -> str | None:
    # PEFT's `get_pattern_key`: the first pattern matching a dotted tail of the path wins.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def _matches(targets: tuple[str, ...] | str, module_path: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module_path) is not None
    return any(module_path == t or module_path.endswith(f".{t}") for t in targets)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_regex(value: str) -> bool:
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError):  # deeply nested or huge repeats fail outside re.error
        return False
    return True


class _Fields:
    """Typed reads of a raw config dict; each wrong field is recorded as a problem instead of raising."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        self.malformed: list[str] = []

    def _bad(self, name: str, expected: str) -> None:
        self.malformed.append(f"{name} must be {expected}, got {self.raw.get(name)!r}")

    def positive_int(self, name: str, *, default: int | None = None) -> int:
        value = self.raw.get(name, default)
        if not _is_int(value, 1):
            self._bad(name, "a positive integer")
            return 1
        return int(value)

    def number(self, name: str, *, default: float) -> float:
        value = self.raw.get(name, default)
        if not _is_number(value):
            self._bad(name, "a finite number")
            return default
        return float(value)

    def flag(self, name: str) -> bool:
        value = self.raw.get(name) or False
        if not isinstance(value, bool):
            self._bad(name, "true or false")
            return False
        return value

    def modules(self, name: str) -> tuple[str, ...] | str | None:
        value = self.raw.get(name)
        if value is None or (isinstance(value, str) and _is_regex(value)):
            return value  # None (unstated), "all-linear" or a regex
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return tuple(sorted(set(value)))
        self._bad(name, 'a list of module names, "all-linear" or a valid regex')
        return None

    def pattern(self, name: str, *, integer: bool) -> dict[str, Any]:
        value = self.raw.get(name) or {}
        if not isinstance(value, dict):
            self._bad(name, "an object mapping regexes to values")
            return {}
        valid = {k: v for k, v in value.items() if _is_regex(k) and (_is_int(v, 1) if integer else _is_number(v))}
        for key in value.keys() - valid.keys():
            kind = "a positive integer" if integer else "a finite number"
            self.malformed.append(f"{name}[{key!r}] must map a valid regex to {kind}, got {value[key]!r}")
        return valid

    def layer_list(self, name: str) -> tuple[int, ...] | None:
        value = self.raw.get(name)
        if value is None or value == []:
            return None
        if _is_int(value, 0):
            return (value,)
        if isinstance(value, list) and all(_is_int(v, 0) for v in value):
            return tuple(sorted(set(value)))
        self._bad(name, "a layer index or a list of layer indices")
        return None


# --- Unsupported features -------------------------------------------------------------------------------------
# field -> (is the value acceptable?, why it is refused). A field absent from the config counts as acceptable.
Rule = tuple[Callable[[Any], bool], str]


def _unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


_SAFE_LORA_INITS = (True, False, "gaussian", "eva", "orthogonal")

HEAD_MODULES = frozenset({"score", "classifier"})
"""The classification heads PEFT trains with a SEQ_CLS adapter (its `modules_to_save` default): the only fully
trained modules Quiver serves, as a per-row head (adapters/classifier_head.py)."""

COMMON_RULES: dict[str, Rule] = {
    "task_type": (lambda v: v in (None, "CAUSAL_LM", "SEQ_CLS"), "only CAUSAL_LM and SEQ_CLS adapters are served"),
    "modules_to_save": (
        lambda v: _unset(v) or (isinstance(v, list) and set(v) <= HEAD_MODULES),
        "modules_to_save (fully trained copies of base modules) is supported only for a SEQ_CLS adapter's "
        f"classification head ({' or '.join(sorted(HEAD_MODULES))})",
    ),
}
LORA_RULES: dict[str, Rule] = {
    "use_dora": (_unset, "DoRA (use_dora) is not supported"),
    "bias": (lambda v: v in (None, "none"), "trained biases (bias != 'none') are not supported"),
    "lora_bias": (_unset, "lora_bias is not supported"),
    "fan_in_fan_out": (_unset, "fan_in_fan_out (Conv1D-style weights) is not supported"),
    "use_qalora": (_unset, "QA-LoRA (use_qalora) is not supported"),
    "megatron_config": (_unset, "Megatron parallel LoRA (megatron_config) is not supported"),
    "trainable_token_indices": (_unset, "trainable tokens (trainable_token_indices) are not supported"),
    "target_parameters": (_unset, "LoRA on parameters (target_parameters) is not supported"),
    "layer_replication": (_unset, "layer_replication changes the base model and is not supported"),
    "alora_invocation_tokens": (_unset, "activated LoRA (alora_invocation_tokens) is not supported"),
    "use_bdlora": (_unset, "BD-LoRA (use_bdlora) is not supported"),
    "velora_config": (_unset, "VeLoRA (velora_config) is not supported"),
    "monteclora_config": (_unset, "MonteCLoRA (monteclora_config) is not supported"),
    "arrow_config": (_unset, "Arrow routing (arrow_config) is not supported"),
    "kasa_config": (_unset, "KaSA (kasa_config) is not supported"),
    "init_lora_weights": (
        lambda v: v in _SAFE_LORA_INITS,
        "this init_lora_weights rewrites the base weights or selects a LoRA variant; save the adapter with "
        "path_initial_model_for_weight_conversion to get plain LoRA",
    ),
}
PROMPT_RULES: dict[str, Rule] = {
    "num_transformer_submodules": (lambda v: v in (None, 1), "encoder-decoder prompts are not supported"),
}

# Fields known to be inert for serving: they only steer training, initialisation or bookkeeping.
# fmt: off
COMMON_INERT = frozenset({"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                          "inference_mode"})
LORA_INERT = frozenset({"r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "lora_dropout",
                        "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_core",
                        "runtime_config", "qalora_group_size", "eva_config", "corda_config", "lora_ga_config",
                        "loftq_config", "ensure_weight_tying"})
PROMPT_INERT = frozenset({"num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"})
PROMPT_TUNING_INERT = frozenset({"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                 "tokenizer_kwargs"})
P_TUNING_INERT = frozenset({"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
                            "encoder_dropout"})
PREFIX_INERT = frozenset({"init_weights", "encoder_hidden_size", "prefix_projection"})
# fmt: on


def _unsupported(raw: Mapping[str, Any], rules: Mapping[str, Rule], inert: frozenset[str]) -> list[str]:
    reasons = [
        f"{why} ({name}={raw[name]!r})" for name, (ok, why) in rules.items() if name in raw and not ok(raw[name])
    ]
    for name in sorted(raw.keys() - rules.keys() - inert):
        if not _unset(raw[name]):
            reasons.append(f"unknown field {name}={raw[name]!r}: Quiver cannot tell what it changes")
    return reasons


def _head_without_task(raw: Mapping[str, Any]) -> list[str]:
    """A classification head (allowed by COMMON_RULES) in an adapter that does not say it classifies."""
    saved = raw.get("modules_to_save")
    if _unset(saved) or raw.get("task_type") == "SEQ_CLS" or not COMMON_RULES["modules_to_save"][0](saved):
        return []
    return [f"modules_to_save {saved!r} is a classification head: it needs task_type SEQ_CLS"]


# --- Parsers, one per peft_type -------------------------------------------------------------------------------
Parser = Callable[[_Fields], AdapterSpec]


MAX_ALPHA = 10_000.0  # far above any trained LoRA's (typically <= 2 r); a huge finite alpha turns logits to NaN


def _parse_lora(f: _Fields) -> LoraSpec:
    spec = _lora_spec(f)
    alphas = {"lora_alpha": spec.lora_alpha, **{f"alpha_pattern[{k!r}]": v for k, v in spec.alpha_pattern.items()}}
    for name, alpha in alphas.items():
        if abs(alpha) > MAX_ALPHA:
            f.malformed.append(f"{name} must be at most {MAX_ALPHA:g} in magnitude, got {alpha!r}")
    return spec


def _lora_spec(f: _Fields) -> LoraSpec:
    return LoraSpec(
        r=f.positive_int("r", default=8),
        lora_alpha=f.number("lora_alpha", default=8.0),
        use_rslora=f.flag("use_rslora"),
        target_modules=f.modules("target_modules"),
        exclude_modules=f.modules("exclude_modules"),
        rank_pattern=MappingProxyType(f.pattern("rank_pattern", integer=True)),
        alpha_pattern=MappingProxyType(f.pattern("alpha_pattern", integer=False)),
        layers_to_transform=f.layer_list("layers_to_transform"),
    )


def _parse_prompt_tuning(f: _Fields) -> PromptTuningSpec:
    return PromptTuningSpec(f.positive_int("num_virtual_tokens"), f.positive_int("token_dim"))


def _parse_p_tuning(f: _Fields) -> PTuningSpec:
    return PTuningSpec(f.positive_int("num_virtual_tokens"), f.positive_int("token_dim"))


def _parse_prefix_tuning(f: _Fields) -> PrefixTuningSpec:
    return PrefixTuningSpec(
        num_virtual_tokens=f.positive_int("num_virtual_tokens"),
        num_layers=f.positive_int("num_layers"),
        token_dim=f.positive_int("token_dim"),
        num_attention_heads=f.positive_int("num_attention_heads"),
        prefix_projection=f.flag("prefix_projection"),
    )


@dataclass(frozen=True)
class _PeftType:
    parse: Parser
    rules: Mapping[str, Rule]
    inert: frozenset[str]


PEFT_TYPES: dict[str, _PeftType] = {
    "LORA": _PeftType(_parse_lora, {**COMMON_RULES, **LORA_RULES}, COMMON_INERT | LORA_INERT),
    "PROMPT_TUNING": _PeftType(
        _parse_prompt_tuning, {**COMMON_RULES, **PROMPT_RULES}, COMMON_INERT | PROMPT_INERT | PROMPT_TUNING_INERT
    ),
    "P_TUNING": _PeftType(
        _parse_p_tuning, {**COMMON_RULES, **PROMPT_RULES}, COMMON_INERT | PROMPT_INERT | P_TUNING_INERT
    ),
    "PREFIX_TUNING": _PeftType(
        _parse_prefix_tuning, {**COMMON_RULES, **PROMPT_RULES}, COMMON_INERT | PROMPT_INERT | PREFIX_INERT
    ),
}


@dataclass(frozen=True)
class ParsedConfig:
    """An adapter_config.json that Quiver can serve."""

    peft_type: str
    """PEFT's type name, e.g. "LORA", "P_TUNING"."""
    spec: AdapterSpec
    """The typed hyperparameters."""
    base_model_name_or_path: str | None
    """PEFT's hint of the base the adapter was trained on; informational, never required."""
    task: AdapterTask = "generate"
    """"classify" for a SEQ_CLS adapter (a LoRA or soft prompt with a trained classification head)."""


def read_peft_config(adapter_dir: Path) -> ParsedConfig:
    """Parse `adapter_dir/adapter_config.json`; raises InvalidArgument or FailedPrecondition."""
    try:
        raw = json.loads((adapter_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nesting too deep
        raise InvalidArgument(CONFIG_FILE, f"is not readable JSON: {e}") from e
    return parse_peft_config(raw)


def parse_peft_config(raw: Any) -> ParsedConfig:
    """Parse a decoded adapter_config.json document."""
    if not isinstance(raw, dict):
        raise InvalidArgument(CONFIG_FILE, f"must be a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise InvalidArgument(CONFIG_FILE, f"peft_type must be a non-empty string, got {peft_type!r}")
    entry = PEFT_TYPES.get(peft_type)
    if entry is None:
        reasons = [f"peft_type {peft_type} is not supported (Quiver serves {', '.join(PEFT_TYPES)})"]
        reasons += _unsupported(raw, COMMON_RULES, frozenset(raw.keys())) + _head_without_task(raw)
        raise FailedPrecondition("unsupported adapter", reasons=capped_reasons(reasons))
    fields = _Fields(raw)
    spec = entry.parse(fields)
    hint = raw.get("base_model_name_or_path")
    if hint is not None and not isinstance(hint, str):
        fields.malformed.append(f"base_model_name_or_path must be a string, got {hint!r}")
    if fields.malformed:
        raise InvalidArgument(CONFIG_FILE, "; ".join(capped_reasons(fields.malformed)))
    reasons = _unsupported(raw, entry.rules, entry.inert) + _head_without_task(raw)
    task: AdapterTask = "classify" if raw.get("task_type") == "SEQ_CLS" else "generate"
    if reasons:
        raise FailedPrecondition("unsupported adapter", reasons=capped_reasons(reasons))
    return ParsedConfig(peft_type=peft_type, spec=spec, base_model_name_or_path=hint, task=task)
