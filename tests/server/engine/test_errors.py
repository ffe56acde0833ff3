"""Domain errors survive a trip between processes (Ray Serve's replicas raise them in the ingress), and a host
load cancelled by a waiter that gave up does not poison the adapter."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest

from quiver.common import errors
from quiver.server.engine.adapter_tiers import HostAdapter, HostAdapterCache


def _all(cls: type[errors.QuiverError]) -> list[type[errors.QuiverError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _all(child))]


@pytest.mark.parametrize("cls", _all(errors.QuiverError), ids=lambda c: c.__name__)
def test_every_domain_error_pickles_whole(cls: type[errors.QuiverError]):
    error: errors.QuiverError
    if issubclass(cls, errors.InvalidArgument):
        error = cls("messages[0].role", "is wrong")
    else:
        error = cls("went wrong", reasons=["one", "two"])
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls and copy.message == error.message and str(copy) == str(error)
    assert copy.__dict__ == error.__dict__


def test_a_cancelled_queued_load_is_loaded_again(tmp_path: Path):
    release = threading.Event()
    loaded: list[str] = []

    def loader(stored: Any) -> HostAdapter:
        if stored.metadata.name == "slow":
            release.wait(10)
        loaded.append(stored.metadata.name)
        return HostAdapter(key=None, kind="lora", tensors={}, scalings={}, rank=1, nbytes=1)  # type: ignore[arg-type]

    cache = HostAdapterCache(1 << 20, loader=loader)
    slow, queued = _stored("slow"), _stored("queued")
    try:
        cache.fetch(slow)  # occupies the single loader thread
        first = cache.fetch(queued)
        assert first.cancel()  # its only waiter went away while it was still queued
        release.set()
        again = cache.fetch(queued)
        assert again is not first and again.result(timeout=10) is not None and "queued" in loaded
        with pytest.raises(CancelledError):
            first.result()
    finally:
        release.set()
        cache.close()


def _stored(name: str) -> Any:
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Meta:
        name: str
        version: int = 1
        sha256: str = "0" * 64
        created_at: str = "now"
        extra: dict[str, str] = field(default_factory=dict)

    @dataclass(frozen=True)
    class Stored:
        metadata: Meta

    return Stored(Meta(name))
