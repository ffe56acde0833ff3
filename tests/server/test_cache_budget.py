"""The key/value cache budget: its byte count, refusal of a request that cannot fit, and admission that holds
requests back (in arrival order) while the batch would outgrow it."""

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
from quiver.server.cache_budget import CacheBudget, position_bytes
from quiver.server.config import EngineConfig
from quiver.server.engine import Engine
from quiver.server.errors import ResourceExhausted

from .test_engine import Collector, request

BLOCK = EngineConfig().cache_block_tokens


def test_position_bytes_match_a_real_cache(tiny_model: Any):
    cache = DynamicCache()
    with torch.inference_mode():
        tiny_model(input_ids=torch.arange(7)[None], past_key_values=cache, use_cache=True)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
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


def _engine(model: Any, tokenizer: Any, max_cache_bytes: int) -> Iterator[Engine]:
    eng = Engine(model, tokenizer, frozenset({tokenizer.eos_token_id}), EngineConfig(max_cache_bytes=max_cache_bytes))
    eng.start()
    yield eng
    eng.stop()


def _bytes(model: Any, peaks: list[int]) -> int:
    return CacheBudget(0, position_bytes(model.config, torch.float32), BLOCK).batch_bytes(peaks)


PROMPT = "1, 2, 3,"


def _peak(tokenizer: Any, max_new_tokens: int) -> int:
    return len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"]) + max_new_tokens


def test_a_request_that_cannot_fit_alone_is_refused(tiny_model: Any, smol_tokenizer: Any):
    peak = _peak(smol_tokenizer, 20)
    for engine in _engine(tiny_model, smol_tokenizer, _bytes(tiny_model, [peak])):
        engine.submit(request(smol_tokenizer, PROMPT, max_new_tokens=20), Collector())
        with pytest.raises(ResourceExhausted, match="--max-cache-bytes"):
            engine.submit(request(smol_tokenizer, PROMPT, max_new_tokens=21), Collector())


def _soft_prompt(tmp_path: Path, virtual: int) -> StoredAdapter:
    metadata = AdapterMetadata(
        name="soft", version=1, kind="prompt_tuning", peft_type="PROMPT_TUNING", base_fingerprint="0" * 64,
        base_architecture="LlamaForCausalLM", size_bytes=1, num_parameters=1, rank=None,
        num_virtual_tokens=virtual, target_modules=(), sha256="0" * 64, created_at="2026-11-24T00:00:00Z",
    )
    return StoredAdapter(metadata, tmp_path)


def test_an_adapters_virtual_tokens_count_toward_a_requests_peak(tiny_model: Any, smol_tokenizer: Any,
                                                                   tmp_path: Path):
    peak = _peak(smol_tokenizer, 20)
    for engine in _engine(tiny_model, smol_tokenizer, _bytes(tiny_model, [peak])):
        plain = request(smol_tokenizer, PROMPT, max_new_tokens=19)
        soft = dataclasses.replace(plain, adapter=_soft_prompt(tmp_path, 1))
        assert engine.submit(soft, Collector()) is not None  # 19 new + 1 virtual: the peak still fits
        too_long = dataclasses.replace(soft, adapter=_soft_prompt(tmp_path, 2))
        with pytest.raises(ResourceExhausted, match=f"may grow to {peak + 1} positions"):
            engine.submit(too_long, Collector())


@pytest.mark.parametrize("rows_that_fit", [2, 3])
def test_requests_start_only_while_the_batch_fits(tiny_model: Any, smol_tokenizer: Any, rows_that_fit: int):
    peak = _peak(smol_tokenizer, 20)
    for engine in _engine(tiny_model, smol_tokenizer, _bytes(tiny_model, [peak] * rows_that_fit)):
        sinks = [Collector() for _ in range(3)]
        for sink in sinks:
            engine.submit(request(smol_tokenizer, PROMPT, max_new_tokens=20), sink)
        firsts = [sink.events.get(timeout=60)[0] for sink in sinks]
        finals = [sink.wait()[0] for sink in sinks]
    third_waited = firsts[2] > min(finals[:2])
    assert third_waited == (rows_that_fit == 2)


def test_a_request_that_does_not_fit_yet_holds_back_later_ones(tiny_model: Any, smol_tokenizer: Any):
    small, large = _peak(smol_tokenizer, 20), _peak(smol_tokenizer, 150)
    budget = _bytes(tiny_model, [large])  # the large one fits alone only; two small ones fit together
    assert budget >= _bytes(tiny_model, [small, small])
    for engine in _engine(tiny_model, smol_tokenizer, budget):
        first, large_sink, later = Collector(), Collector(), Collector()
        engine.submit(request(smol_tokenizer, PROMPT, max_new_tokens=20), first)
        first.events.get(timeout=60)  # running
        engine.submit(request(smol_tokenizer, PROMPT, max_new_tokens=150), large_sink)
        engine.submit(request(smol_tokenizer, PROMPT, max_new_tokens=20), later)  # would fit beside the first
        first_final = first.wait()[0]
        large_first = large_sink.events.get(timeout=60)[0]
        large_final = large_sink.wait()[0]
        later_first = later.events.get(timeout=60)[0]
    assert first_final < large_first  # the large one waited for room
    assert large_final < later_first  # and the later small one did not overtake it


def test_the_engine_reports_what_its_rows_reserve(tiny_model: Any, smol_tokenizer: Any):
    peak = _peak(smol_tokenizer, 200)
    for engine in _engine(tiny_model, smol_tokenizer, EngineConfig().max_cache_bytes):
        assert engine.cache_reserved_bytes == 0
        sink = Collector()
        handle = engine.submit(request(smol_tokenizer, PROMPT, max_new_tokens=200), sink)
        sink.events.get(timeout=60)  # running
        assert engine.cache_reserved_bytes == _bytes(tiny_model, [peak])
        handle.cancel()  # a cancelled row leaves within a step, and sends nothing more
        deadline = time.monotonic() + 30
        while engine.cache_reserved_bytes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.cache_reserved_bytes == 0
