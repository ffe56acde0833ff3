"""The key/value cache budget: its byte count, refusal of a request that cannot fit, admission that holds
requests back (in arrival order) while the batch would outgrow it, and with `preempt` admission at the rows'
lengths now, with the newest rows preempted (and later resumed by recomputing) when the batch outgrows it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from quiver.adapters.metadata import AdapterMetadata
from quiver.adapters.store import StoredAdapter
from quiver.common.errors import ResourceExhausted
from quiver.server.config import EngineConfig
from quiver.server.engine.cache_budget import CacheBudget, position_bytes
from quiver.server.engine.engine import Engine

from ...real_models import RealModels
from .test_engine import Collector, reference_greedy, request

BLOCK = EngineConfig().cache_block_tokens


def test_position_bytes_match_a_real_cache(tiny_model: Any):
    cache = DynamicCache()
    with torch.inference_mode():
        tiny_model(input_ids=torch.arange(7)[None], past_key_values=cache, use_cache=True)
    layers: list[Any] = list(cache.layers)  # full-attention layers: keys and values (B, H_kv, L, D)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    assert held == 7 * position_bytes(tiny_model.config, torch.float32)
    assert position_bytes(tiny_model.config, torch.bfloat16) * 2 == position_bytes(tiny_model.config, torch.float32)


def test_a_batch_counts_every_row_at_the_longest_peak():
    budget = CacheBudget(max_bytes=1_000, position_bytes=10, block=4)
    assert budget.batch_bytes([10, 30, 20]) == 3 * (30 + 4) * 10
    assert budget.fits([96]) and not budget.fits([97])
    assert budget.fits([46, 1]) and not budget.fits([47, 1])
    budget.check_alone(96)
    with pytest.raises(ResourceExhausted, match="may grow to 97 positions"):
        budget.check_alone(97)


def test_preemption_takes_the_newest_rows_and_never_all():
    budget = CacheBudget(max_bytes=1_000, position_bytes=10, block=4)  # one row of 96, two of 46, three of 29
    assert budget.to_preempt([20, 20, 20], [5, 3, 9]) == []
    assert budget.to_preempt([30, 30, 30], [5, 3, 9]) == [2]  # arrival 9 is the newest
    assert budget.to_preempt([30, 30, 30], [9, 3, 5]) == [0]
    assert budget.to_preempt([50, 50, 50], [1, 2, 3]) == [1, 2]
    assert budget.to_preempt([500, 500], [1, 2]) == [1]  # the oldest stays, even over the budget
    assert budget.to_preempt([], []) == []


def _engine(model: Any, tokenizer: Any, max_cache_bytes: int, preempt: bool = False) -> Iterator[Engine]:
    config = EngineConfig(max_cache_bytes=max_cache_bytes, preempt=preempt)
    eng = Engine(model, tokenizer, frozenset({tokenizer.eos_token_id}), config)
    eng.start()
    yield eng
    eng.stop()


def _bytes(model: Any, peaks: list[int]) -> int:
    return CacheBudget(0, position_bytes(model.config, torch.float32), BLOCK).batch_bytes(peaks)


PROMPT = "1, 2, 3,"


def _peak(tokenizer: Any, max_new_tokens: int) -> int:
    return len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"]) + max_new_tokens


def test_a_request_that_cannot_fit_alone_is_refused(tiny_model: Any, text_tokenizer: Any):
    peak = _peak(text_tokenizer, 20)
    for engine in _engine(tiny_model, text_tokenizer, _bytes(tiny_model, [peak])):
        engine.submit(request(text_tokenizer, PROMPT, max_new_tokens=20), Collector())
        with pytest.raises(ResourceExhausted, match="--max-cache-bytes"):
            engine.submit(request(text_tokenizer, PROMPT, max_new_tokens=21), Collector())


def _soft_prompt(tmp_path: Path, virtual: int) -> StoredAdapter:
    metadata = AdapterMetadata(
        name="soft", version=1, kind="prompt_tuning", peft_type="PROMPT_TUNING", base_fingerprint="0" * 64,
        base_architecture="LlamaForCausalLM", size_bytes=1, num_parameters=1, rank=None,
        num_virtual_tokens=virtual, target_modules=(), sha256="0" * 64, created_at="2026-11-24T00:00:00Z",
    )
    return StoredAdapter(metadata, tmp_path)


def test_an_adapters_virtual_tokens_count_toward_a_requests_peak(tiny_model: Any, text_tokenizer: Any,
                                                                   tmp_path: Path):
    peak = _peak(text_tokenizer, 20)
    for engine in _engine(tiny_model, text_tokenizer, _bytes(tiny_model, [peak])):
        plain = request(text_tokenizer, PROMPT, max_new_tokens=19)
        soft = dataclasses.replace(plain, adapter=_soft_prompt(tmp_path, 1))
        assert engine.submit(soft, Collector()) is not None  # 19 new + 1 virtual: the peak still fits
        too_long = dataclasses.replace(soft, adapter=_soft_prompt(tmp_path, 2))
        with pytest.raises(ResourceExhausted, match=f"may grow to {peak + 1} positions"):
            engine.submit(too_long, Collector())


@pytest.mark.parametrize("rows_that_fit", [2, 3])
def test_requests_start_only_while_the_batch_fits(tiny_model: Any, text_tokenizer: Any, rows_that_fit: int):
    peak = _peak(text_tokenizer, 20)
    for engine in _engine(tiny_model, text_tokenizer, _bytes(tiny_model, [peak] * rows_that_fit)):
        sinks = [Collector() for _ in range(3)]
        for sink in sinks:
            engine.submit(request(text_tokenizer, PROMPT, max_new_tokens=20), sink)
        firsts = [sink.events.get(timeout=60)[0] for sink in sinks]
        finals = [sink.wait()[0] for sink in sinks]
    third_waited = firsts[2] > min(finals[:2])
    assert third_waited == (rows_that_fit == 2)


def test_a_request_that_does_not_fit_yet_holds_back_later_ones(tiny_model: Any, text_tokenizer: Any):
    small, large = _peak(text_tokenizer, 20), _peak(text_tokenizer, 150)
    budget = _bytes(tiny_model, [large])  # the large one fits alone only; two small ones fit together
    assert budget >= _bytes(tiny_model, [small, small])
    for engine in _engine(tiny_model, text_tokenizer, budget):
        first, large_sink, later = Collector(), Collector(), Collector()
        engine.submit(request(text_tokenizer, PROMPT, max_new_tokens=20), first)
        first.events.get(timeout=60)  # running
        engine.submit(request(text_tokenizer, PROMPT, max_new_tokens=150), large_sink)
        engine.submit(request(text_tokenizer, PROMPT, max_new_tokens=20), later)  # would fit beside the first
        first_final = first.wait()[0]
        large_first = large_sink.events.get(timeout=60)[0]
        large_final = large_sink.wait()[0]
        later_first = later.events.get(timeout=60)[0]
    assert first_final < large_first  # the large one waited for room
    assert large_final < later_first  # and the later small one did not overtake it


def test_the_engine_reports_what_its_rows_reserve(tiny_model: Any, text_tokenizer: Any):
    peak = _peak(text_tokenizer, 200)
    for engine in _engine(tiny_model, text_tokenizer, EngineConfig().max_cache_bytes):
        assert engine.cache_reserved_bytes == 0
        sink = Collector()
        handle = engine.submit(request(text_tokenizer, PROMPT, max_new_tokens=200), sink)
        sink.events.get(timeout=60)  # running
        assert engine.cache_reserved_bytes == _bytes(tiny_model, [peak])
        handle.cancel()  # a cancelled row leaves within a step, and sends nothing more
        deadline = time.monotonic() + 30
        while engine.cache_reserved_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.cache_reserved_bytes == 0


@pytest.mark.real_model
def test_with_preemption_rows_start_at_once_and_the_newest_yields_then_resumes(real_models: RealModels):
    """On the real model, whose greedy text changes token by token (the tiny one repeats a token), so a resumed
    row that recomputed the wrong context would show."""
    loaded = real_models.get()
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = ["Once upon a time, in a small village by the sea,", "The history of the printing press",
               "Here is a recipe for bread:"]
    requests = [request(tokenizer, p, max_new_tokens=40) for p in prompts]
    with torch.inference_mode():
        expected = [reference_greedy(model, r, tokenizer.eos_token_id) for r in requests]
    assert all(len(e) == 40 for e in expected)  # no early end: every row grows to its peak
    peak = max(len(r.prompt_ids) for r in requests) + 40
    budget = _bytes(model, [peak] * 2)  # two rows at their longest; three fit only while short
    assert _bytes(model, [len(r.prompt_ids) + 1 for r in requests]) <= budget < _bytes(model, [peak] * 3)
    config = EngineConfig(max_cache_bytes=budget, preempt=True)
    engine = Engine(model, tokenizer, frozenset({tokenizer.eos_token_id}), config)
    engine.start()
    try:
        sinks = [Collector() for _ in requests]
        for req, sink in zip(requests, sinks, strict=True):
            engine.submit(req, sink)
        firsts = [sink.events.get(timeout=60) for sink in sinks]
        results = [sink.wait() for sink in sinks]
        preemptions = engine.preemptions
    finally:
        engine.stop()
    assert max(order for order, _ in firsts) < min(order for order, _ in results)  # all three started at once
    assert preemptions >= 1
    for (_, first), (_, events), want in zip(firsts, results, expected, strict=True):
        assert [t for e in [first, *events] for t in e.token_ids] == want
        assert [e.completion_tokens for e in [first, *events]] == list(range(1, 41))  # each token sent once
    assert results[2][0] == max(order for order, _ in results)  # the newest was preempted and finished last


def test_a_preempted_request_can_be_cancelled(tiny_model: Any, text_tokenizer: Any):
    peak = _peak(text_tokenizer, 80)
    for engine in _engine(tiny_model, text_tokenizer, _bytes(tiny_model, [peak]), preempt=True):
        first, second = Collector(), Collector()
        engine.submit(request(text_tokenizer, PROMPT, max_new_tokens=80), first)
        handle = engine.submit(request(text_tokenizer, PROMPT, max_new_tokens=80), second)
        deadline = time.monotonic() + 60
        while not engine.preemptions and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.preemptions == 1 and engine.num_waiting == 1  # the second waits to resume
        handle.cancel()
        first.wait()
        while engine.num_waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_waiting == 0 and engine.num_running == 0
    received = []
    while not second.events.empty():
        received.append(second.events.get()[1])
    assert received and all(e.finish_reason is None and e.error is None for e in received)  # stopped, silently


def test_with_preemption_rows_waiting_for_their_prefill_count_too(tiny_model: Any, text_tokenizer: Any,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """Short rows admitted together are prefilled one group per step while a long row grows. The engine is
    stepped by hand here (no thread), so the budget can be set to what fits exactly when they arrive: every join
    and every decode step must stay within it, and every request still gets each token exactly once."""
    from quiver.server.engine.batch import DecodeBatch

    block = 4
    config = EngineConfig(preempt=True, cache_block_tokens=block, max_prefill_tokens=8)
    engine = Engine(tiny_model, text_tokenizer, frozenset(), config)  # no end of sequence: rows run to the limit
    measured: list[int] = []
    add, forward = DecodeBatch.add, DecodeBatch.forward

    def budget() -> CacheBudget:
        return engine._scheduler.budget

    def checked_add(self: DecodeBatch, *args: Any) -> None:
        add(self, *args)
        measured.append(budget().batch_bytes(self.lengths))

    def checked_forward(self: DecodeBatch, *args: Any) -> Any:
        measured.append(budget().batch_bytes([n + 1 for n in self.lengths]))
        return forward(self, *args)

    def busy() -> bool:
        scheduler = engine._scheduler
        return bool(engine.num_running or scheduler.ready or scheduler.preempted or scheduler.chunked
                    or len(engine._admission))

    monkeypatch.setattr(DecodeBatch, "add", checked_add)
    monkeypatch.setattr(DecodeBatch, "forward", checked_forward)
    long_request = request(text_tokenizer, " ".join(str(i) for i in range(1, 40)), max_new_tokens=60)
    shorts = [request(text_tokenizer, PROMPT, max_new_tokens=20) for _ in range(4)]
    sinks = [Collector() for _ in range(5)]
    try:
        with torch.inference_mode():
            engine.submit(long_request, sinks[0])
            while not engine.num_running:
                engine.step(block=False)  # the long prompt, chunk by chunk
            engine.step(block=False)
            # From now on the budget holds the long row and the four short ones at its length after one more token.
            engine._scheduler.budget = dataclasses.replace(
                budget(), max_bytes=budget().batch_bytes([engine._runner.lengths[0] + 1] * 5)
            )
            measured.clear()
            for req, sink in zip(shorts, sinks[1:], strict=True):
                engine.submit(req, sink)
            while busy():
                engine.step(block=False)
    finally:
        engine.stop()
    assert engine.preemptions >= 1
    assert measured and max(measured) <= budget().max_bytes
    for req, sink in zip([long_request, *shorts], sinks, strict=True):
        events = []
        while not sink.events.empty():
            events.append(sink.events.get()[1])
        assert [e.completion_tokens for e in events] == list(range(1, req.max_new_tokens + 1))
