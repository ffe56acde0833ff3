"""Admission order: a request whose adapter failed to load gets its error at once, whatever waits before it."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from quiver.server.engine.admission import AdmissionQueue


class _FailingHost:
    """A host tier whose every load fails."""

    def fetch(self, stored: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_exception(RuntimeError("load failed"))
        return future


class _RoomyDevice:
    def has_room(self, stored: Any) -> bool:
        return True

    def acquire(self, host: Any) -> object:
        return object()


def _scheduler() -> AdmissionQueue[str]:
    return AdmissionQueue(_FailingHost(), _RoomyDevice())  # type: ignore[arg-type]


def test_a_failed_adapter_is_not_held_behind_a_request_that_does_not_fit():
    scheduler = _scheduler()
    scheduler.add("long", None)  # the oldest: does not fit the cache budget yet
    scheduler.add("broken", object())  # type: ignore[arg-type]
    scheduler.add("short", None)
    out = scheduler.admit(8, lambda item, admitted: item != "long")
    assert [(e.item, str(e.error)) for e in out] == [("broken", "load failed")]
    assert [e.item for e in scheduler] == ["long", "short"]  # the short one still waits behind the long one


def test_a_failed_adapter_that_would_not_fit_neither_waits_nor_holds_others_back():
    scheduler = _scheduler()
    scheduler.add("broken", object())  # type: ignore[arg-type]
    scheduler.add("next", None)
    seen: list[list[str]] = []

    def fits(item: str, admitted: list[str]) -> bool:
        seen.append(admitted)
        return item != "broken"

    out = scheduler.admit(8, fits)
    assert [e.item for e in out] == ["broken", "next"] and out[0].error is not None and out[1].error is None
    assert seen == [[]]  # asked only for "next", with the failed one not counted as starting
