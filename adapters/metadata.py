"""Quiver's own description of a stored adapter, kept beside PEFT's files as `quiver_adapter.json`.

PEFT's adapter_config.json says how to build the adapter; this file records what Quiver checked and needs at
serving time without opening the weights: which base model it was validated against (fingerprint), its
size, the digest of its weights, and an optional hard prompt template. The JSON form is strict (unknown keys,
missing keys and wrong types are errors) and carries a schema version, so a file written by a newer Quiver
is refused rather than half-understood.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from quiver.adapters.names import MAX_VERSION, validate_name
from quiver.common.errors import InvalidArgument

METADATA_FILE = "quiver_adapter.json"
SCHEMA_VERSION = 1

AdapterKind = Literal["lora", "prompt_tuning", "prefix_tuning"]
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)

MAX_DESCRIPTION_CHARS = 4096
MAX_TEMPLATE_CHARS = 65536
MAX_EXTRA_ENTRIES = 64
MAX_EXTRA_KEY_CHARS = 128
MAX_EXTRA_VALUE_CHARS = 1024
MAX_LABELS = 1024
MAX_LABEL_CHARS = 128

AdapterTask = Literal["generate", "classify"]

_SHA256_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class _KindShape:
    """Which size fields an adapter kind uses; the others must be unset."""

    uses_rank: bool
    uses_virtual_tokens: bool


_KIND_SHAPES: dict[str, _KindShape] = {
    "lora": _KindShape(uses_rank=True, uses_virtual_tokens=False),
    "prompt_tuning": _KindShape(uses_rank=False, uses_virtual_tokens=True),
    "prefix_tuning": _KindShape(uses_rank=False, uses_virtual_tokens=True),
}


@dataclass(frozen=True)
class AdapterMetadata:
    """One stored adapter version, as recorded in `quiver_adapter.json`. Invalid values raise InvalidArgument."""

    name: str
    """Adapter name (see quiver.adapters.names)."""
    version: int
    """Version number, 1 for the first one; chosen by the store."""
    kind: AdapterKind
    """Which adapter method the weights implement."""
    peft_type: str
    """`peft_type` as written in adapter_config.json, e.g. "LORA" or "PROMPT_TUNING"."""
    base_fingerprint: str
    """Fingerprint of the base model the adapter was validated against (quiver.common.fingerprint)."""
    base_architecture: str
    """The base model's architecture class, e.g. "LlamaForCausalLM", for error messages."""
    size_bytes: int
    """Total bytes of the adapter's files in the version directory, not counting this metadata file."""
    num_parameters: int
    """Number of trainable parameters (elements over all tensors) in the adapter weights."""
    rank: int | None
    """LoRA rank r; None for soft prompts and prefixes."""
    num_virtual_tokens: int | None
    """Length of a soft prompt or prefix in tokens; None for LoRA."""
    target_modules: tuple[str, ...]
    """Module names LoRA adapts (e.g. ("q_proj", "v_proj")); empty for soft prompts and prefixes."""
    sha256: str
    """Lowercase hex SHA-256 of adapter_model.safetensors."""
    created_at: str
    """When this version was stored, ISO-8601 in UTC (see `utc_now`)."""
    description: str = ""
    """Free text from the client."""
    prompt_template: str | None = None
    """Hard prompt the server wraps around each request's text: `{input}` exactly once, `{{`/`}}` for braces."""
    extra: dict[str, str] = field(default_factory=dict, hash=False)
    """Free-form string labels from the client."""
    labels: tuple[str, ...] = ()
    """A classification adapter's class names, by the head's output index (its `id2label`); empty for the others:
    labels are what make an adapter a classifier (`task`)."""
    chat_template: bool = False
    """Trained through the base's chat template: a plain text request is served as one user turn of a chat, its
    text wrapped in `prompt_template` inside that turn, so it is rendered as the trainer rendered its prompts."""

    def __post_init__(self) -> None:
        # Copies, so a caller mutating its own list or dict cannot change a frozen record.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "extra", dict(self.extra))
        for check in _CHECKS:
            check(self)

    @property
    def task(self) -> AdapterTask:
        """What the adapter's rows produce: tokens, or each label's probability."""
        return "classify" if self.labels else "generate"

    def apply_template(self, text: str) -> str:
        """The request text wrapped in this adapter's prompt template, or unchanged when there is none."""
        return text if self.prompt_template is None else self.prompt_template.format(input=text)

    def to_json(self) -> str:
        """The metadata file's content: sorted keys, indented, with the schema version."""
        document: dict[str, Any] = asdict(self)
        document["target_modules"] = list(self.target_modules)
        document["labels"] = list(self.labels)
        document["schema_version"] = SCHEMA_VERSION
        return json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> AdapterMetadata:
        """Parse a metadata file; any deviation from the schema raises ValueError listing every problem."""
        return metadata_from_json(text)


