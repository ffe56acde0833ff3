"""Admission of waiting requests: iteration-level scheduling (Orca) with adapter-aware, starvation-free order.

A request may start when there is room in the batch and its adapter is resident on the device. Cold adapters
load in the background meanwhile, so requests whose adapters are ready overtake requests whose adapters are
still loading. Device residency is granted strictly in arrival order: once the oldest request that needs a
new residency cannot get one (every slot is pinned by running sequences), no later request that names an
adapter may start (it would take a slot or keep one pinned); base-only requests still do. The blocked
request therefore gets the first slot that frees up and cannot starve. The key/value cache budget
(server/engine/cache_budget.py) holds back every later request the same way once the oldest one does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from quiver.adapters.store import StoredAdapter
from quiver.server.engine.adapter_tiers import DeviceAdapter, DeviceAdapters, HostAdapter, HostAdapterCache

T = TypeVar("T")
# fits(item, items admitted so far in this call) -> whether item may join the batch too.
Fits = Callable[[T, list[T]], bool]


@dataclass(eq=False)
class Waiting(Generic[T]):
    """A request waiting to start, and the state of its adapter."""

    item: T
    stored: StoredAdapter | None
    host: Future[HostAdapter] | None = None
    device: DeviceAdapter | None = None
    error: BaseException | None = field(default=None)


class AdmissionQueue(Generic[T]):
    """Holds waiting requests in arrival order and yields the ones that can start now."""

    def __init__(self, host: HostAdapterCache, device: DeviceAdapters) -> None:
        self._host = host
        self._device = device
        self._waiting: list[Waiting[T]] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, item: T, stored: StoredAdapter | None) -> None:
        entry = Waiting(item, stored)
        if stored is not None:
            entry.host = self._host.fetch(stored)  # starts a cold load at once
        self._waiting.append(entry)

    def drop(self, is_dead: Callable[[T], bool]) -> list[Waiting[T]]:
        """Remove waiting requests that were cancelled; returns them."""
        dead = [w for w in self._waiting if is_dead(w.item)]
        self._waiting = [w for w in self._waiting if not is_dead(w.item)]
        return dead

    def admit(self, room: int, fits: Fits[T] = lambda item, admitted: True) -> list[Waiting[T]]:
        """Up to `room` requests that can start now (adapter pinned on the device), and every request whose
        adapter failed to load.

        `fits(item, admitted)` says whether `item` may join the batch besides the `admitted` items of this call
        (the key/value cache budget); once one does not, no later request starts, so it cannot starve."""
        blocked = False  # an older request is waiting for a device residency
        full = False  # an older request does not fit the cache budget
        kept: list[Waiting[T]] = []
        admitted: list[Waiting[T]] = []
        for entry in self._waiting:
            if self._failed(entry):  # never runs: its error goes out at once, whatever waits before it
                admitted.append(entry)
                continue
            held = full or (blocked and entry.stored is not None)
            starting = [a.item for a in admitted if a.error is None]
            if len(starting) < room and not held:
                if not fits(entry.item, starting):
                    full = True
                elif self._ready(entry):
                    admitted.append(entry)
                    continue
            if entry.stored is not None and entry.error is None and not self._device.has_room(entry.stored):
                blocked = True
            kept.append(entry)
        self._waiting = kept
        return admitted

    @staticmethod
    def _failed(entry: Waiting[T]) -> bool:
        """Whether the adapter of `entry` failed to load (its error is then set)."""
        if entry.error is None and entry.host is not None and entry.host.done():
            entry.error = entry.host.exception()
        return entry.error is not None

    def _ready(self, entry: Waiting[T]) -> bool:
        if entry.stored is None:
            return True
        assert entry.host is not None
        if not entry.host.done():
            return False
        host = entry.host.result()  # a failed load was taken by _failed
        try:
            entry.device = self._device.acquire(host)
        except Exception as e:  # e.g. an adapter larger than the whole device budget
            entry.error = e
            return True
        return entry.device is not None

    def __iter__(self) -> Iterator[Waiting[T]]:
        return iter(self._waiting)

    def take_all(self) -> list[Waiting[T]]:
        taken, self._waiting = self._waiting, []
        return taken
