"""Batched prefill: the prompts of newly admitted rows, of any adapter kinds, in one forward.

Each kind contributes its own part to a row (server/engine/kinds/), so the engine has no kind ladder:
- no adapter or LoRA: the prompt tokens as they are (LoRA acts inside the linears, per row).
- prompt tuning (Lester et al., 2021): the soft prompt's virtual-token embeddings precede the prompt's.
- prefix tuning (Li & Liang, 2021): the row's cache starts with the adapter's per-layer key/value prefix, so
  the prompt's positions start after it, exactly as PEFT places them.

Rows are right-aligned: before the forward, row i's cache is [padding | prefix_i] and its new entries are
[padding | soft prompt_i | prompt_i]; a 2-D attention mask hides the padding and per-token position ids count
from each row's own start. A row with a prefix and a shorter prompt than the longest thus has padding in the
middle of its cache; afterwards the cache is compacted so that every row is [padding | valid entries], the
layout of `DecodeBatch`. Positions are already rotated into the keys, so moving entries changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from quiver.server.engine.adapter_tiers import DeviceAdapter
from quiver.server.engine.batch import cache_layers
from quiver.server.engine.decode_step import sdpa_full_attention
from quiver.server.engine.kinds import KINDS, PrefillParts
from quiver.server.engine.logprobs import TokenLogprob, prompt_token_logprobs
from quiver.server.engine.model_forward import ModelForward
from quiver.server.engine.pooling import PooledPart, last_hidden_states, pool_rows
from quiver.server.platform.uploads import upload

PromptLogprobs = tuple[TokenLogprob | None, ...]


@dataclass(frozen=True)
class PrefillRow:
    """One admitted request: its prompt token ids (T,) and its resident adapter (or none)."""

    ids: torch.Tensor
    adapter: DeviceAdapter | None
    prompt_logprobs: int | None = None  # n: each prompt token's log-probability after the first, n top ones
    pooled: bool = False  # an embedding row: its hidden states over its tokens are kept (pooling.py)


@dataclass(frozen=True)
class Prefilled:
    """The outcome of one batched prefill, ready to join the decode batch."""

    logits: torch.Tensor  # (B, V) float32 next-token logits
    cache: DynamicCache  # per layer (B, H_kv, W, D), each row's valid entries right-aligned
    mask: torch.Tensor  # (B, W) long: 1 = valid entry
    lengths: list[int]  # valid entries per row = the row's next position id
    # Per row that asked: log-probabilities of its prompt tokens, None for the first (nothing predicts it)
    prompt_logprobs: list[PromptLogprobs | None] | None = None
    # Per row: an embedding row's hidden states over its tokens (None for the others); None when no row pooled
    pooled: list[PooledPart | None] | None = None


def _parts_of(adapter: DeviceAdapter | None) -> PrefillParts:
    return KINDS[adapter.kind].parts(adapter) if adapter is not None else PrefillParts()


def _soft_tokens(parts: PrefillParts) -> int:
    return parts.soft.shape[0] if parts.soft is not None else 0


def plan_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split rows (by their prefill lengths) into prefill groups of at most `max_tokens` padded tokens each.

    Rows are sorted by length so that a group pads little; a row longer than the budget is prefilled alone.
    """
    groups: list[list[int]] = []
    group: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if group and (len(group) + 1) * lengths[i] > max_tokens:
            groups.append(group)
            group = []
        group.append(i)
    if group:
        groups.append(group)
    return groups


def oldest_group(lengths: Sequence[int], max_tokens: int, *, fitting: bool = False) -> list[int] | None:
    """The prefill group (by `plan_groups`) holding the oldest row (lowest index); with `fitting`, among the groups
    within the budget only (not a lone over-budget row, which would need chunks). None when there is none."""
    groups = plan_groups(lengths, max_tokens)
    if fitting:
        groups = [g for g in groups if len(g) > 1 or lengths[g[0]] <= max_tokens]
    return min(groups, key=min) if groups else None