def validate_labels(labels: Sequence[str], field_name: str = "labels") -> tuple[str, ...]:
    """`labels` if they are distinct non-empty names of at most MAX_LABEL_CHARS, at most MAX_LABELS of them."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field_name, f"at most {MAX_LABELS} labels, got {len(labels)}")
    for i, label in enumerate(labels):
        if not isinstance(label, str) or not label or len(label) > MAX_LABEL_CHARS or not label.isprintable():
            raise InvalidArgument(f"{field_name}[{i}]", f"must be 1-{MAX_LABEL_CHARS} printable characters")
    if len(set(labels)) != len(labels):
        raise InvalidArgument(field_name, "must be distinct")
    return tuple(labels)


def validate_prompt_template(template: str) -> str:
    """Return `template` if it is a str.format template with `{input}` exactly once and nothing else to fill."""
    if not isinstance(template, str):
        raise InvalidArgument("prompt_template", f"expected a string, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidArgument("prompt_template", f"longer than {MAX_TEMPLATE_CHARS} characters")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # a lone "{" or "}"
        raise InvalidArgument("prompt_template", f"{e}; write literal braces as {{{{ and }}}}") from e
    fields_used = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    bad = [name for name, spec, conv in fields_used if name != "input" or spec or conv]
    if bad:
        raise InvalidArgument(
            "prompt_template", f"only the plain placeholder {{input}} is allowed, found {{{bad[0]}...}}"
        )
    if len(fields_used) != 1:
        raise InvalidArgument("prompt_template", f"must contain {{input}} exactly once, found {len(fields_used)}")
    return template


def utc_now() -> str:
    """The current time as ISO-8601 UTC with second precision, the form `created_at` uses."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    """Lowercase hex SHA-256 of a file, read in 1 MiB chunks so large files never sit in memory whole."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


# --- field checks, run by AdapterMetadata.__post_init__ in order ---------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_identity(m: AdapterMetadata) -> None:
    validate_name(m.name, "name")
    if not _is_int(m.version) or not 1 <= m.version <= MAX_VERSION:
        raise InvalidArgument("version", f"must be an integer in 1..{MAX_VERSION}, got {m.version!r}")
    if m.kind not in _KIND_SHAPES:
        raise InvalidArgument("kind", f"must be one of {', '.join(ADAPTER_KINDS)}, got {m.kind!r}")
    for name in ("peft_type", "base_fingerprint", "base_architecture"):
        value = getattr(m, name)
        if not isinstance(value, str) or not value or len(value) > 256:
            raise InvalidArgument(name, f"must be a non-empty string of at most 256 characters, got {value!r}")


def _check_sizes(m: AdapterMetadata) -> None:
    for name in ("size_bytes", "num_parameters"):
        value = getattr(m, name)
        if not _is_int(value) or value < 0:
            raise InvalidArgument(name, f"must be a non-negative integer, got {value!r}")
    shape = _KIND_SHAPES[m.kind]
    for name, used in (("rank", shape.uses_rank), ("num_virtual_tokens", shape.uses_virtual_tokens)):
        value = getattr(m, name)
        if used and (not _is_int(value) or value < 1):
            raise InvalidArgument(name, f"{m.kind} adapters need a positive integer, got {value!r}")
        if not used and value is not None:
            raise InvalidArgument(name, f"must be unset for {m.kind} adapters, got {value!r}")
    if not all(isinstance(t, str) and t for t in m.target_modules):
        raise InvalidArgument("target_modules", "must be non-empty strings")
    if m.target_modules and not shape.uses_rank:
        raise InvalidArgument("target_modules", f"must be empty for {m.kind} adapters")


