"""One decode step (one new token per row) of the running batch, in plain torch for Llama-family models.

transformers' forward serves every use (mask factories run per call, an attention-interface lookup and a kwargs chain
per layer, output dataclasses); at a decode step of a small model on a CPU that glue is a measurable part of the step
(docs/engine.md, "The decode step"). The plain step computes the same math over the same modules, so the LoRA wrappers,
prepacked or quantized linears and the model's own rotary embedding and norms are used as they are; only the glue is
ours:

- the padding mask is made once per step as an additive (B, 1, 1, L) tensor (none without padding), not once
  per layer;
- grouped-query attention takes transformers' sdpa path for one query token, so the same kernels run: with
  padding, each group's query heads become queries of its key/value head; without, sdpa's `enable_gqa`.

Outputs equal transformers' forward bit for bit in fp32 (tests/server/engine/test_decode_step.py). A model whose
layers do anything else (sliding windows, per-layer attention types, extra norms, softcapping), that runs
another attention implementation than sdpa or that has accelerate hooks runs transformers' forward:
`decode_step_for` picks from a registry of model classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

# (model, tokens (B, 1), positions (B, 1), mask (B, L) with 1 = real entry or None when no row has padding,
#  cache) -> next-token logits (B, V)
DecodeStep = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None, DynamicCache], torch.Tensor]


def transformers_step(
    model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: DynamicCache
) -> torch.Tensor:
    """The model's own forward: works for every architecture."""
    out = model(
        input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
        logits_to_keep=1,
    )
    logits: torch.Tensor = out.logits[:, -1]  # (B, V)
    return logits


def llama_step(
    model: Any, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: DynamicCache
) -> torch.Tensor:
    """Llama's decoder (also Mistral's and Qwen2's without sliding windows): pre-norm attention and MLP blocks."""
    inner = model.model
    h = inner.embed_tokens(tokens)  # (B, 1, C)
    cos, sin = inner.rotary_emb(h, positions)  # (B, 1, D) each
    rope = (cos[:, None], sin[:, None])  # (B, 1, 1, D): broadcast over heads
    bias: torch.Tensor | None = None  # no padding: no mask, as transformers then gives sdpa none
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(mask == 0, float("-inf"))
        bias = bias[:, None, None, :]  # (B, 1, 1, L): 0 = attend, -inf = padding
    for i, layer in enumerate(inner.layers):
        h = h + _attention(layer.self_attn, layer.input_layernorm(h), rope, bias, cache, i)  # (B, 1, C)
        h = h + layer.mlp(layer.post_attention_layernorm(h))  # (B, 1, C)
    logits: torch.Tensor = model.lm_head(inner.norm(h))[:, -1]  # (B, V)
    return logits


def _attention(
    attn: Any, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None,
    cache: DynamicCache, index: int,
) -> torch.Tensor:
    """Self-attention of one new token per row over the row's cache; x (B, 1, C) -> (B, 1, C).

    Grouped-query heads are handled as transformers' sdpa path does, so the kernels and the results are the
    same: with a padding mask, each group's query heads become queries of its key/value head; without one,
    sdpa's own `enable_gqa`."""
    b, d = x.shape[0], attn.head_dim
    q = _rotate(attn.q_proj(x).view(b, -1, 1, d), rope)  # (B, H, 1, D)
    k = _rotate(attn.k_proj(x).view(b, -1, 1, d), rope)  # (B, H_kv, 1, D)
    v = attn.v_proj(x).view(b, -1, 1, d)  # (B, H_kv, 1, D)
    keys, values = cache.update(k, v, index)  # (B, H_kv, L, D) each
    grouped = q.shape[1] != keys.shape[1]
    if bias is not None and grouped:
        q = q.view(b, keys.shape[1], -1, d)  # (B, H_kv, H / H_kv, D): a group's heads as queries of its kv head
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=bias, scale=attn.scaling, enable_gqa=bias is None and grouped
    )  # (B, H_kv, H / H_kv, D) or (B, H, 1, D): the same order of heads
    o: torch.Tensor = attn.o_proj(out.reshape(b, 1, -1))  # (B, 1, H * D)
    return o


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary position embedding with transformers' half-split layout; x (B, heads, 1, D)."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, heads, 1, D)
    return (x * cos) + (rotated * sin)


def sdpa_full_attention(config: Any) -> bool:
    """Whether the model runs transformers' sdpa attention and every layer sees all earlier positions (no
    sliding window, no chunks): the attention that the plain step and prefill's 4-D mask reproduce."""
    if config._attn_implementation != "sdpa":
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None):
        return False
    return all(kind == "full_attention" for kind in getattr(text, "layer_types", None) or ())


# Model class -> its plain step; any other model (subclasses included) runs transformers' forward.
_STEPS: dict[type, DecodeStep] = {
    LlamaForCausalLM: llama_step,
    MistralForCausalLM: llama_step,
    Qwen2ForCausalLM: llama_step,
}


def decode_step_for(model: Any, *, plain: bool = True) -> DecodeStep:
    """The plain step registered for `model`'s class when its config and modules allow it (and `plain`), else
    transformers' forward."""
    step = _STEPS.get(type(model))
    config = model.config
    if step is None or not plain or not sdpa_full_attention(config):
        return transformers_step
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim > 256:  # transformers' sdpa path, which the step mirrors, repeats keys and values there instead
        return transformers_step
    if any(hasattr(m, "_hf_hook") or m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return transformers_step  # hooks on the model itself (device maps, offloading) would be bypassed
    return step
