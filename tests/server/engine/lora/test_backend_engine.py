"""Each LoRA backend through the whole engine, against PEFT: greedy tokens of a mixed batch on a tiny Llama.

The batch mixes LoRA adapters of different ranks and targets, prompt tuning, and base rows, all submitted at
once, so prefill groups hold several segments, base rows sit between LoRA rows (the engine keeps rows in
arrival order), and decode steps run the per-token path. The triton backend runs in Triton's interpreter
without CUDA (tests/__init__.py) and compiled with it (marker `gpu`).
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
from quiver.server.config import EngineConfig, ModelConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.generation_events import GenerationEvent
from quiver.server.engine.request import GenerationRequest
from quiver.server.engine.sampling import SamplingParams

from ....adapters.adapter_factory import load_base, load_peft_model, make_lora, make_prompt_tuning
from ...devices import lora_backend_device
from ..test_adapter_equivalence import _tokens

MAX_NEW = 6
# (adapter or None for the base, prompt token ids): submitted in this order.
ROWS: list[tuple[str | None, tuple[int, ...]]] = [
    ("r2-qv", (5, 17, 42, 99, 7)),
    (None, (8, 9, 10)),
    ("r8-all", (11, 12, 13, 14, 15, 16, 17)),
    ("r8-all", (30, 31)),
    ("prompt", (40, 41, 42, 43)),
    ("r5-mlp", (50, 51, 52, 53, 54, 55)),
    (None, (60, 61, 62, 63, 64, 65, 66, 67)),
    ("r2-qv", (70, 71, 72)),
]


@pytest.fixture(scope="module")
def adapters(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("made")
    return {
        "r2-qv": make_lora(base_dir, out / "r2", r=2, lora_alpha=64, target_modules=("q_proj", "v_proj"), seed=1),
        "r8-all": make_lora(base_dir, out / "r8", r=8, target_modules="all-linear", use_rslora=True, seed=2),
        "r5-mlp": make_lora(base_dir, out / "r5", r=5, lora_alpha=80, target_modules=("up_proj", "down_proj"), seed=3),
        "prompt": make_prompt_tuning(base_dir, out / "prompt", num_virtual_tokens=3, seed=4),
    }


@pytest.fixture(scope="module")
def stored(base_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, StoredAdapter]:
    registry = AdapterRegistry(LocalAdapterStore(tmp_path_factory.mktemp("store")), base_spec_from_checkpoint(base_dir),
                               ValidationLimits())
    return {name: registry.register(path, RegistrationOptions(name=name)) for name, path in adapters.items()}


def _generate(model: Any, prompt: tuple[int, ...]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                   min_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
    return list(generated[0, len(prompt):].tolist())


@pytest.fixture(scope="module")
def references(base_dir: Path, adapters: dict[str, Path]) -> list[list[int]]:
    """PEFT's (or the plain base's) greedy tokens for every row."""
    return [_generate(load_base(base_dir) if name is None else load_peft_model(base_dir, adapters[name]), prompt)
            for name, prompt in ROWS]


def test_the_adapters_change_the_tokens(base_dir: Path, references: list[list[int]]):
    """The LoRA rows' tokens differ from the base's, so the engine's equality with PEFT below could fail."""
    base = load_base(base_dir)
    for (name, prompt), expected in zip(ROWS, references, strict=True):
        if name is not None and name.startswith("r"):
            assert _generate(base, prompt) != expected, name


@pytest.fixture(params=["torch", pytest.param("triton", marks=[pytest.mark.gpu] if torch.cuda.is_available() else [])])
def engine(request: pytest.FixtureRequest, base_dir: Path, tmp_path: Path) -> Iterator[Engine]:
    from quiver.server.model.model_loader import load_base_model

    device = lora_backend_device(request.param)
    loaded: Any = load_base_model(ModelConfig(model=str(base_dir), device=device.type, quantize="none",
                                              dtype="float32", cache_dir=str(tmp_path / "cache")))
    eng = Engine(loaded.model, loaded.tokenizer, frozenset(),
                 EngineConfig(max_lora_rank=8, max_lora_slots=4, lora_backend=request.param))
    assert eng.lora.backend.name == request.param
    eng.start()
    yield eng
    eng.stop()


def test_mixed_batch_equals_peft(engine: Engine, stored: dict[str, StoredAdapter], references: list[list[int]]):
    pending = []
    for name, prompt in ROWS:
        events: queue.Queue[GenerationEvent] = queue.Queue()
        request = GenerationRequest(prompt, SamplingParams(), MAX_NEW, (), None if name is None else stored[name])
        engine.submit(request, events.put)
        pending.append(events)
    assert [_tokens(events) for events in pending] == references
