"""Labels at registration: a stored version's own metadata (labels [] for a generation adapter) registers again
unchanged, as it did before classifiers existed; a classifier's stored labels come along."""

from __future__ import annotations

from pathlib import Path

import pytest

from quiver.adapters.base_spec import base_spec_from_checkpoint
from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
from quiver.adapters.store import LocalAdapterStore
from quiver.adapters.validation import ValidationLimits

from ..conftest import write_tiny_checkpoint
from .adapter_factory import make_classifier, make_lora


@pytest.fixture
def registry(tmp_path: Path) -> tuple[AdapterRegistry, Path]:
    base = write_tiny_checkpoint(tmp_path / "tiny")
    return AdapterRegistry(LocalAdapterStore(tmp_path / "store"), base_spec_from_checkpoint(base),
                           ValidationLimits()), base


def test_a_stored_version_registers_again_with_its_labels(registry: tuple[AdapterRegistry, Path], tmp_path: Path):
    reg, base = registry
    lora = reg.register(make_lora(base, tmp_path / "lora", r=2, seed=1), RegistrationOptions("gen"))
    assert lora.metadata.labels == () and '"labels": []' in (lora.path / "quiver_adapter.json").read_text()
    again = reg.register(lora.path, RegistrationOptions("gen-copy"))  # its own metadata says labels []
    assert again.metadata.labels == () and again.metadata.task == "generate"
    classifier = reg.register(make_classifier(base, tmp_path / "cls", "lora", num_labels=2),
                              RegistrationOptions("cls", labels=("no", "yes")))
    copied = reg.register(classifier.path, RegistrationOptions("cls-copy"))
    assert copied.metadata.labels == ("no", "yes") and copied.metadata.task == "classify"