def prefill(forward: ModelForward, rows: Sequence[PrefillRow]) -> Prefilled:
    """Run the prompts of `rows` through the model in one forward, each under its own adapter."""
    model = forward.model
    parts = [_parts_of(row.adapter) for row in rows]
    device = rows[0].ids.device
    prompt = [row.ids.numel() for row in rows]
    new = [n + _soft_tokens(p) for n, p in zip(prompt, parts, strict=True)]
    past = [p.prefix.shape[3] if p.prefix is not None else 0 for p in parts]
    b, t, pmax = len(rows), max(new), max(past)

    ids = torch.zeros(b, t, dtype=torch.long, device=device)  # (B, T): id 0 under the padding, masked
    mask = torch.zeros(b, pmax + t, dtype=torch.long, device=device)  # (B, P + T)
    for i, row in enumerate(rows):
        ids[i, t - prompt[i]:] = row.ids
        mask[i, pmax - past[i]: pmax] = 1
        mask[i, pmax + t - new[i]:] = 1
    first = upload([p - (t - n) for p, n in zip(past, new, strict=True)], torch.long, device)[:, None]  # (B, 1)
    positions = (torch.arange(t, device=device)[None] + first).clamp(min=0)  # (B, T); padding clamped to 0
    padded = any(n < t for n in new) or any(p < pmax for p in past)
    inputs = _inputs(model, ids, parts, prompt, new)
    cache = _prefix_cache(parts, past, pmax, b)
    scored = any(row.prompt_logprobs is not None for row in rows)
    # Every position's logits only when a row asked for its prompt's log-probabilities: (B, T, V) is large.
    pooling = any(row.pooled for row in rows)
    with last_hidden_states(model, pooling) as hidden:
        out = forward([r.adapter for r in rows], t, **inputs, attention_mask=_attention_mask(model, mask, t, padded),
                      position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=0 if scored else 1)
    pooled = pool_rows(hidden[0], [(t - n, t) if row.pooled else None for row, n in zip(rows, prompt, strict=True)]
                       ) if pooling else None
    scores = [_prompt_scores(out.logits[i, t - n:], row) for i, (row, n) in enumerate(zip(rows, prompt, strict=True))
              ] if scored else None
    lengths = [p + n for p, n in zip(past, new, strict=True)]
    if any(p and n < t for p, n in zip(past, new, strict=True)):  # padding between a prefix and the prompt
        mask = _compact(cache, mask)
    trim = mask.shape[1] - max(lengths)  # columns that are padding in every row
    if trim:
        for layer in cache_layers(cache):
            layer.keys, layer.values = layer.keys[:, :, trim:], layer.values[:, :, trim:]
        mask = mask[:, trim:]
    return Prefilled(out.logits[:, -1].float(), cache, mask, lengths, scores, pooled)


def select_prefilled(done: Prefilled, keep: Sequence[int]) -> Prefilled:
    """The rows `keep` of a prefilled group (the others, embedding rows, leave), their cache columns that are
    padding in every kept row dropped."""
    index = torch.tensor(keep, device=done.mask.device)
    lengths = [done.lengths[i] for i in keep]
    trim = done.mask.shape[1] - max(lengths)
    cache = DynamicCache()
    for layer, old in enumerate(cache_layers(done.cache)):
        cache.update(old.keys.index_select(0, index)[:, :, trim:], old.values.index_select(0, index)[:, :, trim:],
                     layer)
    scores = [done.prompt_logprobs[i] for i in keep] if done.prompt_logprobs is not None else None
    return Prefilled(done.logits.index_select(0, index), cache, done.mask.index_select(0, index)[:, trim:], lengths,
                     scores)


def _prompt_scores(logits: torch.Tensor, row: PrefillRow, before: torch.Tensor | None = None) -> PromptLogprobs | None:
    """Log-probabilities of the row's prompt tokens from `logits` (T, V) at their positions; `before` (V,), the
    logits that precede the first token (a previous chunk's last), scores that token too, else it gets None."""
    if row.prompt_logprobs is None:
        return None
    scored = prompt_token_logprobs(logits[:-1], row.ids[1:], row.prompt_logprobs)  # position j predicts token j + 1
    if before is None:
        return (None, *scored)
    return (*prompt_token_logprobs(before[None], row.ids[:1], row.prompt_logprobs), *scored)


