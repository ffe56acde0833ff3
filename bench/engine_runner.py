"""Drives a Quiver `Engine` in process: start it, submit many requests at once, time them to the last token."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from bench.workload import BenchModel
from quiver.adapters.store import StoredAdapter
from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import GenerationEvent, Sink
from quiver.server.engine.request import GenerationRequest
from quiver.server.engine.sampling import SamplingParams

TIMEOUT_S = 3600.0
# Device budget large enough that only max_lora_slots limits the LoRA slots.
UNLIMITED_DEVICE_BYTES = 2**40


@dataclass(frozen=True)
class Run:
    """Wall time of a batch of requests, from the first submit to the last final event."""

    tokens: int
    wall_s: float
    ttft_s: tuple[float, ...]  # per request, from the first submit to its first event


class _Tracker:
    """Sinks for a batch of requests: the first-event time of each, and a wake-up when all have finished."""

    def __init__(self, count: int, start: float) -> None:
        self._start = start
        self._lock = threading.Lock()
        self._remaining = count
        self._done = threading.Event()
        self.first: list[float | None] = [None] * count
        self.final: list[GenerationEvent | None] = [None] * count

    def sink(self, index: int) -> Sink:
        def receive(event: GenerationEvent) -> None:
            now = time.perf_counter()
            if self.first[index] is None:
                self.first[index] = now - self._start
            if event.finish_reason is None and event.error is None:
                return
            self.final[index] = event
            with self._lock:
                self._remaining -= 1
                if self._remaining == 0:
                    self._done.set()

        return receive

    def wait(self) -> None:
        if not self._done.wait(TIMEOUT_S):
            raise TimeoutError(f"requests did not finish within {TIMEOUT_S:.0f} s")


@contextmanager
def running_engine(bm: BenchModel, config: EngineConfig) -> Iterator[Engine]:
    """An engine over the bench model with no end-of-sequence tokens: every request runs to max_new_tokens."""
    engine = bm.engine(config)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()  # also puts the model's original linears back


def requests(
    prompts: Sequence[tuple[int, ...]], max_new_tokens: int, adapters: Sequence[StoredAdapter | None]
) -> list[GenerationRequest]:
    """Greedy requests, one per prompt, request i under adapters[i]."""
    return [
        GenerationRequest(prompt, SamplingParams(), max_new_tokens, (), adapter)
        for prompt, adapter in zip(prompts, adapters, strict=True)
    ]


def shortened(batch: Sequence[GenerationRequest], max_new_tokens: int) -> list[GenerationRequest]:
    """The same requests with fewer new tokens (for warm-up runs)."""
    return [dataclasses.replace(r, max_new_tokens=max_new_tokens) for r in batch]


def run_batch(engine: Engine, batch: Sequence[GenerationRequest], *, exact: bool = True) -> Run:
    """Submit every request at once and wait for all; fails if any errs, or (`exact`) stops short."""
    start = time.perf_counter()
    tracker = _Tracker(len(batch), start)
    for i, request in enumerate(batch):
        engine.submit(request, tracker.sink(i))
    tracker.wait()
    wall = time.perf_counter() - start
    finals = [e for e in tracker.final if e is not None]
    errors = [e.error for e in finals if e.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(batch)} requests failed; first: {errors[0]!r}")
    tokens = sum(e.completion_tokens for e in finals)
    expected = sum(r.max_new_tokens for r in batch)
    if exact and tokens != expected:
        raise RuntimeError(f"generated {tokens} tokens, expected {expected}")
    return Run(tokens, wall, tuple(t for t in tracker.first if t is not None))


def measure(bm: BenchModel, config: EngineConfig, batch: Sequence[GenerationRequest]) -> Run:
    """Warm up on short copies of `batch` (adapters land on the device), then time `batch`."""
    with running_engine(bm, config) as engine:
        run_batch(engine, shortened(batch, 2))
        return run_batch(engine, batch)


def time_to_first_token(engine: Engine, request: GenerationRequest) -> float:
    return run_batch(engine, [dataclasses.replace(request, max_new_tokens=1)]).ttft_s[0]
