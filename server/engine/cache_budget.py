"""The running batch's key/value cache, bounded in bytes: admission checks a request's worst case up front.

The batch is one left-padded tensor per layer (server/engine/batch.py), so its cache takes
rows x (longest row + spare block) x bytes per position. A row grows to at most its prompt, plus any
virtual tokens of its adapter (soft prompt or prefix), plus its `max_new_tokens`; so if the batch fits with
every row at that worst case, it never outgrows the budget, whatever the rows generate. Admission adds a
request only while that holds (in arrival order: the oldest request that does not fit holds back the later
ones, so a long request is not starved by short ones), and a request that could not fit even alone is
refused when it arrives.

With `--preempt`, admission counts each row at its length now instead (plus the spare block), as vLLM admits
into its paged cache, so far more rows may run when most stop well before `max_new_tokens`. A decode step
whose batch would outgrow the budget first takes out the newest rows (`to_preempt`): their cache is dropped,
and they resume before any new request starts, by prefilling their prompt and the tokens they have generated
(vLLM's recompute preemption; this batch has no pages to swap out).

The budget bounds the batch's own cache. Transient copies come on top of it for a moment: a prefill group's
cache (padded to the group's longest prompt, at most `--max-prefill-tokens` wide) before it joins, and the
old entries while a join or a growth copies them into new buffers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quiver.common.errors import TooLarge


@dataclass(frozen=True)
class CacheBudget:
    """Bytes the batch's keys and values may reach, and what one position of one row costs."""

    max_bytes: int
    position_bytes: int  # keys and values of one position in every layer
    block: int  # spare columns the growing cache reserves (EngineConfig.cache_block_tokens)

    @classmethod
    def of(cls, model: Any, max_bytes: int, block: int, dtype: torch.dtype) -> CacheBudget:
        return cls(max_bytes, position_bytes(model.config, dtype), block)

    def batch_bytes(self, peaks: Iterable[int]) -> int:
        """Worst-case cache bytes of a batch whose rows grow to `peaks` positions each."""
        peaks = list(peaks)
        return len(peaks) * (max(peaks, default=0) + self.block) * self.position_bytes

    def fits(self, peaks: Iterable[int]) -> bool:
        return self.batch_bytes(peaks) <= self.max_bytes

    def to_preempt(self, lengths: Sequence[int], arrivals: Sequence[int]) -> list[int]:
        """Rows to take out, newest (highest arrival) first, until the others fit at `lengths`; never every row.

        A lone row always fits: each request's peak was checked against the budget when it arrived."""
        kept = sorted(range(len(lengths)), key=lambda i: arrivals[i])  # oldest first
        while len(kept) > 1 and not self.fits(lengths[i] for i in kept):
            kept.pop()
        return sorted(set(range(len(lengths))) - set(kept))

    def check_alone(self, peak: int) -> None:
        """Refuse a request that would not fit even as the batch's only row."""
        if not self.fits([peak]):
            need = self.batch_bytes([peak])
            raise TooLarge(
                f"the request may grow to {peak} positions, {need / 2**20:.1f} MiB of key/value cache; the server "
                f"allows {self.max_bytes / 2**20:.1f} MiB (--max-cache-bytes): shorten the input or max_new_tokens"
            )


def position_bytes(config: Any, dtype: torch.dtype) -> int:
    """Keys and values of one position across all layers, from the model's config (`dtype`: the cache's)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    element = torch.empty((), dtype=dtype).element_size()
    return text.num_hidden_layers * 2 * kv_heads * head_dim * element
