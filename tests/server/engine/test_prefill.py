"""Batched prefill: rows of every adapter kind and different lengths in one forward equal each row alone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from quiver.server.engine.adapter_tiers import AdapterKey, DeviceAdapter
from quiver.server.engine.batch import DecodeBatch
from quiver.server.engine.chunked_prefill import ChunkedPrefill
from quiver.server.engine.lora.slots import LoraSlots
from quiver.server.engine.model_forward import ModelForward
from quiver.server.engine.prefill import PrefillRow, oldest_group, plan_groups, prefill

ATOL = 1e-4


def _key(name: str) -> AdapterKey:
    return AdapterKey(name, 1, "0" * 64, "0" * 64, "2026-01-01T00:00:00Z")


@pytest.fixture
def slots(tiny_model: Any) -> Iterator[LoraSlots]:
    torch.manual_seed(1)
    lora = LoraSlots(tiny_model, num_slots=2, max_rank=4)
    for wrapper in lora._wrappers.values():
        wrapper.set_slot(1, torch.randn(4, wrapper.in_features), torch.randn(wrapper.out_features, 4), 0.5)
    yield lora
    lora.unwrap()


def _adapters(model: Any) -> dict[str, DeviceAdapter | None]:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(2)
    prompt = torch.randn(3, config.hidden_size)  # (P, H)
    prefix = torch.randn(config.num_hidden_layers, 2, config.num_key_value_heads, 4, head_dim)  # (L, 2, H_kv, P, D)
    return {
        "base": None,
        "lora": DeviceAdapter(_key("lora"), "lora", 0, lora_slot=1, rank=4),
        "prompt": DeviceAdapter(_key("prompt"), "prompt_tuning", 0, prompt=prompt),
        "prefix": DeviceAdapter(_key("prefix"), "prefix_tuning", 0, prefix=prefix),
        "prefix2": DeviceAdapter(_key("prefix2"), "prefix_tuning", 0, prefix=prefix[:, :, :, :2] * 2),
        "prompt7": DeviceAdapter(_key("prompt7"), "prompt_tuning", 0, prompt=torch.randn(7, config.hidden_size)),
    }


def _rows(model: Any) -> list[PrefillRow]:
    adapters = _adapters(model)
    torch.manual_seed(3)
    # A short prefix row beside longer prompts leaves padding between its prefix and its prompt (compacted).
    # Prefixes of 4 and 2 entries: the shorter one also has padding before it.
    spec = [("base", 5), ("lora", 9), ("prompt", 3), ("prefix", 2), ("prefix", 11), ("lora", 1), ("prefix2", 3),
            ("prompt7", 2)]
    return [PrefillRow(torch.randint(0, 1000, (n,)), adapters[kind]) for kind, n in spec]


def _valid(t: torch.Tensor, row: int, length: int) -> torch.Tensor:
    return t[row, :, t.shape[2] - length:]  # (H_kv, length, D): a row's right-aligned valid entries


def test_batched_prefill_equals_each_row_alone(tiny_model: Any, slots: LoraSlots):
    rows = _rows(tiny_model)
    with torch.inference_mode():
        together = prefill(ModelForward(tiny_model, slots), rows)
        alone = [prefill(ModelForward(tiny_model, slots), [row]) for row in rows]
    assert together.lengths == [a.lengths[0] for a in alone] == [5, 9, 6, 6, 15, 1, 5, 9]
    assert together.mask.shape[1] == max(together.lengths)  # no column is padding in every row
    for i, solo in enumerate(alone):
        n = together.lengths[i]
        assert together.mask[i].tolist() == [0] * (together.mask.shape[1] - n) + [1] * n
        torch.testing.assert_close(together.logits[i], solo.logits[0], atol=ATOL, rtol=0)
        for mine, theirs in zip(together.cache.layers, solo.cache.layers, strict=True):
            torch.testing.assert_close(_valid(mine.keys, i, n), _valid(theirs.keys, 0, n), atol=ATOL, rtol=0)
            torch.testing.assert_close(_valid(mine.values, i, n), _valid(theirs.values, 0, n), atol=ATOL, rtol=0)
    # The adapters matter: the same prompt without its adapter gives other logits.
    bare = prefill(ModelForward(tiny_model, slots), [PrefillRow(row.ids, None) for row in rows[1:]])
    for i in range(len(rows) - 1):
        assert (bare.logits[i] - together.logits[i + 1]).abs().max() > 100 * ATOL


def _nan_for_unattended_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                             scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Attention as some CUDA kernels compute it: a query row with no key to attend to comes out NaN (softmax
    over nothing but -inf), where torch's CPU kernels return zeros."""
    if enable_gqa:  # (B, H_kv, K, D) -> (B, H, K, D)
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scores = query @ key.mT * (scale if scale is not None else query.shape[-1] ** -0.5)  # (B, H, T, K)
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril(scores.shape[-1] - scores.shape[-2])
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1) @ value  # (B, H, T, D)


def test_padding_rows_stay_finite_where_attention_returns_nan_for_them(tiny_model: Any, slots: LoraSlots,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """A left-padded row's padding queries have no key to attend to. Their outputs become the padding's keys
    and values in later layers, which real queries multiply by zero weights: NaN there would spread."""
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _nan_for_unattended_rows)
    rows = _rows(tiny_model)
    with torch.inference_mode():
        together = prefill(ModelForward(tiny_model, slots), rows)
        alone = [prefill(ModelForward(tiny_model, slots), [row]) for row in rows]
    for layer in together.cache.layers:
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
    for i, solo in enumerate(alone):
        torch.testing.assert_close(together.logits[i], solo.logits[0], atol=ATOL, rtol=0)


