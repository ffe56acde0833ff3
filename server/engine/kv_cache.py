"""A key/value cache layer that grows in place, so a decode step does not copy the whole cache.

transformers' `DynamicLayer` appends by `torch.cat`: every decode step copies every layer's keys and values,
O(L) bytes per step and O(L^2) over a sequence (docs/engine.md, "The running batch and its cache", has what
that cost). This layer keeps its keys and values as views of the first columns of larger
buffers and writes each step's entries into the spare columns; only when they run out does it copy, into
buffers with `block` more columns, so the copying is amortised over `block` steps.

The running batch changes a layer's rows (joins, leaves, trimmed padding) through `set_entries`, which puts
the new entries into fresh buffers with spare room at once and lets the old ones go. Anything else that
assigns `keys`/`values` directly still works: `update` notices that they are no longer a prefix view of its
buffers and starts new ones.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _is_prefix_view(t: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """Whether `t` is `buffer[:, :, :n]` for some n: same storage start, same strides, same batch and heads."""
    return (
        buffer is not None
        and t.data_ptr() == buffer.data_ptr()
        and t.stride() == buffer.stride()
        and t.shape[:2] == buffer.shape[:2]
    )


class GrowingLayer(DynamicLayer):
    """One layer's keys and values (B, H_kv, L, D), as views of (B, H_kv, capacity, D) buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, block: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.block = block
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None  # set at construction; reset() is handled
        return self.keys, self.values

    def reseat(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold `keys`/`values` (B, H_kv, L, D) in new buffers with `block` spare columns; the old ones are freed."""
        self._key_buffer = self._value_buffer = None  # before allocating: the old buffers are garbage already
        self.keys, self.values = keys, values
        self._regrow(0)
        assert self._key_buffer is not None and self._value_buffer is not None
        used = keys.shape[2]
        self.keys, self.values = self._key_buffer[:, :, :used], self._value_buffer[:, :, :used]

    def _fits(self, new: int) -> bool:
        keys, values = self._entries()
        return (
            self._key_buffer is not None
            and _is_prefix_view(keys, self._key_buffer)
            and _is_prefix_view(values, self._value_buffer)
            and keys.shape[2] + new <= self._key_buffer.shape[2]
        )

    def _regrow(self, new: int) -> None:
        """New buffers holding the current entries plus room for `new` + `block` more."""
        keys, values = self._entries()
        b, h, used, d = keys.shape
        capacity = used + new + self.block
        self._key_buffer = keys.new_empty(b, h, capacity, d)
        self._key_buffer[:, :, :used] = keys
        self._value_buffer = values.new_empty(b, h, capacity, values.shape[3])
        self._value_buffer[:, :, :used] = values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H_kv, T, D) entries; returns all keys and values, each (B, H_kv, L + T, D)."""
        if self.keys is None or self.values is None:  # after reset(): start empty
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        used, new = self._entries()[0].shape[2], key_states.shape[2]
        if not self._fits(new):
            self._regrow(new)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, used : used + new] = key_states
        self._value_buffer[:, :, used : used + new] = value_states
        keys, values = self._key_buffer[:, :, : used + new], self._value_buffer[:, :, : used + new]
        self.keys, self.values = keys, values
        return keys, values


def growing(cache: DynamicCache, block: int) -> DynamicCache:
    """`cache` with each plain layer replaced by a `GrowingLayer` over the same entries (no copy yet), and growing
    layers set to grow by `block` from now on."""
    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicLayer and layer.keys is not None and layer.values is not None:
            layer = GrowingLayer(layer.keys, layer.values, block)
        elif isinstance(layer, GrowingLayer):
            layer.block = block
        layers.append(layer)
    cache.layers = layers
    return cache


def set_entries(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace a cache layer's keys and values, (B, H_kv, L, D) each (reseated if the layer grows in place)."""
    if isinstance(layer, GrowingLayer):
        layer.reseat(keys, values)
    else:
        layer.keys, layer.values = keys, values
