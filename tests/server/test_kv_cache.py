"""GrowingLayer: decoding into spare buffer columns gives exactly what transformers' concatenating cache gives."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from quiver.server.batch import cache_layers
from quiver.server.kv_cache import GrowingLayer, growing


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
    want = _decode(tiny_model, plain, steps[:, :1], 5)
    got = _decode(tiny_model, grown, steps[:, :1], 5)
    for i in range(1, steps.shape[1]):
        want = torch.cat([want, _decode(tiny_model, plain, steps[:, i : i + 1], 5 + i)])
        got = torch.cat([got, _decode(tiny_model, grown, steps[:, i : i + 1], 5 + i)])
        buffers.add(layer.keys.data_ptr())
    assert torch.equal(got, want)
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
