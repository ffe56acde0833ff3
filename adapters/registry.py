"""Registration: validate a PEFT adapter directory against the base model, then store it with Quiver metadata.

The PEFT files are stored unchanged (an adapter saved by `save_pretrained` registers as is); what Quiver
derives at registration (e.g. the per-layer key/value prefix of a prefix-tuning adapter) is stored beside
them in extra safetensors files, so serving never recomputes it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors.torch import save_file

from quiver.adapters.base_spec import BaseModelSpec, base_spec_from_checkpoint
from quiver.adapters.metadata import (
    METADATA_FILE,
    AdapterMetadata,
    sha256_file,
    utc_now,
    validate_labels,
    validate_prompt_template,
)
from quiver.adapters.store import CONFIG_DIGEST, AdapterStore, RegisterMode, StoredAdapter
from quiver.adapters.validation import ValidatedAdapter, ValidationLimits, check_upload, validate_adapter
from quiver.common.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class RegistrationOptions:
    """How to register one adapter."""

    name: str
    """Name to store it under (validated by the store)."""
    mode: RegisterMode = "create"
    """What to do when the name exists: fail, add a version, or add a version and drop the older ones."""
    description: str = ""
    """Free text kept with the adapter."""
    prompt_template: str | None = None
    """Hard prompt with one `{input}`; overrides the one in the adapter's own Quiver metadata."""
    labels: tuple[str, ...] | None = None
    """A classification adapter's class names by head output; overrides its own Quiver metadata's. Without either,
    transformers' defaults (LABEL_0, LABEL_1, ...)."""


def _labels(options: RegistrationOptions, own: dict[str, object]) -> tuple[str, ...] | None:
    """The labels the registration gives, else the adapter's own metadata's, validated; None when neither has."""
    if options.labels is not None:
        return validate_labels(options.labels, "options.labels")
    shipped = own.get("labels")
    if shipped is None or shipped == []:  # a stored version's metadata says [] for a generation adapter
        return None
    if not isinstance(shipped, list):
        raise InvalidArgument(METADATA_FILE, "labels must be a list of strings")
    return validate_labels(shipped, f"{METADATA_FILE}: labels")


def _own_metadata(source_dir: Path) -> dict[str, object]:
    """Quiver metadata shipped with the adapter (by `quiver train`), if any: a hint, never trusted for sizes."""
    path = source_dir / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nesting too deep for the parser
        raise InvalidArgument(METADATA_FILE, f"not valid JSON: {e}") from e
    if not isinstance(loaded, dict):
        raise InvalidArgument(METADATA_FILE, "must hold a JSON object")
    return loaded


class AdapterRegistry:
    """Validates and stores adapters for one base model."""

    def __init__(self, store: AdapterStore, base: BaseModelSpec, limits: ValidationLimits) -> None:
        self.store = store
        self.base = base
        self.limits = limits

    def register(self, source_dir: Path, options: RegistrationOptions) -> StoredAdapter:
        """Validate `source_dir` (every problem reported at once) and store it as a new version."""
        check_upload(source_dir, self.limits)  # file kinds, links and sizes, before any file is read
        own = _own_metadata(source_dir)
        template = options.prompt_template
        if template is None and isinstance(own.get("prompt_template"), str):
            template = str(own["prompt_template"])
        if template is not None:
            validate_prompt_template(template)
        claimed = own.get("base_fingerprint")
        labels = _labels(options, own)
        validated = validate_adapter(
            source_dir, self.base, self.limits,
            base_fingerprint_of_adapter=claimed if isinstance(claimed, str) else None, labels=labels,
        )
        if validated.num_labels is None and labels is not None:
            raise InvalidArgument("options.labels", "labels are for a classification (SEQ_CLS) adapter")
        if validated.num_labels is not None and labels is None:
            labels = tuple(f"LABEL_{i}" for i in range(validated.num_labels))
        with tempfile.TemporaryDirectory(prefix="quiver-derived-") as tmp:
            files = {CONFIG_FILE: source_dir / CONFIG_FILE, WEIGHTS_FILE: source_dir / WEIGHTS_FILE}
            for file_name, tensors in validated.extra_files.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / file_name))
                files[file_name] = Path(tmp) / file_name
            size = sum(p.stat().st_size for p in files.values())
            digest = sha256_file(files[WEIGHTS_FILE])
            config_digest = sha256_file(files[CONFIG_FILE])
            created = utc_now()

            def make_metadata(version: int) -> AdapterMetadata:
                metadata = self._metadata(options, version, validated, size, digest, created, template)
                return replace(metadata, extra={CONFIG_DIGEST: config_digest}, labels=labels or (),
                               chat_template=own.get("chat_template") is True)

            return self.store.put(options.name, files, make_metadata, options.mode)

    def _metadata(
        self, options: RegistrationOptions, version: int, validated: ValidatedAdapter,
        size: int, digest: str, created: str, template: str | None,
    ) -> AdapterMetadata:
        return AdapterMetadata(
            name=options.name,
            version=version,
            kind=validated.kind,
            peft_type=validated.peft_type,
            base_fingerprint=self.base.fingerprint,
            base_architecture=self.base.architecture,
            size_bytes=size,
            num_parameters=validated.num_parameters,
            rank=validated.rank,
            num_virtual_tokens=validated.num_virtual_tokens,
            target_modules=validated.target_modules,
            sha256=digest,
            created_at=created,
            description=options.description,
            prompt_template=template,
        )


def open_registry(store: str | None, model: str | None, limits: ValidationLimits | None = None) -> AdapterRegistry:
    """A registry over a store (a directory or s3://bucket/prefix) for the given base model, without loading the
    model's weights."""
    from quiver.adapters.stores import StoreOptions, open_store
    from quiver.common.model_source import default_cache_dir, resolve_checkpoint

    checkpoint = resolve_checkpoint(model, default_cache_dir())
    return AdapterRegistry(open_store(StoreOptions(store)), base_spec_from_checkpoint(checkpoint),
                           limits or ValidationLimits())
