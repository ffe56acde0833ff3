"""Fixtures for the hostile corpus: a tiny base, pristine adapters to break, a fresh store per test, and two
observers: a byte-level snapshot of a directory tree (the store must not change when it refuses) and a record of
every file Python opens (refused files must stay unopened; nothing outside the adapter may be read).

The open record comes from a `sys.addaudithook` hook (PEP 578): the "open" event fires for builtins.open,
io.open and os.open, so it sees every Python-level read, whichever library does it. Native code that opens files
itself (the safetensors library's Rust loader) raises no event; tests that need to know about those reads check
the results instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from quiver.adapters.base_spec import BaseModelSpec, base_spec_from_checkpoint
from quiver.adapters.registry import AdapterRegistry
from quiver.adapters.store import LocalAdapterStore
from quiver.adapters.validation import ValidationLimits

from ...conftest import write_tiny_checkpoint
from ..adapter_factory import make_lora, make_prompt_tuning
from .corpus import Workshop

Snapshot = dict[str, tuple[str, bytes]]

_recording: list[list[str]] = []  # the open-records of the `watch_opens` blocks in progress
_hook_installed = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _recording or event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
        return
    path = os.fsdecode(args[0])
    for record in _recording:
        record.append(path)


@contextmanager
def watch_opens() -> Iterator[list[str]]:
    """The paths Python opens inside the block, as they were passed to open (absolute or relative)."""
    global _hook_installed
    if not _hook_installed:  # audit hooks cannot be removed: one per process, idle outside a block
        sys.addaudithook(_audit)
        _hook_installed = True
    record: list[str] = []
    _recording.append(record)
    try:
        yield record
    finally:
        _recording.remove(record)


def tree_snapshot(root: Path) -> Snapshot:
    """Every entry under `root` (links not followed) -> (kind, content): file bytes, a link's target, or b""."""
    snapshot: Snapshot = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            if path.is_symlink():
                snapshot[relative] = ("link", os.fsencode(os.readlink(path)))
            elif path.is_dir():
                snapshot[relative] = ("dir", b"")
            else:
                snapshot[relative] = ("file", path.read_bytes())
    return snapshot


@pytest.fixture(scope="package")
def hostile_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="package")
def base_dir(hostile_work: Path) -> Path:
    return write_tiny_checkpoint(hostile_work / "tiny", tokenizer=False)


@pytest.fixture(scope="package")
def base(base_dir: Path) -> BaseModelSpec:
    return base_spec_from_checkpoint(base_dir)


@pytest.fixture(scope="package")
def workshop(base_dir: Path, hostile_work: Path) -> Workshop:
    """Pristine adapters (built once) and an outside directory holding canaries a hostile adapter may point at."""
    pristine = {
        "lora": make_lora(base_dir, hostile_work / "pristine-lora", r=8),
        "prompt": make_prompt_tuning(base_dir, hostile_work / "pristine-prompt"),
    }
    outside = hostile_work / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes((pristine["lora"] / "adapter_model.safetensors").read_bytes())
    (outside / "secret.json").write_bytes((pristine["lora"] / "adapter_config.json").read_bytes())
    return Workshop(pristine=pristine, outside=outside, marker=hostile_work / "pwned")


@pytest.fixture
def registry(tmp_path: Path, base: BaseModelSpec) -> AdapterRegistry:
    """The real registration path over a fresh local store."""
    return AdapterRegistry(LocalAdapterStore(tmp_path / "store"), base, ValidationLimits())
