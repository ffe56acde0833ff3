"""The model with each row's adapter mapped: the one place where a forward's LoRA mapping is built.

Every forward the engine runs (a prefill group, a chunk, a decode step) goes through `ModelForward`, which
maps the batch's rows to their LoRA slots for exactly that forward (LoraSlots.set_batch: one mapping per
forward, reused by decode steps while their rows are unchanged), then runs the model. Prompt and prefix
adapters need no mapping: they enter through the inputs and the cache (server/engine/kinds/).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quiver.server.engine.adapter_tiers import DeviceAdapter
from quiver.server.engine.lora.slots import LoraSlots


class ModelForward:
    """Runs `model` over a (B, T) batch whose row i uses `adapters[i]` (None: the base model)."""

    def __init__(self, model: Any, lora: LoraSlots) -> None:
        self.model = model
        self.lora = lora

    def map(self, adapters: Sequence[DeviceAdapter | None], tokens: int, *, transient: bool) -> None:
        """Map the rows to their LoRA slots for the next forward of `tokens` tokens per row; `transient`: a
        one-off forward (a prefill) that leaves the decode batch's mapping in place."""
        self.lora.set_batch([a.lora_slot if a is not None else 0 for a in adapters],
                            [a.rank if a is not None else 0 for a in adapters], tokens=tokens, transient=transient)

    def __call__(self, adapters: Sequence[DeviceAdapter | None], tokens: int, **inputs: Any) -> Any:
        """A one-off forward (prefill or chunk) of `tokens` tokens per row: transformers' output."""
        self.map(adapters, tokens, transient=True)
        return self.model(**inputs)
