"""Classification rows: a SEQ_CLS adapter's body (LoRA or soft prompt) and its head, per row, give the label
probabilities of PEFT's AutoPeftModelForSequenceClassification, alone and in one batch with generation and
embedding rows of other adapters."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from quiver.adapters.base_spec import base_spec_from_checkpoint
from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
from quiver.adapters.store import LocalAdapterStore, StoredAdapter
from quiver.adapters.validation import ValidationLimits
from quiver.server.config import EngineConfig, ModelConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.engine.pooling import EmbedSpec
from quiver.server.engine.request import GenerationRequest
from quiver.server.engine.sampling import SamplingParams

from ...adapters.adapter_factory import load_peft_classifier, make_classifier, make_lora

LABELS = {"lora": 3, "prompt": 5}
INPUTS = [(5, 17, 42, 99, 7), (8, 9), tuple(range(3, 40))]


@pytest.fixture(scope="module")
def made(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("made")
    return {m: make_classifier(base_dir, out / m, m, num_labels=n, seed=i) for i, (m, n) in enumerate(LABELS.items())}


@pytest.fixture(scope="module")
def stored(base_dir: Path, made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, StoredAdapter]:
    registry = AdapterRegistry(LocalAdapterStore(tmp_path_factory.mktemp("store")), base_spec_from_checkpoint(base_dir),
                               ValidationLimits())
    out = {m: registry.register(path, RegistrationOptions(name=f"cls-{m}")) for m, path in made.items()}
    generator = make_lora(base_dir, tmp_path_factory.mktemp("gen") / "lora", r=4, seed=9)
    out["generator"] = registry.register(generator, RegistrationOptions(name="gen"))
    return out


@pytest.fixture(scope="module")
def engine(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    from quiver.server.model.model_loader import load_base_model

    loaded = load_base_model(ModelConfig(model=str(base_dir), device="cpu", quantize="none",
                                         cache_dir=str(tmp_path_factory.mktemp("cache"))))
    eng = Engine(loaded.model, loaded.tokenizer, frozenset(), EngineConfig(max_lora_rank=8, max_prefill_tokens=16))
    eng.start()
    yield eng
    eng.stop()


def reference(made: dict[str, Path], method: str, ids: tuple[int, ...]) -> torch.Tensor:
    model = load_peft_classifier(made[method], LABELS[method])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].softmax(dim=-1)


def submit(engine: Engine, ids: tuple[int, ...], adapter: StoredAdapter | None, spec: EmbedSpec | None,
           max_new: int = 0) -> queue.Queue[GenerationEvent]:
    events: queue.Queue[GenerationEvent] = queue.Queue()
    engine.submit(GenerationRequest(ids, SamplingParams(), max_new, (), adapter, embed=spec), events.put)
    return events


def output(events: queue.Queue[GenerationEvent]) -> torch.Tensor:
    while True:
        event = events.get(timeout=60)
        assert event.error is None, event.error
        if event.finish_reason is not None:
            assert event.embedding is not None
            return event.embedding


@pytest.mark.parametrize("method", list(LABELS))
def test_label_probabilities_equal_peft(engine: Engine, made: dict[str, Path], stored: dict[str, Any],
                                        method: str):
    for ids in INPUTS:  # the last one is prefilled in chunks
        got = output(submit(engine, ids, stored[method], EmbedSpec.classification()))
        assert got.shape == (LABELS[method],) and abs(float(got.sum()) - 1) < 1e-5
        torch.testing.assert_close(got, reference(made, method, ids), rtol=1e-4, atol=1e-5)


def test_classification_rows_share_a_batch_with_generation_and_embedding_rows(
        engine: Engine, made: dict[str, Path], stored: dict[str, Any]):
    generating = submit(engine, INPUTS[0], stored["generator"], None, max_new=24)
    embedding = submit(engine, INPUTS[1], stored["lora"], EmbedSpec())
    classified = {m: submit(engine, INPUTS[i], stored[m], EmbedSpec.classification()) for i, m in enumerate(LABELS)}
    for i, (method, events) in enumerate(classified.items()):
        torch.testing.assert_close(output(events), reference(made, method, INPUTS[i]), rtol=1e-4, atol=1e-5)
    assert output(embedding).shape == (64,)  # the hidden size: an embedding, not probabilities
    tokens = 0
    while (event := generating.get(timeout=60)).finish_reason is None:
        tokens += len(event.token_ids)
    assert tokens + len(event.token_ids) == 24


def test_heads_are_counted_outside_the_tensor_budget_and_given_back(base_dir: Path, stored: dict[str, Any],
                                                                     tmp_path: Path):
    from quiver.server.engine.adapter_tiers import DeviceAdapters, load_host_adapter
    from quiver.server.engine.lora.slots import LoraSlots
    from quiver.server.engine.pooling import ClassifierHead
    from quiver.server.model.model_loader import load_base_model

    model = load_base_model(ModelConfig(model=str(base_dir), device="cpu", quantize="none",
                                        cache_dir=str(tmp_path / "cache"))).model
    slots = LoraSlots(model, num_slots=1, max_rank=8)
    try:
        device = DeviceAdapters(slots, max_bytes=1 << 30, device=torch.device("cpu"), dtype=torch.float32)
        lora_host, prompt_host = load_host_adapter(stored["lora"]), load_host_adapter(stored["prompt"])
        head_bytes = 3 * 64 * 4  # 3 labels x hidden 64, float32
        entry = device.acquire(lora_host)
        assert entry is not None and entry.head is not None and device.nbytes == slots.slot_bytes + head_bytes
        device.release(entry)
        prompt = device.acquire(prompt_host)  # a prompt-tuning classifier: its tensor in the budget, its head beside
        assert prompt is not None and prompt.head is not None
        assert device.nbytes == slots.slot_bytes + head_bytes + prompt.nbytes + 5 * 64 * 4
        assert device._tensor_bytes == prompt.nbytes  # heads take nothing from the prompt/prefix budget
        device.release(prompt)
        original = ClassifierHead.of
        ClassifierHead.of = classmethod(lambda cls, *a: (_ for _ in ()).throw(MemoryError("head")))  # type: ignore
        try:
            other = load_host_adapter(stored["generator"])
            assert device.acquire(other) is not None  # no head: unaffected; the LoRA one was evicted for it
            device.release(device.lookup(other.key))  # type: ignore[arg-type]
            with pytest.raises(MemoryError):
                device.acquire(lora_host)  # evicts `generator`, then the head's copy fails ...
            assert device.slots_used == 0  # ... and the slot it took is free again
        finally:
            ClassifierHead.of = original  # type: ignore[method-assign]
        assert device.acquire(lora_host) is not None and device.slots_used == 1
    finally:
        slots.unwrap()
