"""Validation of an uploaded PEFT adapter against the resident base model.

Checks run in a fixed order, each stage raising before the next runs, and every stage reporting all of its
problems at once:
  1. files      adapter_config.json and adapter_model.safetensors present as regular files; no pickle-based
                weights anywhere (never opened); no symbolic link leading out of the directory (following one
                would read, and store, a file the uploader picked anywhere on the server)  -> InvalidArgument
  2. size       all files together within `max_adapter_bytes`, the JSON files within MAX_JSON_BYTES, both from
                the directory listing before anything is read                         -> TooLarge (RESOURCE_EXHAUSTED)
  3. config     adapter_config.json parsed into a spec (peft_config.py)     -> InvalidArgument / FailedPrecondition;
                its regexes (PEFT matches them on every module path, and Python's re has no timeout) must not be
                able to backtrack catastrophically                                    -> InvalidArgument
  4. tensors    safetensors framing, float dtypes, finite values (safetensors_check)  -> InvalidArgument
  5. fit        every tensor fits the base: LoRA A (r, in) / B (out, r) on a Linear of the base, ranks equal to
                the config's and within `max_rank`; soft prompts (P, hidden_size); prefixes (P, L*2*H_kv*D);
                the base fingerprint the adapter was made for, when known             -> FailedPrecondition
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from re import _parser as _sre  # type: ignore[attr-defined]  # the stdlib's regex parser: re has no public AST
from types import MappingProxyType
from typing import Any

import torch

from quiver.adapters.base_spec import EMBEDDING_LEAF_NAMES, BaseModelSpec
from quiver.adapters.classifier_head import HEAD_WEIGHT, head_problems, split_head
from quiver.adapters.metadata import METADATA_FILE
from quiver.adapters.peft_config import (
    ALL_LINEAR,
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
MAX_JSON_BYTES = 1 << 20
"""Cap on adapter_config.json and quiver_adapter.json: PEFT writes a few kilobytes (tens with a per-module
rank_pattern); both are parsed whole, so a bigger one is refused before it is read."""
MAX_PATTERN_CHARS = 256
"""Longest regex accepted in target_modules, exclude_modules, rank_pattern or alpha_pattern."""
MAX_PATTERN_REPEATS = 3
"""Repeats (*, +, {m,n}) in one regex: matching time grows like path length ** repeats."""
MAX_TOTAL_REPEATS = 12
"""Repeats across all of a config's regexes, each of which runs on every module path of the base."""

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
    num_labels: int | None = None
    """A classification adapter's head outputs (SEQ_CLS); None for generation adapters."""


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
    labels: tuple[str, ...] | None = None,
) -> ValidatedAdapter:
    """Check the PEFT adapter in `adapter_dir` against `base`; raise on the first failing stage (module doc)."""
    size_bytes = check_upload(adapter_dir, limits)
    parsed = read_peft_config(adapter_dir)
    _check_patterns(parsed.spec)
    tensors = load_checked_safetensors(adapter_dir / WEIGHTS_FILE)
    head: dict[str, torch.Tensor] = {}
    head_reasons: list[str] = []
    if parsed.task == "classify":  # the head is checked on its own; the rest is the adapter of its kind
        head, body = split_head(tensors)
        head_reasons = head_problems(head, base.hidden_size, None if labels is None else len(labels))
    else:
        body = tensors
    fit = FIT_CHECKS[parsed.spec.kind](parsed.spec, body, base, limits)
    reasons = _identity_problems(base, base_fingerprint_of_adapter) + fit.reasons + head_reasons
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
        num_labels=head[HEAD_WEIGHT].shape[0] if head else None,
    )


def check_upload(adapter_dir: Path, limits: ValidationLimits) -> int:
    """Stages 1 and 2, from the directory listing alone (nothing is opened): the adapter's total size in bytes.
    Run before anything in `adapter_dir` is read."""
    _check_files(adapter_dir)
    return _check_size(adapter_dir, limits)


def _check_files(adapter_dir: Path) -> None:
    if not adapter_dir.is_dir():
        raise InvalidArgument("adapter", f"{adapter_dir} is not a directory")
    problems = [_required_problem(adapter_dir / name) for name in (CONFIG_FILE, WEIGHTS_FILE)]
    problems += [
        f"{name} is a pickle-based or non-safetensors weights file, refused unopened (save with safetensors)"
        for name in foreign_weight_files(adapter_dir)
    ]
    problems += [f"{name} is a symbolic link leading out of the adapter directory" for name in _links_out(adapter_dir)]
    if reasons := [p for p in problems if p]:
        raise InvalidArgument("adapter", "; ".join(capped_reasons(reasons)))


