"""What the engine tells health and metrics: its forwards and queue waits as they happen, a stall while work
waits, and its death, after which nothing hangs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from quiver.common.errors import Unavailable
from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.observer import EngineObserver, Phase, Tier

from .test_engine import Collector, request


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.forwards: list[tuple[Phase, float, int, int]] = []
        self.waits: list[float] = []
        self.loads: list[tuple[Tier, float]] = []

    def forward(self, phase: Phase, seconds: float, rows: int, tokens: int) -> None:
        self.forwards.append((phase, seconds, rows, tokens))

    def queued(self, seconds: float) -> None:
        self.waits.append(seconds)

    def adapter_loaded(self, tier: Tier, seconds: float) -> None:
        self.loads.append((tier, seconds))


@pytest.fixture
def observed(tiny_model: Any, text_tokenizer: Any) -> Iterator[tuple[Engine, Recorder]]:
    recorder = Recorder()
    eng = Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig(max_prefill_tokens=16), recorder)
    eng.start()
    yield eng, recorder
    eng.stop()


def test_forwards_and_queue_waits_are_reported_with_rows_and_positions(observed: tuple[Engine, Recorder],
                                                                       text_tokenizer: Any):
    engine, recorder = observed
    short = request(text_tokenizer, "The quick brown fox", max_new_tokens=5)
    long = request(text_tokenizer, " ".join(["word"] * 40), max_new_tokens=3)  # chunked: over 16 positions
    sinks = [Collector(), Collector()]
    engine.submit(short, sinks[0])
    engine.submit(long, sinks[1])
    events = [sink.wait()[1] for sink in sinks]
    assert len(recorder.waits) == 2 and all(w >= 0 for w in recorder.waits)
    # The first event of each request carries its queue wait; later ones do not.
    for evs in events:
        assert evs[0].queue_seconds is not None and all(e.queue_seconds is None for e in evs[1:])
    prefills = [f for f in recorder.forwards if f[0] is Phase.PREFILL]
    decodes = [f for f in recorder.forwards if f[0] is Phase.DECODE]
    assert sum(tokens for *_, tokens in prefills) == len(short.prompt_ids) + len(long.prompt_ids)
    assert all(tokens <= 16 for *_, tokens in prefills) and len(prefills) >= 4  # the long prompt took chunks
    # Every generated token after each request's first came from a decode forward of that many rows.
    assert sum(rows for _, _, rows, _ in decodes) == (5 - 1) + (3 - 1)
    assert all(rows == tokens and seconds > 0 for _, seconds, rows, tokens in decodes)


def test_a_stalled_step_shows_while_work_waits_and_clears_when_steps_resume(
        observed: tuple[Engine, Recorder], text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch):
    engine, _ = observed
    assert engine.stalled_seconds() == 0  # idle: nothing waits, nothing is stalled
    release = threading.Event()
    run = engine._runner.run

    def stuck(*args: Any) -> Any:
        release.wait(timeout=30)
        return run(*args)

    monkeypatch.setattr(engine._runner, "run", stuck)
    sink = Collector()
    engine.submit(request(text_tokenizer, "The quick brown fox", max_new_tokens=3), sink)
    time.sleep(0.5)
    assert engine.stalled_seconds() >= 0.4
    release.set()
    assert sink.wait()[1][-1].finish_reason is not None
    assert engine.stalled_seconds() < 0.4  # steps end again (the row's retiring step may be under way)


def test_a_dead_engine_thread_fails_running_and_waiting_work_and_refuses_more(
        tiny_model: Any, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch):
    engine = Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig(max_running=1))
    engine.start()
    try:
        running, waiting = Collector(), Collector()
        engine.submit(request(text_tokenizer, "The quick brown fox", max_new_tokens=200), running)
        running.events.get(timeout=30)  # it runs
        engine.submit(request(text_tokenizer, "Once upon a time", max_new_tokens=5), waiting)

        def broken(*args: Any) -> Any:  # a bug outside any forward: the engine loop itself fails
            raise RuntimeError("scheduler bug")

        monkeypatch.setattr(engine._scheduler, "plan", broken)
        for sink in (running, waiting):
            events = sink.wait(timeout=10)[1]
            assert isinstance(events[-1].error, Unavailable), events[-1]
        engine._thread.join(timeout=10)
        assert not engine.alive and isinstance(engine.failure, RuntimeError)
        with pytest.raises(Unavailable, match="internal error"):
            engine.submit(request(text_tokenizer, "more", max_new_tokens=2), Collector())
    finally:
        engine.stop()
