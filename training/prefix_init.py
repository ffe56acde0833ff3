"""Prefix tuning initialised from text: the prefix's keys and values start as those the base model itself computes
for a text (Li & Liang, 2021, found this the best initialisation, and with it prefix tuning no longer needs the
MLP reparametrisation to train well).

At initialisation the adapter is then exactly the base model reading that text before every prompt: the text's
keys and values sit in each layer's cache at positions 0..P-1 (rotary positions included) and the prompt follows
at P.., as PEFT and Quiver's engine place a prefix. Training moves on from there. The adapter PEFT saves keeps its
format: the prefix embedding holds the keys and values, whatever they started from.
"""

from __future__ import annotations

from typing import Any

import torch


def text_token_ids(tokenizer: Any, text: str, count: int) -> list[int]:
    """`text`'s token ids, repeated or cut to `count` (as PEFT's text initialisation of a soft prompt does)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError("--init-text has no tokens")
    return (ids * -(-count // len(ids)))[:count]


def text_prefix(base_model: Any, ids: list[int]) -> torch.Tensor:
    """The base model's keys and values for `ids`, laid out as PEFT's prefix embedding: (P, L * 2 * H_kv * D), where
    row t holds layer 0's key, layer 0's value, layer 1's key, ... of position t, each (H_kv, D) flattened."""
    device = next(base_model.parameters()).device
    with torch.no_grad():
        out = base_model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    per_layer = []
    for layer in out.past_key_values.layers:  # keys and values: (1, H_kv, P, D)
        per_layer += [layer.keys[0], layer.values[0]]
    stacked = torch.stack(per_layer)  # (L * 2, H_kv, P, D)
    return stacked.permute(2, 0, 1, 3).reshape(len(ids), -1)  # (P, L * 2 * H_kv * D)


def initialise_prefix_from_text(peft_model: Any, tokenizer: Any, text: str) -> None:
    """Set the active prefix-tuning adapter's prefix (no projection) to the base model's keys and values of `text`."""
    config = peft_model.active_peft_config
    if config.prefix_projection:
        raise ValueError("--init-text sets the prefix itself, which --prefix-projection computes by an MLP instead")
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight  # (P, L * 2 * H_kv * D)
    prefix = text_prefix(peft_model.get_base_model(), text_token_ids(tokenizer, text, config.num_virtual_tokens))
    if prefix.shape != embedding.shape:
        raise ValueError(f"the base's keys and values are {tuple(prefix.shape)}, the prefix {tuple(embedding.shape)}")
    with torch.no_grad():
        embedding.copy_(prefix.to(embedding.dtype))