def _required_problem(path: Path) -> str:
    if not os.path.lexists(path):
        return f"{path.name} is missing"
    return "" if path.is_file() else f"{path.name} is not a regular file"  # a FIFO would block the reader for ever


def _links_out(adapter_dir: Path) -> Iterator[str]:
    root = adapter_dir.resolve()
    for path in sorted(adapter_dir.rglob("*")):  # rglob lists links but does not descend into linked directories
        if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(root):
            yield str(path.relative_to(adapter_dir))


def _check_size(adapter_dir: Path, limits: ValidationLimits) -> int:
    # Every file counts, not only the weights: the limit bounds what an upload may make the server hold.
    sizes = {path: path.lstat().st_size for path in adapter_dir.rglob("*") if path.is_file()}
    size = sum(sizes.values())
    reasons = [
        f"{path.name} is {sizes[path]} bytes, over the {MAX_JSON_BYTES}-byte cap on JSON files"
        for path in (adapter_dir / CONFIG_FILE, adapter_dir / METADATA_FILE)
        if sizes.get(path, 0) > MAX_JSON_BYTES
    ]
    if size > limits.max_adapter_bytes:
        reasons.insert(0, f"the adapter's files are {size} bytes, over max_adapter_bytes {limits.max_adapter_bytes}")
    if reasons:
        raise TooLarge("adapter too large", reasons=reasons)
    return size


def _identity_problems(base: BaseModelSpec, base_fingerprint_of_adapter: str | None) -> list[str]:
    if base_fingerprint_of_adapter is None or base_fingerprint_of_adapter == base.fingerprint:
        return []
    return [f"adapter was made for base {base_fingerprint_of_adapter}, this server's base is {base.fingerprint}"]


# --- Regexes in the config --------------------------------------------------------------------------------------

_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT)


def _check_patterns(spec: AdapterSpec) -> None:
    """Refuse regexes whose matching could backtrack catastrophically (e.g. `(.*.*)*Z` on a 30-character module
    path runs for hours), before any is matched; InvalidArgument listing each."""
    if not isinstance(spec, LoraSpec):
        return
    fields = {"target_modules": spec.target_modules, "exclude_modules": spec.exclude_modules}
    patterns = [(name, value) for name, value in fields.items() if isinstance(value, str) and value != ALL_LINEAR]
    patterns += [(f"{name} key", key) for name in ("rank_pattern", "alpha_pattern") for key in getattr(spec, name)]
    reasons, total = [], 0
    for name, pattern in patterns:
        risk, repeats = _backtracking_risk(pattern)
        total += repeats
        if risk:
            reasons.append(f"{name} regex {pattern!r} {risk}")
    if total > MAX_TOTAL_REPEATS:
        reasons.append(f"the regexes hold {total} repeats in all, over {MAX_TOTAL_REPEATS}: matching could backtrack")
    if reasons:
        raise InvalidArgument(CONFIG_FILE, "; ".join(capped_reasons(reasons)))


def _backtracking_risk(pattern: str) -> tuple[str, int]:
    """Why matching `pattern` could backtrack for ever ("" if it cannot), and how many repeats it holds.

    Exponential: a repeat inside a repeat, or an alternation inside a repeat. Polynomial, bounded by
    MAX_PATTERN_REPEATS: repeats one after another.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"is longer than {MAX_PATTERN_CHARS} characters", 0
    try:
        pending = [(_sre.parse(pattern), False)]
    except (re.error, RecursionError, OverflowError) as e:
        return f"is not a valid regex: {e}", 0
    repeats = 0
    while pending:
        items, under_repeat = pending.pop()
        for op, av in items:
            repeated = op in _REPEATS and av[1] > 1
            if under_repeat and (repeated or op == _sre.BRANCH):
                return "repeats a repeat or an alternation, so matching can backtrack for ever", repeats
            repeats += repeated
            pending += [(child, under_repeat or repeated) for child in _subpatterns(av)]
    if repeats > MAX_PATTERN_REPEATS:
        return f"has {repeats} repeats, over {MAX_PATTERN_REPEATS}: matching can backtrack for a long time", repeats
    return "", repeats


def _subpatterns(av: Any) -> Iterator[Any]:
    """The parsed sub-expressions inside one parse node's argument (nested in tuples and lists)."""
    if isinstance(av, _sre.SubPattern):
        yield av
    elif isinstance(av, tuple | list):
        yield from (sub for item in av for sub in _subpatterns(item))


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
