"""The running batch's bookkeeping: what each decode step is handed as rows join and leave."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from quiver.server.engine.batch import DecodeBatch, cache_layers
from quiver.server.engine.decode_step import decode_step_for
from quiver.server.engine.lora.slots import LoraSlots
from quiver.server.engine.model_forward import ModelForward
from quiver.server.engine.prefill import PrefillRow, prefill
from quiver.server.engine.sampling import RowSampler, SamplingParams, sample_next
from quiver.server.platform.uploads import select_rows

from .test_decode_step import _DIMS, random_lora

V, LAYERS, HEADS, D = 11, 2, 2, 4


def _prefilled(lengths: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """A cache (B, H, W, D) per layer and its mask (B, W), each row's valid entries right-aligned."""
    width = max(lengths)
    cache = DynamicCache()
    for i in range(LAYERS):
        cache.update(torch.randn(len(lengths), HEADS, width, D), torch.randn(len(lengths), HEADS, width, D), i)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return cache, mask


class RecordingStep:
    """A decode step that appends one entry per row and layer and records what it was handed."""

    def __init__(self) -> None:
        self.positions: list[list[int]] = []
        self.masks: list[torch.Tensor | None] = []

    def __call__(self, model: Any, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: DynamicCache) -> torch.Tensor:
        b = tokens.shape[0]
        self.positions.append(positions[:, 0].tolist())
        self.masks.append(None if mask is None else mask.clone())
        for i in range(LAYERS):
            cache.update(torch.randn(b, HEADS, 1, D), torch.randn(b, HEADS, 1, D), i)
        return torch.zeros(b, V)


def _decode(batch: DecodeBatch) -> None:
    batch.forward(torch.nn.Identity(), torch.zeros(batch.size, dtype=torch.long))
    assert batch.mask.sum(dim=1).tolist() == batch.lengths  # every row's valid entries are `lengths` columns
    assert all(layer.keys.shape[2] == batch.mask.shape[1] for layer in cache_layers(batch.cache))


def test_positions_and_padding_follow_rows_joining_and_leaving() -> None:
    step = RecordingStep()
    batch = DecodeBatch(torch.device("cpu"), block=4, step=step)
    batch.add(*_prefilled([3, 5]), [3, 5])
    _decode(batch)
    _decode(batch)
    batch.add(*_prefilled([7]), [7])  # joins a batch whose longest row has 7 entries: row 0 is still padded
    _decode(batch)
    batch.keep([1, 2])  # the padded row leaves; the others have 8 entries each, so no padding is left
    _decode(batch)
    batch.keep([1])
    _decode(batch)
    assert step.positions == [[3, 5], [4, 6], [5, 7, 7], [8, 8], [9]]
    assert [m is None for m in step.masks] == [False, False, False, True, True]
    padded = step.masks[2]
    assert padded is not None and padded.sum(dim=1).tolist() == [6, 8, 8]  # with the step's new entry


def test_a_batch_without_padding_hands_the_step_no_mask() -> None:
    step = RecordingStep()
    batch = DecodeBatch(torch.device("cpu"), step=step)
    batch.add(*_prefilled([4, 4, 4]), [4, 4, 4])
    _decode(batch)
    batch.keep([2, 0])
    _decode(batch)
    assert step.masks == [None, None]
    assert step.positions == [[4, 4, 4], [5, 5]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.inference_mode()
def test_decode_steps_and_sampling_never_wait_for_the_gpu() -> None:
    """Between two steps' token read-backs nothing synchronises: positions, padding, the LoRA selection, the
    survivors' index and every sampling knob stay on the device or are queued behind its work."""
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(LlamaConfig(**_DIMS, num_key_value_heads=2))
    model = model.cuda().eval()
    slots = LoraSlots(model, num_slots=2, max_rank=8)
    random_lora(slots, 1, 4)
    random_lora(slots, 2, 8)
    rows = [PrefillRow(torch.randint(0, 256, (n,), device="cuda"), None) for n in (3, 9, 5, 7)]
    slot_ids, ranks = [2, 1, 0, 0], [8, 4, 0, 0]
    slots.set_batch(slot_ids, ranks, transient=True)
    out = prefill(ModelForward(model, slots), rows)
    batch = DecodeBatch(torch.device("cuda"), 4, decode_step_for(model))
    batch.add(out.cache, out.mask, out.lengths)
    samplers = [RowSampler(p) for p in (
        SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=1),
        SamplingParams(temperature=1.2, top_p=0.9, repetition_penalty=1.3, seed=2),
        SamplingParams(repetition_penalty=0.9),
    )]
    seen = [row.ids.cpu() for row in rows]
    logits = out.logits
    slots.set_batch(slot_ids, ranks)  # the decode selection's slot ids go up once, here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            tokens = sample_next(logits, samplers, seen)
            slots.set_batch(slot_ids, ranks)
            logits = batch.forward(model, select_rows(tokens, [0, 1, 2, 3]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(logits.isfinite().all()) and batch.lengths == [n + 3 for n in out.lengths]
