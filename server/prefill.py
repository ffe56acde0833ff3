"""How each adapter kind shapes a row's prefill; a registry keyed by kind, so the engine has no kind ladder.

- no adapter or LoRA: the prompt tokens as they are (LoRA acts inside the linears, per row).
- prompt tuning (Lester et al., 2021): the soft prompt's virtual-token embeddings precede the prompt's.
- prefix tuning (Li & Liang, 2021): the row's cache starts with the adapter's per-layer key/value prefix, so
  the prompt's positions start after it, exactly as PEFT places them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from quiver.server.adapter_tiers import DeviceAdapter
from quiver.server.lora import LoraSlots


@dataclass
class PrefillInputs:
    """Model inputs for one row's prefill."""

    model_kwargs: dict[str, torch.Tensor]  # input_ids or inputs_embeds, (1, T') or (1, T', H)
    cache: DynamicCache | None  # pre-filled cache (prefix tuning) or None
    positions: torch.Tensor  # (1, T') position ids of the new entries
    total: int  # cache entries after the prefill = the row's next position


def _plain(model: Any, ids: torch.Tensor, adapter: DeviceAdapter | None) -> PrefillInputs:
    n = ids.shape[1]
    return PrefillInputs({"input_ids": ids}, None, torch.arange(n, device=ids.device)[None], n)


def _soft_prompt(model: Any, ids: torch.Tensor, adapter: DeviceAdapter | None) -> PrefillInputs:
    assert adapter is not None and adapter.prompt is not None
    embeds = model.get_input_embeddings()(ids)  # (1, T, H)
    prompt = adapter.prompt.to(embeds.dtype)[None]  # (1, P, H)
    inputs = torch.cat([prompt, embeds], dim=1)  # (1, P + T, H)
    n = inputs.shape[1]
    return PrefillInputs({"inputs_embeds": inputs}, None, torch.arange(n, device=ids.device)[None], n)


def _prefix(model: Any, ids: torch.Tensor, adapter: DeviceAdapter | None) -> PrefillInputs:
    assert adapter is not None and adapter.prefix is not None
    prefix = adapter.prefix  # (L, 2, H_kv, P, D)
    cache = DynamicCache()
    for layer, kv in enumerate(prefix):
        cache.update(kv[0][None], kv[1][None], layer)  # (1, H_kv, P, D) each
    p, n = prefix.shape[3], ids.shape[1]
    positions = torch.arange(p, p + n, device=ids.device)[None]  # (1, T)
    return PrefillInputs({"input_ids": ids}, cache, positions, p + n)


_KINDS: dict[str | None, Callable[[Any, torch.Tensor, DeviceAdapter | None], PrefillInputs]] = {
    None: _plain,
    "lora": _plain,
    "prompt_tuning": _soft_prompt,
    "prefix_tuning": _prefix,
}


def prefill_inputs(model: Any, ids: torch.Tensor, adapter: DeviceAdapter | None) -> PrefillInputs:
    """Inputs for prefilling `ids` (1, T) under `adapter` (or none)."""
    return _KINDS[adapter.kind if adapter else None](model, ids, adapter)


def prefill(model: Any, lora: LoraSlots, ids: torch.Tensor, adapter: DeviceAdapter | None
            ) -> tuple[torch.Tensor, DynamicCache, int]:
    """Run one row's prefill: next-token logits (V,), the row's cache, and its number of cache entries."""
    inputs = prefill_inputs(model, ids, adapter)
    cache = inputs.cache if inputs.cache is not None else DynamicCache()
    lora.set_batch([adapter.lora_slot if adapter else 0], [adapter.rank if adapter else 0])
    mask = torch.ones(1, inputs.total, dtype=torch.long, device=ids.device)
    out = model(**inputs.model_kwargs, attention_mask=mask, position_ids=inputs.positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float(), cache, inputs.total
