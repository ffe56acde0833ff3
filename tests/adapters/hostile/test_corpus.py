"""Every hostile adapter in the corpus goes through the real registration path (AdapterRegistry over a local
store) and must be refused with the exact error class and a message naming the problem, quickly, without running
anything (the armed pickles' marker never appears), without opening the refused pickles or anything outside the
adapter, and leaving the store byte for byte as it was. Path-like config fields that are only metadata are
accepted but never resolved."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
from quiver.adapters.safetensors_check import PICKLE_SUFFIXES

from .conftest import tree_snapshot, watch_opens
from .corpus import CASES, CONFIG, PATH_FIELDS, ArmedPayload, HostileCase, Workshop

PATH_FIELD_IDS = [f"{kind}-{field}-{i}" for i, (kind, field, _) in enumerate(PATH_FIELDS)]
MAX_MESSAGE_CHARS = 8192
"""An error message travels as a gRPC status message (trailing metadata, 8 KiB by default): it must stay small
whatever the attacker put in the adapter."""


def forbidden_reads(opened: list[str], ws: Workshop) -> list[str]:
    """Opened paths that are a pickle, or that lie outside the adapter (the canaries, /etc/passwd)."""
    bad = []
    for raw in opened:
        real = Path(os.path.realpath(raw))
        if real.suffix.lower() in PICKLE_SUFFIXES or real.is_relative_to(ws.outside) or str(real) == "/etc/passwd":
            bad.append(raw)
    return bad


@pytest.mark.parametrize(
    "save", [lambda p, m: p.write_bytes(pickle.dumps(ArmedPayload(m))), lambda p, m: torch.save(ArmedPayload(m), p)],
    ids=["pickle", "torch-save"],
)
def test_payloads_are_armed(tmp_path: Path, save: Callable[[Path, Path], None]) -> None:
    """The payloads do run when a loader unpickles them, so the marker's absence below means something."""
    marker = tmp_path / "pwned"
    save(tmp_path / "payload", marker)
    if (tmp_path / "payload").read_bytes().startswith(b"PK"):
        torch.load(tmp_path / "payload", weights_only=False)
    else:
        pickle.loads((tmp_path / "payload").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_pristine_adapters_register(registry: AdapterRegistry, workshop: Workshop, kind: str) -> None:
    """The adapters the cases start from are accepted, so each refusal is due to the case's one change."""
    stored = registry.register(workshop.pristine[kind], RegistrationOptions(name=kind))
    assert stored.metadata.version == 1


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_adapter_refused(registry: AdapterRegistry, workshop: Workshop, tmp_path: Path,
                                 case: HostileCase) -> None:  # fmt: skip
    adapter = tmp_path / "adapter"
    case.build(workshop, adapter)
    store_before, outside_before = tree_snapshot(registry.store.root), tree_snapshot(workshop.outside)
    start = time.monotonic()
    with watch_opens() as opened, pytest.raises(case.error) as info:
        registry.register(adapter, RegistrationOptions(name="hostile"))
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert type(info.value) is case.error, message
    assert [word for word in case.named if word not in message] == [], message[:2000]
    assert len(message) <= MAX_MESSAGE_CHARS
    assert elapsed < case.max_seconds
    assert not workshop.marker.exists()
    assert forbidden_reads(opened, workshop) == []
    assert tree_snapshot(registry.store.root) == store_before  # no version, no staging debris
    assert tree_snapshot(workshop.outside) == outside_before


@pytest.mark.parametrize(
    ("kind", "field", "value"), PATH_FIELDS, ids=PATH_FIELD_IDS
)
def test_path_fields_are_never_resolved(registry: AdapterRegistry, workshop: Workshop, tmp_path: Path, kind: str,
                                        field: str, value: Callable[[Workshop], str]) -> None:  # fmt: skip
    """A path in a metadata-only field is PEFT's record of where the base or tokenizer was (often an absolute path
    on the trainer's machine), so refusing it would refuse real adapters; Quiver never opens what it names."""
    adapter = Path(shutil.copytree(workshop.pristine[kind], tmp_path / "adapter"))
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, field: value(workshop)}))
    with watch_opens() as opened:
        stored = registry.register(adapter, RegistrationOptions(name="paths"))
    assert stored.metadata.version == 1
    assert forbidden_reads(opened, workshop) == []


@pytest.mark.parametrize(
    "pattern",
    [r".*\.(q_proj|v_proj)", r"^(?!.*vision).*\.(q_proj|v_proj)$", r"model\.layers\.\d+\.self_attn\.(q|v)_proj"],
)
def test_ordinary_regexes_still_register(registry: AdapterRegistry, workshop: Workshop, tmp_path: Path,
                                         pattern: str) -> None:  # fmt: skip
    """The backtracking guard refuses hostile regexes, not the ones people write for target_modules."""
    adapter = Path(shutil.copytree(workshop.pristine["lora"], tmp_path / "adapter"))
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, "target_modules": pattern}))
    assert registry.register(adapter, RegistrationOptions(name="regex")).metadata.target_modules == ("q_proj", "v_proj")
