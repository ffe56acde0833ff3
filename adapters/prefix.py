"""Prefix tuning (Li & Liang, 2021): PEFT's flat saved prefix turned into per-layer keys and values.

PEFT saves a prefix as `prompt_embeddings` of shape (P, L * 2 * H_kv * D): P virtual tokens, L layers, a key
and a value per layer, H_kv heads of width D. For GQA bases PEFT provisions the prefix with the KV heads
(`_prepare_prompt_learning_config` sets token_dim = H_kv * D and num_attention_heads = H_kv), so the keys are
exactly what each layer stores in its cache. `PeftModelForCausalLM.get_prompt` views the row as
(P, 2L, H_kv, D), permutes to (2L, H_kv, P, D) and hands layer l the pair (2l, 2l + 1) as (key, value) of a
DynamicCache. `prefix_to_kv` does the same once, at validation, so the engine can place the very keys and values
PEFT would; `kv_to_prefix` is its inverse (a layout check: the round trip must give back the saved bytes).
"""

from __future__ import annotations

import torch

from quiver.adapters.base_spec import BaseModelSpec

PREFIX_FILE = "quiver_prefix.safetensors"
"""Extra file written beside a prefix adapter; holds one tensor, PREFIX_KEY."""
PREFIX_KEY = "prefix"
"""(L, 2, H_kv, P, D) keys ([:, 0]) and values ([:, 1]) per layer, in the adapter's saved dtype."""


def prefix_width(base: BaseModelSpec) -> int:
    """Row width PEFT gives a prefix on `base`: num_layers * 2 * num_kv_heads * head_dim."""
    return base.num_layers * 2 * base.kv_dim


def prefix_to_kv(prompt_embeddings: torch.Tensor, base: BaseModelSpec) -> torch.Tensor:
    """PEFT's saved (P, L*2*H_kv*D) prefix as (L, 2, H_kv, P, D): layer l's key is [l, 0], its value [l, 1]."""
    num_tokens = prompt_embeddings.shape[0]
    layers, heads, head_dim = base.num_layers, base.num_kv_heads, base.head_dim
    x = prompt_embeddings.view(num_tokens, layers * 2, heads, head_dim)  # (P, 2L, H_kv, D)
    x = x.permute(1, 2, 0, 3)  # (2L, H_kv, P, D): PEFT's permute([2, 0, 3, 1, 4]) without the batch axis
    return x.reshape(layers, 2, heads, num_tokens, head_dim).contiguous()  # (L, 2, H_kv, P, D)


def kv_to_prefix(prefix: torch.Tensor) -> torch.Tensor:
    """The inverse of `prefix_to_kv`: (L, 2, H_kv, P, D) back to PEFT's flat (P, L*2*H_kv*D)."""
    layers, two, heads, num_tokens, head_dim = prefix.shape
    x = prefix.reshape(layers * two, heads, num_tokens, head_dim)  # (2L, H_kv, P, D)
    x = x.permute(2, 0, 1, 3)  # (P, 2L, H_kv, D)
    return x.reshape(num_tokens, layers * two * heads * head_dim).contiguous()  # (P, L*2*H_kv*D)


def prefix_layout_problems(shape: tuple[int, ...], num_virtual_tokens: int, base: BaseModelSpec) -> list[str]:
    """Why a saved `prompt_embeddings` of `shape` is not a prefix of `num_virtual_tokens` for `base` ([] if it is)."""
    expected = (num_virtual_tokens, prefix_width(base))
    if tuple(shape) == expected:
        return []
    return [
        f"prefix prompt_embeddings has shape {tuple(shape)} but this base needs {expected} "
        f"(num_virtual_tokens x num_layers {base.num_layers} * 2 * num_kv_heads {base.num_kv_heads} "
        f"* head_dim {base.head_dim})"
    ]
