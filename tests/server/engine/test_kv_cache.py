"""GrowingLayer: decoding into spare buffer columns gives exactly what transformers' concatenating cache gives."""

from __future__ import annotations

import gc
import random
import weakref
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from quiver.server.engine.batch import DecodeBatch, cache_layers
from quiver.server.engine.kv_cache import GrowingLayer, growing, set_entries
from quiver.server.engine.lora.slots import LoraSlots
from quiver.server.engine.model_forward import ModelForward
from quiver.server.engine.prefill import PrefillRow, prefill


def _prefilled(model: Any, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache


def _decode(model: Any, cache: DynamicCache, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Feed `tokens` (B, S) one column per step; returns the logits of every step (S, B, V)."""
    out = []
    for i in range(tokens.shape[1]):
        positions = torch.full((tokens.shape[0], 1), start + i)
        logits = model(input_ids=tokens[:, i : i + 1], position_ids=positions, past_key_values=cache,
                       use_cache=True).logits
        out.append(logits[:, -1])
    return torch.stack(out)


@torch.inference_mode()
def test_decode_equals_concatenating_cache_and_copies_once_per_block(tiny_model: Any) -> None:
    torch.manual_seed(0)
    ids, steps = torch.randint(0, 1000, (3, 5)), torch.randint(0, 1000, (3, 10))
    plain = _prefilled(tiny_model, ids)
    grown = growing(_prefilled(tiny_model, ids), block=4)
    layer = cache_layers(grown)[0]
    assert isinstance(layer, GrowingLayer)

    buffers = set()
    want, got = [], []
    for i in range(steps.shape[1]):
        want.append(_decode(tiny_model, plain, steps[:, i : i + 1], 5 + i))
        got.append(_decode(tiny_model, grown, steps[:, i : i + 1], 5 + i))
        buffers.add(layer.keys.data_ptr())
    assert torch.equal(torch.cat(got), torch.cat(want))
    for mine, theirs in zip(cache_layers(grown), cache_layers(plain), strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    # 10 one-token steps in blocks of 4 spare columns: the first step copies the prefill into a buffer with
    # room for 1 + 4, then a new buffer every 5 steps; everything else is written in place.
    assert len(buffers) == 2


@torch.inference_mode()
def test_reassigned_entries_start_a_new_buffer(tiny_model: Any) -> None:
    """The running batch selects rows and trims columns by assignment; the layer must not write into stale buffers."""
    torch.manual_seed(1)
    ids, steps = torch.randint(0, 1000, (3, 6)), torch.randint(0, 1000, (3, 4))
    plain = _prefilled(tiny_model, ids)
    grown = growing(_prefilled(tiny_model, ids), block=8)
    _decode(tiny_model, plain, steps[:, :2], 6)
    _decode(tiny_model, grown, steps[:, :2], 6)
    rows = torch.tensor([2, 0])
    for cache in (plain, grown):
        for layer in cache_layers(cache):
            # A prefix view of the old buffer (rows 0..1) would pass a naive storage check: rows 2, 0 is a copy,
            # rows [:2] keeps the storage start and must still be seen as a different tensor.
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
    assert torch.equal(_decode(tiny_model, grown, steps[rows, 2:], 8), _decode(tiny_model, plain, steps[rows, 2:], 8))

    for cache in (plain, grown):
        for layer in cache_layers(cache):
            layer.keys, layer.values = layer.keys[:1], layer.values[:1]  # a view that starts where the buffer does
    got = _decode(tiny_model, grown, steps[:1, :1], 10)
    assert torch.equal(got, _decode(tiny_model, plain, steps[:1, :1], 10))
    kept = cache_layers(grown)[0]
    assert kept.keys.shape[0] == 1 and kept.keys.shape[2] == 11


@torch.inference_mode()
def test_set_entries_frees_the_old_buffers_and_leaves_room(tiny_model: Any) -> None:
    torch.manual_seed(2)
    cache = growing(_prefilled(tiny_model, torch.randint(0, 1000, (4, 6))), block=8)
    _decode(tiny_model, cache, torch.randint(0, 1000, (4, 1)), 6)
    layer = cache_layers(cache)[0]
    assert isinstance(layer, GrowingLayer) and layer._key_buffer is not None
    old = weakref.ref(layer._key_buffer)
    set_entries(layer, layer.keys[[3, 1]], layer.values[[3, 1]])
    gc.collect()
    assert old() is None  # a batch that shrank does not keep the larger buffers until its next step
    reseated = layer.keys.data_ptr()
    for layer in cache_layers(cache)[1:]:
        set_entries(layer, layer.keys[[3, 1]], layer.values[[3, 1]])
    _decode(tiny_model, cache, torch.randint(0, 1000, (2, 1)), 7)
    assert cache_layers(cache)[0].keys.data_ptr() == reseated  # the step wrote into the spare room


@torch.inference_mode()
def test_a_reset_layer_starts_empty(tiny_model: Any) -> None:
    torch.manual_seed(3)
    ids, step = torch.randint(0, 1000, (2, 4)), torch.randint(0, 1000, (2, 1))
    grown = growing(_prefilled(tiny_model, ids), block=4)
    grown.reset()
    tiny_model(input_ids=ids, past_key_values=grown, use_cache=True)  # prefill again into the reset cache
    plain = _prefilled(tiny_model, ids)
    assert torch.equal(_decode(tiny_model, grown, step, 4), _decode(tiny_model, plain, step, 4))


@pytest.mark.parametrize("block", [1, 5, 64])
@pytest.mark.parametrize("seed", range(2))
@torch.inference_mode()
def test_random_joins_and_leaves_equal_a_concatenating_batch(
    tiny_model: Any, monkeypatch: pytest.MonkeyPatch, block: int, seed: int
) -> None:
    """DecodeBatch over growing layers vs over transformers' own layers: random joins, leaves, reorders."""
    import quiver.server.engine.batch as batch_module

    lora = LoraSlots(tiny_model, num_slots=1, max_rank=2)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    grown, plain = DecodeBatch(torch.device("cpu"), block), DecodeBatch(torch.device("cpu"), block)
    make_growing = batch_module.growing
    rows = 0
    try:
        for _ in range(40):
            if rows == 0 or rng.random() < 0.2:
                prompts = [torch.randint(0, 1000, (rng.randint(1, 9),)) for _ in range(rng.randint(1, 3))]
                for batch, convert in ((grown, make_growing), (plain, lambda cache, _: cache)):
                    monkeypatch.setattr(batch_module, "growing", convert)
                    out = prefill(ModelForward(tiny_model, lora), [PrefillRow(ids, None) for ids in prompts])
                    batch.add(out.cache, out.mask, out.lengths)
                rows += len(prompts)
            elif rng.random() < 0.3:
                kept = rng.sample(range(rows), rng.randint(0, rows))  # random order: leaves and reorders
                grown.keep(kept)
                plain.keep(kept)
                rows = len(kept)
                if not rows:
                    continue
            tokens = torch.randint(0, 1000, (rows,))
            lora.set_batch([0] * rows, [0] * rows)
            assert torch.equal(grown.forward(tiny_model, tokens), plain.forward(tiny_model, tokens))
            assert grown.cache is not None and plain.cache is not None
            for mine, theirs in zip(cache_layers(grown.cache), cache_layers(plain.cache), strict=True):
                assert isinstance(mine, GrowingLayer) and mine._key_buffer is not None
                assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
                assert mine._key_buffer.shape[2] <= mine.keys.shape[2] + block  # spare room stays bounded
    finally:
        lora.unwrap()