def test_a_sliding_window_model_keeps_its_window_in_a_padded_prefill():
    """The padding-safe 4-D mask is for full attention only: transformers would apply it to every layer as is."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa")
    model = MistralForCausalLM(config).eval()
    lora = LoraSlots(model, num_slots=1, max_rank=4)
    rows = [PrefillRow(torch.randint(3, 256, (n,)), None) for n in (12, 7)]
    with torch.inference_mode():
        together = prefill(ModelForward(model, lora), rows)
        for i, row in enumerate(rows):
            alone = prefill(ModelForward(model, lora), [row])
            torch.testing.assert_close(together.logits[i], alone.logits[0], atol=ATOL, rtol=0)


def test_rows_prefilled_together_decode_like_rows_prefilled_alone(tiny_model: Any, slots: LoraSlots):
    rows = _rows(tiny_model)
    tokens = torch.tensor([7, 8, 9, 10, 11, 12, 13, 14])
    with torch.inference_mode():
        together, alone = DecodeBatch(torch.device("cpu")), DecodeBatch(torch.device("cpu"))
        out = prefill(ModelForward(tiny_model, slots), rows)
        together.add(out.cache, out.mask, out.lengths)
        for row in rows:
            solo = prefill(ModelForward(tiny_model, slots), [row])
            alone.add(solo.cache, solo.mask, solo.lengths)
        slot_ids = [r.adapter.lora_slot if r.adapter else 0 for r in rows]
        ranks = [r.adapter.rank if r.adapter else 0 for r in rows]
        slots.set_batch(slot_ids, ranks)
        first = together.forward(tiny_model, tokens)  # (B, V)
        second = alone.forward(tiny_model, tokens)
    torch.testing.assert_close(first, second, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("lengths", "budget"),
    [([5, 9, 3, 2, 11, 1], 1024), ([5, 9, 3, 2, 11, 1], 20), ([400, 3, 3], 100), ([], 10), ([7] * 9, 21)],
)
def test_groups_cover_every_row_once_within_the_budget(lengths: list[int], budget: int):
    groups = plan_groups(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= budget or len(group) == 1  # a prompt over the budget goes alone
    if lengths and len(lengths) * max(lengths) <= budget:
        assert len(groups) == 1


def test_groups_put_similar_lengths_together():
    assert plan_groups([100, 2, 100, 3], 200) == [[1, 3], [0, 2]]
    assert plan_groups([7] * 9, 21) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


@pytest.mark.parametrize("kind", ["base", "lora", "prompt", "prefix", "prompt7"])
@pytest.mark.parametrize("budget", [1, 4, 9])
def test_chunked_prefill_equals_one_forward(tiny_model: Any, slots: LoraSlots, kind: str, budget: int):
    torch.manual_seed(4)
    row = PrefillRow(torch.randint(0, 1000, (13,)), _adapters(tiny_model)[kind])
    soft = row.adapter.prompt.shape[0] if row.adapter is not None and row.adapter.prompt is not None else 0
    chunked = ChunkedPrefill(row, budget, soft)
    forwards = 1
    with torch.inference_mode():
        whole = prefill(ModelForward(tiny_model, slots), [row])
        while (out := chunked.advance(ModelForward(tiny_model, slots))) is None:
            forwards += 1
    assert forwards == 1 + -(-(13 - max(1, budget - soft)) // budget)  # the first chunk shares the soft prompt
    assert out.lengths == whole.lengths and out.mask.shape == whole.mask.shape and bool(out.mask.all())
    # Chunks change the matmul shapes (one-token chunks run as GEMVs), hence float32 rounding: values of this random
    # model reach ~50, and one-token chunks differ from the whole forward by up to 6e-5 of a value on some CPUs.
    torch.testing.assert_close(out.logits, whole.logits, atol=ATOL, rtol=1e-4)
    for mine, theirs in zip(out.cache.layers, whole.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, atol=ATOL, rtol=1e-4)


def test_chunks_after_the_first_write_into_one_buffer(tiny_model: Any, slots: LoraSlots):
    torch.manual_seed(5)
    chunked = ChunkedPrefill(PrefillRow(torch.randint(0, 1000, (20,)), None), 4)
    storage: list[int] = []
    with torch.inference_mode():
        while chunked.advance(ModelForward(tiny_model, slots)) is None:
            assert chunked._done is not None
            storage.append(chunked._done.cache.layers[0].keys.data_ptr())
    # The first chunk's entries are copied once, at the second chunk, into room for the whole prompt.
    assert len(storage) == 4 and len(set(storage[1:])) == 1


@pytest.mark.parametrize(("prompt", "budget"), [(20, 4), (21, 4), (9, 8), (1000, 256)])
def test_chunked_prefill_reserves_no_more_than_the_prompt(tiny_model: Any, slots: LoraSlots, prompt: int,
                                                          budget: int):
    """What the cache budget (server/engine/cache_budget.py) assumes: a chunked row's cache holds its prompt, plus at
    most one spare column, not a further chunk."""
    torch.manual_seed(6)
    chunked = ChunkedPrefill(PrefillRow(torch.randint(0, 1000, (prompt,)), None), budget)
    with torch.inference_mode():
        while (done := chunked.advance(ModelForward(tiny_model, slots))) is None:
            pass
    for layer in done.cache.layers:
        buffer = layer._key_buffer if layer._key_buffer is not None else layer.keys
        assert prompt <= buffer.shape[2] <= prompt + 1


def test_oldest_group_can_skip_a_prompt_that_needs_chunks():
    assert oldest_group([50, 3, 4], 10) == [0]  # the oldest request, alone and over the budget
    assert oldest_group([50, 3, 4], 10, fitting=True) == [1, 2]
    assert oldest_group([50], 10, fitting=True) is None
    assert oldest_group([], 10) is None
