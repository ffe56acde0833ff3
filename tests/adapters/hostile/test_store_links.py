"""Symbolic links planted inside a local store, pointing at a complete, valid adapter version outside it: neither
registration nor the serving-side reads (store.get, then the engine's `load_host_adapter`) may follow one out.

A planted link needs write access to the store directory, so it is a defence in depth: the store is the
operator's, but an adapter must never be served from, nor a version written to, a place the store does not own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quiver.adapters.base_spec import BaseModelSpec
from quiver.adapters.names import parse_ref
from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
from quiver.adapters.store import LocalAdapterStore, StoredAdapter
from quiver.adapters.validation import ValidationLimits
from quiver.common.errors import DataLoss, InvalidArgument, NotFound, QuiverError
from quiver.server.engine.adapter_tiers import load_host_adapter

from ..adapter_factory import make_prompt_tuning
from .conftest import tree_snapshot, watch_opens
from .corpus import METADATA, WEIGHTS, Workshop


@pytest.fixture
def elsewhere(tmp_path: Path, base_dir: Path, base: BaseModelSpec) -> StoredAdapter:
    """A complete version of "evil" (a soft prompt unlike the pristine one) in a store outside the served one."""
    outside = AdapterRegistry(LocalAdapterStore(tmp_path / "elsewhere"), base, ValidationLimits())
    return outside.register(make_prompt_tuning(base_dir, tmp_path / "other", seed=1), RegistrationOptions(name="evil"))


def outside_reads(opened: list[str], outside: Path) -> list[str]:
    return [path for path in opened if Path(os.path.realpath(path)).is_relative_to(outside)]


def test_linked_version_dir_is_not_served(registry: AdapterRegistry, elsewhere: StoredAdapter) -> None:
    store = registry.store
    assert isinstance(store, LocalAdapterStore)
    (store.root / "evil").mkdir()
    os.symlink(elsewhere.path, store.root / "evil" / "1")
    with watch_opens() as opened:
        with pytest.raises(NotFound):
            store.get(parse_ref("evil"))
        with pytest.raises(InvalidArgument, match="symbolic link"):
            store.get(parse_ref("evil@1"))
        with pytest.raises(NotFound):
            store.versions("evil")
        assert store.list(10) == ([], "")
    assert outside_reads(opened, elsewhere.path.parent.parent) == []


def test_linked_name_dir_is_refused(registry: AdapterRegistry, workshop: Workshop, elsewhere: StoredAdapter) -> None:
    store = registry.store
    assert isinstance(store, LocalAdapterStore)
    os.symlink(elsewhere.path.parent, store.root / "evil")
    outside_before = tree_snapshot(elsewhere.path.parent)
    with pytest.raises(InvalidArgument, match="symbolic link"):
        store.get(parse_ref("evil"))
    with pytest.raises(InvalidArgument, match="symbolic link"):
        registry.register(workshop.pristine["lora"], RegistrationOptions(name="evil", mode="new_version"))
    assert tree_snapshot(elsewhere.path.parent) == outside_before


def test_register_beside_linked_version_dir(registry: AdapterRegistry, workshop: Workshop,
                                            elsewhere: StoredAdapter) -> None:  # fmt: skip
    store = registry.store
    assert isinstance(store, LocalAdapterStore)
    (store.root / "evil").mkdir()
    os.symlink(elsewhere.path, store.root / "evil" / "1")
    outside_before = tree_snapshot(elsewhere.path.parent)
    try:
        stored = registry.register(workshop.pristine["lora"], RegistrationOptions(name="evil", mode="new_version"))
        assert stored.path.parent == store.root / "evil" and not stored.path.is_symlink()
    except QuiverError:
        pass  # refusing is fine too; a raw OSError (INTERNAL) is not
    finally:
        assert tree_snapshot(elsewhere.path.parent) == outside_before
        assert list((store.root / ".staging").iterdir()) == []


def plant_link(path: Path, target: Path) -> None:
    path.unlink()
    os.symlink(target, path)


def test_linked_weights_in_version_dir_are_not_served(registry: AdapterRegistry, elsewhere: StoredAdapter,
                                                      workshop: Workshop) -> None:  # fmt: skip
    """The store writes no links: one among a version's files is refused as corrupt before anything reads
    through it (even a link to identical bytes)."""
    store = registry.store
    stored = registry.register(workshop.pristine["prompt"], RegistrationOptions(name="good"))
    plant_link(stored.path / WEIGHTS, elsewhere.path / WEIGHTS)  # same shapes, other values
    with pytest.raises(DataLoss, match="symbolic link"):
        load_host_adapter(store.get(parse_ref("good")))


def test_linked_metadata_in_version_dir_is_ignored(registry: AdapterRegistry, workshop: Workshop,
                                                   tmp_path: Path) -> None:  # fmt: skip
    store = registry.store
    assert isinstance(store, LocalAdapterStore)
    stored = registry.register(workshop.pristine["prompt"], RegistrationOptions(name="good"))
    copy = tmp_path / "metadata-copy.json"
    copy.write_bytes((stored.path / METADATA).read_bytes())
    plant_link(stored.path / METADATA, copy)
    with pytest.raises(NotFound):
        store.get(parse_ref("good"))
