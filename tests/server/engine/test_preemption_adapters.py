"""Preemption on the real default model (fp32, greedy) with every adapter kind: a mixed batch of LoRA, soft-prompt,
prefix and base rows under a key/value budget far too small for all of them at once. Rows are preempted and
resume by recomputing, soft prompt or prefix included; every row's tokens must still equal PEFT's `generate`.
"""

from __future__ import annotations

import queue
from typing import Any

import pytest
import torch

from quiver.adapters.store import StoredAdapter
from quiver.server.config import EngineConfig
from quiver.server.engine.cache_budget import CacheBudget, position_bytes
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.engine.request import virtual_tokens

from . import test_adapter_equivalence as equivalence
from .test_adapter_equivalence import BASE_PROMPTS, MAX_NEW, PROMPTS, _ids, _submit, _tokens

# That module's fixtures: the adapters, their store, the model (per device) and PEFT's tokens.
adapters, stored, loaded, references = (
    equivalence.adapters, equivalence.stored, equivalence.loaded, equivalence.references
)

pytestmark = pytest.mark.real_model


def test_preempted_rows_of_every_kind_resume_and_equal_peft(
    loaded: Any, stored: dict[str, StoredAdapter], references: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch
):
    model, tokenizer = loaded.model, loaded.tokenizer
    # Base rows first: preemption takes the newest rows, so the adapters' rows are the ones taken out, the
    # rank-64 LoRA first (the soft prompt's row is the longest: once it is out, the rest may fit).
    order = [*BASE_PROMPTS, "lora-r4", "lora-r16", "prompt", "prefix", "lora-r64"]
    rows = {name: (PROMPTS[name], stored[name]) if name in stored else (name, None) for name in order}
    starts = [len(_ids(tokenizer, text)) + virtual_tokens(adapter) for text, adapter in rows.values()]
    config = EngineConfig(max_lora_rank=64, preempt=True, cache_block_tokens=4)
    budget = CacheBudget(0, position_bytes(model.config, torch.float32), config.cache_block_tokens)
    # All seven rows fit after their prefill and one more token; by their last tokens, at most four do.
    config.max_cache_bytes = budget.batch_bytes([max(starts) + 1] * len(rows))
    assert budget.batch_bytes([max(starts) + MAX_NEW] * 5) > config.max_cache_bytes
    engine = Engine(model, tokenizer, loaded.eos_token_ids, config)
    taken_out: set[str] = set()
    preempt = engine._scheduler._preempt

    def recording(batch: Any, decode: list[Any]) -> list[Any]:
        out = preempt(batch, decode)  # the running rows taken out of this step's decode
        taken_out.update(_kind(row) for row in out)
        return out

    monkeypatch.setattr(engine._scheduler, "_preempt", recording)
    engine.start()
    try:
        pending: dict[str, queue.Queue[GenerationEvent]] = {
            name: _submit(engine, tokenizer, text, adapter) for name, (text, adapter) in rows.items()
        }
        results = {name: _tokens(events) for name, events in pending.items()}
    finally:
        engine.stop()
    assert taken_out >= {"lora", "prompt_tuning", "prefix_tuning"}
    assert results == references


def _kind(seq: Any) -> str:
    adapter = seq.request.adapter
    return "base" if adapter is None else str(adapter.metadata.kind)