def _attention_mask(model: Any, mask: torch.Tensor, t: int, padded: bool) -> torch.Tensor:
    """The mask for a prefill forward of `t` new positions over `mask` (B, W) valid entries.

    A left-padded row's padding queries have no key to attend to. With SDPA's boolean masks some CUDA kernels
    return NaN for such a row, where torch's CPU kernels return zeros; the NaN would become the padding's keys
    and values in the next layer, and real queries multiply those by zero weights, which spreads it. So under
    SDPA with padding, the 4-D mask (B, 1, T, W) lets each padding query attend to its own entry, as
    transformers' `_unmask_unattended` once did; real queries see exactly what the 2-D mask gives them. Other
    attention implementations keep the 2-D mask (eager adds a finite minimum, flash attention unpads), and so
    do models with sliding-window or chunked attention layers: transformers takes a 4-D mask as it is, for
    every layer, so it would lose their windows.
    """
    if not padded or not sdpa_full_attention(model.config):
        return mask
    width = mask.shape[1]
    query_cols = torch.arange(width - t, width, device=mask.device)[:, None]  # (T, 1): each query's own column
    key_cols = torch.arange(width, device=mask.device)[None]  # (1, W)
    allowed = (key_cols <= query_cols)[None] & mask.bool()[:, None]  # (B, T, W): causal, valid entries only
    unattended = ~allowed.any(dim=2, keepdim=True)  # (B, T, 1): padding queries
    allowed |= unattended & (key_cols == query_cols)[None]
    return allowed[:, None]  # (B, 1, T, W)


def _inputs(model: Any, ids: torch.Tensor, parts: list[PrefillParts], prompt: list[int], new: list[int]
            ) -> dict[str, torch.Tensor]:
    """input_ids (B, T), or inputs_embeds (B, T, H) with each soft prompt right before its row's prompt."""
    if all(p.soft is None for p in parts):
        return {"input_ids": ids}
    embeds = model.get_input_embeddings()(ids)  # (B, T, H)
    t = ids.shape[1]
    for i, p in enumerate(parts):
        if p.soft is not None:
            embeds[i, t - new[i]: t - prompt[i]] = p.soft.to(embeds.dtype)  # (P, H)
    return {"inputs_embeds": embeds}


def _prefix_cache(parts: list[PrefillParts], past: list[int], pmax: int, b: int) -> DynamicCache:
    """A cache holding every row's key/value prefix, right-aligned in `pmax` columns (zeros where none)."""
    cache = DynamicCache()
    if not pmax:
        return cache
    like = next(p.prefix for p in parts if p.prefix is not None)  # (L, 2, H_kv, P, D)
    layers, _, heads, _, dim = like.shape
    kv = like.new_zeros(layers, 2, b, heads, pmax, dim)  # (L, 2, B, H_kv, P_max, D)
    for i, p in enumerate(parts):
        if p.prefix is not None:
            kv[:, :, i, :, pmax - past[i]:] = p.prefix
    for layer in range(layers):
        cache.update(kv[layer, 0], kv[layer, 1], layer)
    return cache


def _compact(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Move every row's valid entries to the right end, in order; returns the new mask."""
    order = torch.sort(mask, dim=1, stable=True).indices  # (B, W): padding first, then valid entries in order
    for layer in cache_layers(cache):
        index = order[:, None, :, None].expand_as(layer.keys)  # (B, H_kv, W, D)
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
    return mask.gather(1, order)


def extend(forward: ModelForward, done: Prefilled, row: PrefillRow) -> Prefilled:
    """Feed one prefilled row (`done`, a batch of one) its next prompt tokens `row.ids` (T,): its cache continues
    at the next positions, under the same adapter. Used by chunked prefill (chunked_prefill.py); the scores of
    `row.ids` (with `row.prompt_logprobs`) start from `done`'s last logits."""
    ids, adapter = row.ids, row.adapter
    start, t = done.lengths[0], ids.numel()
    assert done.mask.shape == (1, start), "a single prefilled row has no padding"
    mask = torch.cat([done.mask, done.mask.new_ones(1, t)], dim=1)  # (1, L + T)
    positions = torch.arange(start, start + t, device=ids.device)[None]  # (1, T)
    scored = row.prompt_logprobs is not None
    with last_hidden_states(forward.model, row.pooled) as hidden:
        out = forward([adapter], t, input_ids=ids[None], attention_mask=mask, position_ids=positions,
                      past_key_values=done.cache, use_cache=True, logits_to_keep=0 if scored else 1)
    scores = [_prompt_scores(out.logits[0], row, before=done.logits[0])] if scored else None
    pooled = pool_rows(hidden[0], [(0, t)]) if row.pooled else None
    return Prefilled(out.logits[:, -1].float(), done.cache, mask, [start + t], scores, pooled)
