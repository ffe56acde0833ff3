"""The running batch: one key/value cache for all decoding sequences, left-padded to a common length.

Sequences join after their prefill (their cache is left-padded and concatenated along the batch) and leave
by index selection, as in TGI's dynamic batching; a 2-D attention mask hides the padding and explicit
per-row position ids keep every row's positions its own. A row's cache may start with an adapter's key/value
prefix (prefix tuning) or hold soft-prompt tokens (prompt tuning): to the batch they are ordinary entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from quiver.server.engine.decode_step import DecodeStep, transformers_step
from quiver.server.engine.kv_cache import growing, set_entries
from quiver.server.platform.uploads import upload


def cache_layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer entries; each holds `keys` and `values` of shape (B, H_kv, L, D)."""
    return list(cache.layers)


def _pad_left(t: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [amount, 0]  # F.pad lists dims from the last one
    return F.pad(t, pad)


class DecodeBatch:
    """Cache, mask and positions of the rows being decoded together."""

    def __init__(self, device: torch.device, block: int = 64, step: DecodeStep = transformers_step) -> None:
        self._device = device
        self._block = block  # spare cache columns reserved at a time (kv_cache.GrowingLayer)
        self._step = step  # the model's forward for one token per row (decode_step.decode_step_for)
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)  # (B, L): 1 = real entry, 0 = padding
        self.lengths: list[int] = []  # valid entries per row = the next position id
        self._positions: torch.Tensor | None = None  # (B, 1) `lengths` on the device; None: upload again

    @property
    def size(self) -> int:
        return len(self.lengths)

    def add(self, cache: DynamicCache, mask: torch.Tensor, lengths: Sequence[int]) -> None:
        """Append prefilled rows: their cache (B', H_kv, W', D) and mask (B', W'), valid entries right-aligned."""
        self._positions = None
        if self.cache is None:
            self.cache, self.mask, self.lengths = growing(cache, self._block), mask, list(lengths)
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(cache_layers(self.cache), cache_layers(cache), strict=True):
            set_entries(
                mine,
                torch.cat([_pad_left(mine.keys, width - old, 2), _pad_left(theirs.keys, width - new, 2)]),
                torch.cat([_pad_left(mine.values, width - old, 2), _pad_left(theirs.values, width - new, 2)]),
            )  # (B + B', H_kv, width, D)
        self.mask = torch.cat([_pad_left(self.mask, width - old, 1), _pad_left(mask, width - new, 1)])
        self.lengths.extend(lengths)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order), then drop padding columns no row needs any more."""
        unchanged = list(rows) == list(range(self.size))
        if not unchanged:
            self._positions = None
        if not rows:
            self.cache, self.lengths = None, []
            self.mask = self.mask[:0, :0]
            return
        assert self.cache is not None
        trim = self.mask.shape[1] - max(self.lengths[i] for i in rows)
        if not trim and unchanged:
            return  # the usual decode step: nobody left, so no copy of the cache
        index = upload(rows, torch.long, self._device)  # (B',)
        for layer in cache_layers(self.cache):
            set_entries(layer, layer.keys[index, :, trim:], layer.values[index, :, trim:])  # (B', H, L', D)
        self.mask = self.mask[index, trim:]
        self.lengths = [self.lengths[i] for i in rows]

    def forward(self, model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Decode one token per row: `tokens` (B,) -> next-token logits (B, V). Nothing is read back from the
        device: positions are uploaded when rows join or leave and advanced there, and whether any row has
        padding is known from `lengths` (each row's valid entries are its last `lengths[i]` columns)."""
        assert self.cache is not None
        padded = min(self.lengths) < self.mask.shape[1]
        if self._positions is None:
            self._positions = upload(self.lengths, torch.long, self._device)[:, None]  # (B, 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)  # (B, L + 1)
        logits = self._step(model, tokens[:, None], self._positions, self.mask if padded else None, self.cache)
        self._positions = self._positions + 1  # (B, 1)
        self.lengths = [n + 1 for n in self.lengths]
        return logits.float()  # (B, V)