def _check_provenance(m: AdapterMetadata) -> None:
    if not isinstance(m.sha256, str) or _SHA256_RE.fullmatch(m.sha256) is None:
        raise InvalidArgument("sha256", f"must be 64 lowercase hex digits, got {m.sha256!r}")
    try:
        created = datetime.fromisoformat(m.created_at)
    except (TypeError, ValueError) as e:
        raise InvalidArgument("created_at", f"not an ISO-8601 timestamp: {m.created_at!r}") from e
    if created.utcoffset() != UTC.utcoffset(None):
        raise InvalidArgument("created_at", f"must be in UTC, got {m.created_at!r}")


def _check_client_text(m: AdapterMetadata) -> None:
    if not isinstance(m.description, str) or len(m.description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument("description", f"must be a string of at most {MAX_DESCRIPTION_CHARS} characters")
    if m.prompt_template is not None:
        validate_prompt_template(m.prompt_template)
    if len(m.extra) > MAX_EXTRA_ENTRIES:
        raise InvalidArgument("extra", f"at most {MAX_EXTRA_ENTRIES} labels, got {len(m.extra)}")
    for key, value in m.extra.items():
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_EXTRA_KEY_CHARS:
            raise InvalidArgument("extra", f"label keys must be 1-{MAX_EXTRA_KEY_CHARS} characters, got {key!r}")
        if not isinstance(value, str) or len(value) > MAX_EXTRA_VALUE_CHARS:
            raise InvalidArgument("extra", f"label {key!r} must be a string of at most {MAX_EXTRA_VALUE_CHARS} chars")


def _check_labels(m: AdapterMetadata) -> None:
    validate_labels(m.labels)


_CHECKS: tuple[Callable[[AdapterMetadata], None], ...] = (
    _check_identity,
    _check_sizes,
    _check_provenance,
    _check_client_text,
    _check_labels,
)


# --- strict JSON parsing -------------------------------------------------------------------------------------


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_str_dict(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


# The JSON type of every AdapterMetadata field (tests check this covers exactly the dataclass's fields).
JSON_TYPES: dict[str, Callable[[object], bool]] = {
    "name": _is_str,
    "version": _is_int,
    "kind": _is_str,
    "peft_type": _is_str,
    "base_fingerprint": _is_str,
    "base_architecture": _is_str,
    "size_bytes": _is_int,
    "num_parameters": _is_int,
    "rank": _optional(_is_int),
    "num_virtual_tokens": _optional(_is_int),
    "target_modules": _is_str_list,
    "sha256": _is_str,
    "created_at": _is_str,
    "description": _is_str,
    "prompt_template": _optional(_is_str),
    "extra": _is_str_dict,
    "labels": _is_str_list,
    "chat_template": lambda value: isinstance(value, bool),
}


def metadata_from_json(text: str) -> AdapterMetadata:
    """Parse a metadata file strictly; raise ValueError naming every unknown, missing or mistyped key."""
    document = json.loads(text)  # json.JSONDecodeError is a ValueError
    if not isinstance(document, dict):
        raise ValueError(f"{METADATA_FILE} must hold a JSON object, got {type(document).__name__}")
    schema = document.pop("schema_version", None)
    if not _is_int(schema) or schema != SCHEMA_VERSION:
        raise ValueError(f"{METADATA_FILE}: schema_version must be {SCHEMA_VERSION}, got {schema!r}")
    required = {f.name for f in fields(AdapterMetadata) if f.default is MISSING and f.default_factory is MISSING}
    problems = [f"unknown key {key!r}" for key in sorted(document.keys() - JSON_TYPES.keys())]
    problems += [f"missing key {key!r}" for key in sorted(required - document.keys())]
    problems += [
        f"{key!r} has the wrong type {type(value).__name__}"
        for key, value in sorted(document.items())
        if key in JSON_TYPES and not JSON_TYPES[key](value)
    ]
    if problems:
        raise ValueError(f"{METADATA_FILE}: " + "; ".join(problems))
    document["target_modules"] = tuple(document["target_modules"])
    document["labels"] = tuple(document.get("labels", ()))
    try:
        return AdapterMetadata(**document)
    except InvalidArgument as e:
        raise ValueError(f"{METADATA_FILE}: {e.message}") from e
