"""Quiver's batched adapters equal PEFT, the reference path, on the real default model (fp32, greedy), on the
CPU and, where there is one, on a CUDA device (where the padded batched prefill runs through the GPU kernels).

Each adapter alone, then all of them at once in one mixed batch with base-only rows: the tokens must equal
`PeftModel.generate` for the same adapter and prompt (and plain `generate` for base rows).
"""

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
from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.engine.request import GenerationRequest
from quiver.server.engine.sampling import SamplingParams

from ...adapters.adapter_factory import load_peft_model, make_lora, make_prefix_tuning, make_prompt_tuning
from ...real_models import RealModels
from ..devices import DEVICES

pytestmark = pytest.mark.real_model

MAX_NEW = 12
PROMPTS = {
    "lora-r4": "The capital of France is",
    "lora-r16": "def add(a, b):",
    "lora-r64": "Once upon a time",
    "prompt": "My favourite fruit is",
    "prefix": "The weather today is",
}
BASE_PROMPTS = ["Water boils at", "The three primary colors are"]


@pytest.fixture(scope="module")
def adapters(default_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("made")
    return {
        "lora-r4": make_lora(default_checkpoint, out / "r4", r=4, target_modules=("q_proj", "v_proj"), seed=1),
        "lora-r16": make_lora(default_checkpoint, out / "r16", r=16, target_modules="all-linear", seed=2),
        "lora-r64": make_lora(default_checkpoint, out / "r64", r=64, use_rslora=True,
                              target_modules=("o_proj", "down_proj"), seed=3),
        "prompt": make_prompt_tuning(default_checkpoint, out / "prompt", num_virtual_tokens=6, seed=4),
        "prefix": make_prefix_tuning(default_checkpoint, out / "prefix", num_virtual_tokens=5, seed=5),
    }


@pytest.fixture(scope="module")
def stored(adapters: dict[str, Path], default_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, StoredAdapter]:
    store = LocalAdapterStore(tmp_path_factory.mktemp("store"))
    registry = AdapterRegistry(store, base_spec_from_checkpoint(default_checkpoint), ValidationLimits())
    return {name: registry.register(path, RegistrationOptions(name=name)) for name, path in adapters.items()}


@pytest.fixture(scope="module", params=DEVICES)
def loaded(request: pytest.FixtureRequest, real_models: RealModels) -> Any:
    return real_models.get(device=request.param)


@pytest.fixture(scope="module")
def engine(loaded: Any) -> Iterator[Engine]:
    eng = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, EngineConfig(max_lora_rank=64))
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def references(adapters: dict[str, Path], default_checkpoint: Path, loaded: Any) -> dict[str, list[int]]:
    """PEFT's greedy tokens for every adapter, and plain generate for the base prompts."""
    out = {}
    for name, path in adapters.items():
        model = load_peft_model(default_checkpoint, path).to(loaded.model.device)
        out[name] = _generate(model, loaded.tokenizer, PROMPTS[name], loaded.eos_token_ids)
    for prompt in BASE_PROMPTS:
        out[prompt] = _generate(loaded.model, loaded.tokenizer, prompt, loaded.eos_token_ids)
    return out


def _ids(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _generate(model: Any, tokenizer: Any, prompt: str, eos: frozenset[int]) -> list[int]:
    ids = torch.tensor([_ids(tokenizer, prompt)], device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=False, eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
    return list(out[0, ids.shape[1]:].tolist())


def _submit(engine: Engine, tokenizer: Any, prompt: str, adapter: StoredAdapter | None) -> queue.Queue[GenerationEvent]:
    events: queue.Queue[GenerationEvent] = queue.Queue()
    request = GenerationRequest(tuple(_ids(tokenizer, prompt)), SamplingParams(), MAX_NEW, (), adapter)
    engine.submit(request, events.put)
    return events


def _tokens(events: queue.Queue[GenerationEvent]) -> list[int]:
    tokens: list[int] = []
    while True:
        event = events.get(timeout=120)
        assert event.error is None, event.error
        tokens.extend(event.token_ids)
        if event.finish_reason is not None:
            return tokens


@pytest.mark.parametrize("name", list(PROMPTS))
def test_each_adapter_alone_equals_peft(engine: Engine, loaded: Any, stored: dict[str, StoredAdapter],
                                        references: dict[str, list[int]], name: str):
    tokens = _tokens(_submit(engine, loaded.tokenizer, PROMPTS[name], stored[name]))
    assert tokens == references[name]


def test_mixed_batch_equals_peft(engine: Engine, loaded: Any, stored: dict[str, StoredAdapter],
                                 references: dict[str, list[int]]):
    # Adapters differ from the base (otherwise equality would prove nothing).
    base_only = {name: _tokens(_submit(engine, loaded.tokenizer, PROMPTS[name], None)) for name in PROMPTS}
    assert all(base_only[name] != references[name] for name in PROMPTS)
    pending = {name: _submit(engine, loaded.tokenizer, PROMPTS[name], stored[name]) for name in PROMPTS}
    pending |= {prompt: _submit(engine, loaded.tokenizer, prompt, None) for prompt in BASE_PROMPTS}
    results = {name: _tokens(events) for name, events in pending.items()}
    assert results == references
