"""Adapter tiers and adapter-aware scheduling on a tiny random Llama: eviction by bytes, cold loads, more
distinct adapters than device slots, fairness, cancellation freeing a slot, delete while running."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from quiver.adapters.base_spec import base_spec_from_checkpoint
from quiver.adapters.names import AdapterRef
from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
from quiver.adapters.store import LocalAdapterStore, StoredAdapter
from quiver.adapters.validation import ValidationLimits
from quiver.server.config import EngineConfig
from quiver.server.engine.adapter_tiers import DeviceAdapters, HostAdapterCache, load_host_adapter
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.engine.lora.slots import LoraSlots
from quiver.server.engine.request import GenerationRequest
from quiver.server.engine.sampling import SamplingParams

from ...adapters.adapter_factory import make_lora, make_prefix_tuning, make_prompt_tuning

PROMPT = (5, 17, 42, 99, 7)


@pytest.fixture(scope="module")
def registry(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterRegistry:
    store = LocalAdapterStore(tmp_path_factory.mktemp("store"))
    return AdapterRegistry(store, base_spec_from_checkpoint(base_dir), ValidationLimits())


@pytest.fixture(scope="module")
def loras(base_dir: Path, registry: AdapterRegistry, tmp_path_factory: pytest.TempPathFactory) -> list[StoredAdapter]:
    out = tmp_path_factory.mktemp("loras")
    return [
        registry.register(make_lora(base_dir, out / f"l{i}", r=2 + i % 3, seed=10 + i, target_modules="all-linear"),
                          RegistrationOptions(name=f"lora-{i}"))
        for i in range(6)
    ]


def make_engine(loaded: Any, **config: Any) -> Engine:
    engine = Engine(loaded.model, loaded.tokenizer, frozenset(), EngineConfig(**config))
    engine.start()
    return engine


@pytest.fixture
def engine(loaded: Any) -> Iterator[Engine]:
    eng = make_engine(loaded, max_lora_rank=8, max_lora_slots=2)
    yield eng
    eng.stop()


class Run:
    """One submitted request and the order in which it finished among all runs."""

    finished = iter(range(1_000_000))

    def __init__(self, engine: Engine, adapter: StoredAdapter | None, max_new: int = 8,
                 logprobs: int | None = None) -> None:
        self.events: queue.Queue[GenerationEvent] = queue.Queue()
        self.order = -1  # set before submitting: the engine thread may finish the run before submit returns
        self.logprobs: list[float] = []  # each token's, when asked for
        request = GenerationRequest(PROMPT, SamplingParams(), max_new, (), adapter, logprobs=logprobs)
        self.handle = engine.submit(request, self._on_event)

    def _on_event(self, event: GenerationEvent) -> None:
        if event.finish_reason is not None or event.error is not None:
            self.order = next(self.finished)
        self.logprobs.extend(detail.logprob for detail in event.logprobs)
        self.events.put(event)

    def tokens(self, timeout: float = 60) -> list[int]:
        out: list[int] = []
        while True:
            event = self.events.get(timeout=timeout)
            assert event.error is None, event.error
            out.extend(event.token_ids)
            if event.finish_reason is not None:
                return out

    def received(self) -> list[GenerationEvent]:
        """Every event queued so far, without waiting."""
        out: list[GenerationEvent] = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out


class HeldRun(Run):
    """A run whose first event holds the engine thread (the sink is called on it) until `release`: what the test
    does between `wait_started` and `release` happens while the request certainly still runs, however fast or
    slow the machine."""

    def __init__(self, engine: Engine, adapter: StoredAdapter | None, max_new: int) -> None:
        self._started, self._go = threading.Event(), threading.Event()
        super().__init__(engine, adapter, max_new)

    def _on_event(self, event: GenerationEvent) -> None:
        super()._on_event(event)
        if not self._started.is_set():
            self._started.set()
            self._go.wait(timeout=120)  # bounded: a failing test must not hang the engine for ever

    def wait_started(self) -> None:
        assert self._started.wait(timeout=60), "the run never produced its first token"

    def release(self) -> None:
        self._go.set()


def test_host_cache_evicts_by_bytes(loras: list[StoredAdapter]):
    one = load_host_adapter(loras[0]).nbytes
    cache = HostAdapterCache(max_bytes=int(one * 2.5))
    try:
        for stored in loras[:3]:
            assert cache.fetch(stored).result(timeout=30).key.name == stored.metadata.name
        assert cache.nbytes <= int(one * 2.5)
        # Ranks 2, 3, 4 (bytes in proportion) in room for 2.5 x rank 2: the third load evicts the first two.
        assert (cache.stats.loads, cache.stats.evictions, cache.stats.hits, cache.stats.misses) == (3, 2, 0, 3)
        assert cache.fetch(loras[2]).done()  # the most recent ones are cached ...
        assert cache.stats.hits == 1
        evicted = cache.fetch(loras[0])  # ... the least recently used one loads again
        assert evicted.result(timeout=30).key.name == "lora-0"
        assert (cache.stats.loads, cache.stats.evictions, cache.stats.hits) == (4, 3, 1)  # 4 + 2 > 5: rank 4 goes
        assert cache.stats.misses == 4
    finally:
        cache.close()


def test_host_cache_drops_deleted_adapters_and_keeps_what_requests_hold(loras: list[StoredAdapter]):
    cache = HostAdapterCache(max_bytes=1 << 30)
    try:
        held = [cache.fetch(stored).result(timeout=30) for stored in loras[:3]]
        before = cache.nbytes
        assert cache.drop([loras[0], loras[1], loras[4]]) == 2  # lora-4 was never loaded
        assert cache.resident == 1 and cache.nbytes == before - held[0].nbytes - held[1].nbytes
        assert held[0].tensors  # a request's reference still holds the weights it runs on
        assert cache.fetch(loras[2]).done() and cache.stats.hits == 1  # the one not deleted is still cached
        assert cache.fetch(loras[0]).result(timeout=30).key == held[0].key  # a dropped one loads again
        assert (cache.stats.loads, cache.stats.misses) == (4, 4)
    finally:
        cache.close()


def test_device_slots_pin_and_evict_lru(loaded: Any, loras: list[StoredAdapter]):
    slots = LoraSlots(loaded.model, num_slots=2, max_rank=8)
    try:
        device = DeviceAdapters(slots, max_bytes=2 * slots.slot_bytes, device=torch.device("cpu"), dtype=torch.float32)
        hosts = [load_host_adapter(s) for s in loras[:3]]
        first, second = device.acquire(hosts[0]), device.acquire(hosts[1])
        assert first is not None and second is not None and first.lora_slot != second.lora_slot
        assert device.acquire(hosts[2]) is None  # both slots pinned
        device.release(first)
        third = device.acquire(hosts[2])
        assert third is not None and third.lora_slot == first.lora_slot  # the unpinned LRU entry was evicted
        assert device.lookup(hosts[0].key) is None and device.lookup(hosts[1].key) is second
        assert (device.stats.loads, device.stats.evictions, device.stats.hits, device.stats.misses) == (3, 1, 0, 3)
        assert device.acquire(hosts[1]) is second and device.stats.hits == 1
        assert device.nbytes == 2 * slots.slot_bytes
    finally:
        slots.unwrap()


def test_prompt_bytes_on_the_device_are_counted_in_the_model_dtype(loaded: Any, base_dir: Path,
                                                                   registry: AdapterRegistry, tmp_path: Path):
    stored = registry.register(make_prompt_tuning(base_dir, tmp_path / "p", num_virtual_tokens=3),
                               RegistrationOptions(name="soft-bf16", mode="replace"))
    host = load_host_adapter(stored)  # float32, as saved
    slots = LoraSlots(loaded.model, num_slots=1, max_rank=2)
    try:
        device = DeviceAdapters(slots, max_bytes=slots.stack_bytes + host.nbytes // 2, device=torch.device("cpu"),
                                dtype=torch.bfloat16)
        entry = device.acquire(host)  # fits only because bfloat16 halves it
        assert entry is not None and entry.prompt is not None and entry.prompt.dtype == torch.bfloat16
        assert entry.nbytes == entry.prompt.nbytes == host.nbytes // 2 == device.nbytes
    finally:
        slots.unwrap()


def test_more_distinct_adapters_than_slots_all_complete(engine: Engine, loras: list[StoredAdapter]):
    solo = [Run(engine, stored).tokens() for stored in loras]
    assert len({tuple(t) for t in solo}) > 1  # the adapters really differ
    together = [Run(engine, stored) for stored in loras]  # 6 adapters, 2 slots
    assert [run.tokens() for run in together] == solo


def test_waiting_for_a_slot_is_fair(engine: Engine, loras: list[StoredAdapter]):
    # Two slots, both pinned by long requests; a third adapter must get the first slot that frees up,
    # even though more requests for the resident adapters keep arriving after it.
    for stored in loras[:3]:  # in host memory first: a cold load still under way would let later ones pass
        engine.host_adapters.fetch(stored).result(timeout=30)
    long_a, long_b = HeldRun(engine, loras[0], max_new=40), Run(engine, loras[1], max_new=60)
    try:
        long_a.wait_started()  # long_a has 39 tokens to go while the others arrive
        blocked = Run(engine, loras[2], max_new=2)
        later = [Run(engine, loras[0], max_new=2) for _ in range(3)]
    finally:
        long_a.release()
    for run in (long_a, long_b, blocked, *later):
        run.tokens()
    assert blocked.order < min(run.order for run in later)


def test_cancel_frees_the_slot(loaded: Any, loras: list[StoredAdapter]):
    engine = make_engine(loaded, max_lora_rank=8, max_lora_slots=1)
    try:
        hog = HeldRun(engine, loras[0], max_new=100)
        try:
            hog.wait_started()
            hog.handle.cancel()  # from another thread, as a client's disconnect does; 99 tokens still to go
        finally:
            hog.release()
        assert Run(engine, loras[1], max_new=3).tokens()  # needs the only slot
        # The slot came from the cancel, not from the hog finishing: it stopped after its first token, and a
        # cancelled request gets no last event.
        assert [event.finish_reason for event in hog.received()] == [None]
    finally:
        engine.stop()


def test_prompt_and_prefix_adapters_mix_with_lora(engine: Engine, base_dir: Path, registry: AdapterRegistry,
                                                  loras: list[StoredAdapter], tmp_path: Path):
    prompt = registry.register(make_prompt_tuning(base_dir, tmp_path / "p", num_virtual_tokens=3),
                               RegistrationOptions(name="soft", mode="replace"))
    prefix = registry.register(make_prefix_tuning(base_dir, tmp_path / "x", num_virtual_tokens=2),
                               RegistrationOptions(name="prefix", mode="replace"))
    kinds = [None, loras[0], prompt, prefix]
    solo: list[tuple[list[int], list[float]]] = []
    for adapter in kinds:  # one at a time: each finishes before the next starts
        run = Run(engine, adapter, logprobs=0)
        solo.append((run.tokens(), run.logprobs))
    # Each adapter changes what the model predicts, so one ignored would show. On this tiny random model a soft
    # prompt or a small prefix often leaves the greedy tokens as they are; the log-probabilities still move.
    firsts = [logprobs[0] for _, logprobs in solo]
    assert min(abs(a - b) for a, b in itertools.combinations(firsts, 2)) > 1e-3, firsts
    mixed = [Run(engine, adapter, logprobs=0) for adapter in kinds]
    for (tokens, logprobs), together in zip(solo, mixed, strict=True):
        assert together.tokens() == tokens
        assert together.logprobs == pytest.approx(logprobs, abs=1e-4)


def test_delete_while_running_does_not_break_the_request(engine: Engine, base_dir: Path,
                                                         registry: AdapterRegistry, tmp_path: Path):
    # A strong adapter (alpha 64): a weak one leaves this tiny model's greedy tokens as the base's, and then
    # losing it mid-run would not show.
    stored = registry.register(make_lora(base_dir, tmp_path / "gone", r=4, lora_alpha=64, seed=99),
                               RegistrationOptions(name="short-lived"))
    reference = Run(engine, stored, max_new=30).tokens()
    assert reference != Run(engine, None, max_new=30).tokens()
    run = HeldRun(engine, stored, max_new=30)
    try:
        run.wait_started()  # 29 tokens to go: the delete lands mid-run
        # What the server does on DeleteAdapter (app.py wires the catalog's on_deletion to the host tier's drop).
        deleted = registry.store.delete(AdapterRef("short-lived", None))
        assert engine.host_adapters.drop(deleted) == 1  # the run's adapter was in the host tier
    finally:
        run.release()
    assert run.tokens() == reference


def test_reregistered_name_is_a_new_key(engine: Engine, base_dir: Path, registry: AdapterRegistry, tmp_path: Path):
    # Same weights, same name and version after a delete, but another lora_alpha: must not reuse the old slot.
    weak = registry.register(make_lora(base_dir, tmp_path / "weak", r=4, lora_alpha=1, seed=7),
                             RegistrationOptions(name="reborn"))
    weak_tokens = Run(engine, weak).tokens()
    registry.store.delete(AdapterRef("reborn", None))
    strong_dir = make_lora(base_dir, tmp_path / "strong", r=4, lora_alpha=400, seed=7)
    strong = registry.register(strong_dir, RegistrationOptions(name="reborn"))
    assert strong.metadata.version == weak.metadata.version and strong.metadata.sha256 == weak.metadata.sha256
    assert Run(engine, strong).tokens() != weak_tokens


def test_rank_above_the_slots_is_refused_and_frees_nothing(loaded: Any, base_dir: Path, registry: AdapterRegistry,
                                                           tmp_path: Path, loras: list[StoredAdapter]):
    big = registry.register(make_lora(base_dir, tmp_path / "big", r=16), RegistrationOptions(name="big"))
    engine = make_engine(loaded, max_lora_rank=8, max_lora_slots=1)
    try:
        run = Run(engine, big)
        event = run.events.get(timeout=30)
        assert type(event.error).__name__ == "FailedPrecondition" and "rank 16" in str(event.error)
        assert Run(engine, loras[0], max_new=2).tokens(timeout=30)  # the only slot is still usable
    finally:
        engine.stop()


def test_cancel_while_waiting_for_its_prefill_frees_the_slot(loaded: Any, loras: list[StoredAdapter],
                                                            monkeypatch: pytest.MonkeyPatch):
    """A request admitted (adapter pinned) but not yet prefilled, cancelled then, unpins its adapter and is
    never prefilled."""
    from quiver.server.engine import model_runner as runner_module

    prefilled: list[int] = []
    real_prefill = runner_module.prefill

    def counting_prefill(forward: Any, rows: Any) -> Any:
        prefilled.append(len(rows))
        return real_prefill(forward, rows)

    monkeypatch.setattr(runner_module, "prefill", counting_prefill)
    # One slot; every 5-token request a prefill group of its own (none chunked), so an admitted request waits a
    # step for its prefill.
    engine = Engine(loaded.model, loaded.tokenizer, frozenset(),
                    EngineConfig(max_lora_rank=8, max_lora_slots=1, max_prefill_tokens=len(PROMPT)))
    engine.host_adapters.fetch(loras[0]).result(timeout=30)  # cached: admitted at the engine's first step
    victim: list[Run] = []

    class Canceller(Run):
        def _on_event(self, event: GenerationEvent) -> None:
            victim[0].handle.cancel()  # the victim's group comes after this one's: it is still waiting
            super()._on_event(event)

    first = Canceller(engine, None, max_new=3)  # submitted before the thread starts: admitted together
    victim.append(Run(engine, loras[0], max_new=3))
    engine.start()
    try:
        assert first.tokens()
        assert Run(engine, loras[1], max_new=3).tokens(timeout=30)  # needs the only slot
        assert victim[0].events.empty()  # cancelled before its prefill: no tokens, no final event
        assert prefilled == [1, 1]  # the first request and the last one: the victim never ran
    finally:
        engine.stop()
