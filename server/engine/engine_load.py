"""What the engine is doing, by adapter, for the metrics routers read (server/api/router_metrics.py).

The engine thread owns the batch, the queue and the device tier, so it alone may walk them; it publishes an
immutable `EngineLoad` at most every `PERIOD_S` (and at once when it goes idle), and scrapes on other threads
read the latest one. Walking the queue costs O(waiting) per publication, not per decode step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from quiver.adapters.store import StoredAdapter
from quiver.server.engine.adapter_tiers import AdapterKey

PERIOD_S = 0.1


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter version held in device memory."""

    name: str
    version: int
    kind: str


@dataclass(frozen=True)
class EngineLoad:
    """Adapter names (without versions, as requests name them) of the batch's rows and of waiting requests, and
    the device tier's residents, most recently used first."""

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    resident: tuple[ResidentAdapter, ...] = ()
    cache_reserved_bytes: int = 0  # as `Engine.cache_reserved_bytes`, read with the rows above


def _names(adapters: Iterable[StoredAdapter | None]) -> tuple[str, ...]:
    return tuple(sorted({a.metadata.name for a in adapters if a is not None}))


class LoadPublisher:
    """Engine-thread side: `due` says when `PERIOD_S` has passed since the last snapshot (or it is forced), and
    `publish` replaces it."""

    def __init__(self) -> None:
        self.current = EngineLoad()
        self._due = 0.0

    def due(self, force: bool = False) -> bool:
        """Whether to publish now; checked before the engine walks anything."""
        now = time.monotonic()
        if not force and now < self._due:
            return False
        self._due = now + PERIOD_S
        return True

    def publish(
        self, running: Iterable[StoredAdapter | None], waiting: Iterable[StoredAdapter | None],
        resident: Iterable[tuple[AdapterKey, str]], cache_reserved_bytes: int,
    ) -> None:
        self.current = EngineLoad(
            _names(running), _names(waiting),
            tuple(ResidentAdapter(key.name, key.version, kind) for key, kind in resident), cache_reserved_bytes,
        )
