"""Embedding rows: prefill-only rows of the continuous batch, pooled from the decoder's last hidden states, equal to
transformers / PEFT's (`output_hidden_states`, the last entry) for the base and each adapter kind, alone and in
one batch with generation rows, and over chunked prefills of long inputs."""

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
from quiver.server.engine.pooling import EmbedSpec, Pooling
from quiver.server.engine.request import GenerationRequest
from quiver.server.engine.sampling import SamplingParams

from ...adapters.adapter_factory import load_base, load_peft_model, make_lora, make_prefix_tuning, make_prompt_tuning

KINDS = ("base", "lora", "prompt", "prefix")
SHORT = (5, 17, 42, 99, 7, 3, 250)
LONG = tuple((11 * i) % 250 + 3 for i in range(45))  # over the chunk budget below
BUDGET = 16  # max_prefill_tokens: LONG is prefilled in chunks


@pytest.fixture(scope="module")
def adapter_dirs(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("made")
    return {
        "lora": make_lora(base_dir, out / "lora", r=4, target_modules="all-linear", seed=1),
        "prompt": make_prompt_tuning(base_dir, out / "prompt", num_virtual_tokens=5, seed=2),
        "prefix": make_prefix_tuning(base_dir, out / "prefix", num_virtual_tokens=3, prefix_projection=True, seed=3),
    }


@pytest.fixture(scope="module")
def stored(base_dir: Path, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, StoredAdapter | None]:
    registry = AdapterRegistry(LocalAdapterStore(tmp_path_factory.mktemp("store")), base_spec_from_checkpoint(base_dir),
                               ValidationLimits())
    out: dict[str, StoredAdapter | None] = {"base": None}
    out.update({k: registry.register(path, RegistrationOptions(name=k)) for k, path in adapter_dirs.items()})
    return out


@pytest.fixture(scope="module")
def engine(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    from quiver.server.model.model_loader import load_base_model

    loaded = load_base_model(ModelConfig(model=str(base_dir), device="cpu", quantize="none",
                                         cache_dir=str(tmp_path_factory.mktemp("cache"))))
    eng = Engine(loaded.model, loaded.tokenizer, frozenset(), EngineConfig(max_lora_rank=8, max_prefill_tokens=BUDGET))
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def references(base_dir: Path, adapter_dirs: dict[str, Path]) -> dict[str, Any]:
    models: dict[str, Any] = {"base": load_base(base_dir).eval()}
    models.update({k: load_peft_model(base_dir, path) for k, path in adapter_dirs.items()})
    return models


def reference(model: Any, kind: str, ids: tuple[int, ...], spec: EmbedSpec) -> torch.Tensor:
    """The pooled last hidden states transformers / PEFT give, over the input's own tokens."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    states = out.hidden_states[-1][0]  # (virtual + T, H) for a soft prompt, (T, H) otherwise
    states = states[-len(ids):]  # the input's own tokens: a soft prompt's positions precede them
    vector = states.mean(dim=0) if spec.pooling is Pooling.MEAN else states[-1]
    return torch.nn.functional.normalize(vector, dim=0) if spec.normalize else vector


def submit(engine: Engine, ids: tuple[int, ...], adapter: StoredAdapter | None, spec: EmbedSpec | None,
           max_new: int = 6) -> queue.Queue[GenerationEvent]:
    events: queue.Queue[GenerationEvent] = queue.Queue()
    request = GenerationRequest(ids, SamplingParams(), 0 if spec else max_new, (), adapter, embed=spec)
    engine.submit(request, events.put)
    return events


def last_event(events: queue.Queue[GenerationEvent]) -> GenerationEvent:
    while True:
        event = events.get(timeout=60)
        assert event.error is None, event.error
        if event.finish_reason is not None:
            return event


def embedding(events: queue.Queue[GenerationEvent]) -> torch.Tensor:
    event = last_event(events)
    assert event.embedding is not None and event.token_ids == () and event.completion_tokens == 0
    return event.embedding


SPECS = [EmbedSpec(Pooling.MEAN, False), EmbedSpec(Pooling.LAST, False), EmbedSpec(Pooling.MEAN, True)]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_alone_equals_the_reference(engine: Engine, stored: dict[str, Any], references: dict[str, Any],
                                              kind: str):
    for spec in SPECS:
        for ids in (SHORT, LONG):
            got = embedding(submit(engine, ids, stored[kind], spec))
            torch.testing.assert_close(got, reference(references[kind], kind, ids, spec), rtol=1e-4, atol=1e-4)


def test_mixed_with_generation_rows_in_one_batch(engine: Engine, stored: dict[str, Any], references: dict[str, Any]):
    spec = EmbedSpec(Pooling.MEAN, True)
    generating = [submit(engine, SHORT, stored[k], None, max_new=20) for k in KINDS]
    embedding_rows = {k: submit(engine, SHORT[: 3 + i], stored[k], spec) for i, k in enumerate(KINDS)}
    for i, (kind, events) in enumerate(embedding_rows.items()):
        expected = reference(references[kind], kind, SHORT[: 3 + i], spec)
        torch.testing.assert_close(embedding(events), expected, rtol=1e-4, atol=1e-4)
    for k, events in zip(KINDS, generating, strict=True):
        tokens: list[int] = []
        while (event := events.get(timeout=60)).finish_reason is None:
            tokens += event.token_ids
        tokens += event.token_ids
        with torch.no_grad():  # the generation rows are unchanged by the embedding rows beside them
            want = references[k].generate(input_ids=torch.tensor([SHORT]), attention_mask=torch.ones(1, len(SHORT)),
                                          max_new_tokens=20, do_sample=False, min_new_tokens=20)
        assert tokens == want[0, len(SHORT):].tolist(), k
    assert engine.num_running == 0 and engine.num_waiting == 0
