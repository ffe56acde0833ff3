"""An engine's hold on the model: LoRA wrappers and prepacked linears while it runs, the originals after."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.held_model import HeldModel
from quiver.server.engine.lora.slots import slot_bytes
from quiver.server.platform import cpu as cpu_platform
from quiver.server.platform.cpu import CpuPlatform
from quiver.server.platform.cpu_linear import PackedLinear

CPU = CpuPlatform()


def _linears(model: nn.Module) -> dict[str, type]:
    return {path: type(m) for path, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
def test_the_engine_packs_while_it_runs_and_gives_the_model_back(tiny_model: Any, text_tokenizer: Any):
    before = dict(tiny_model.named_modules())
    engine = Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig())
    try:
        packed = [path for path, kind in _linears(tiny_model).items() if kind is PackedLinear]
        # Every linear, the LoRA wrappers' base layers and the output head included.
        assert "lm_head" in packed and any(p.endswith("q_proj.base_layer") for p in packed)
        with pytest.raises(ValueError, match="in use by another engine"):
            Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig())
    finally:
        engine.stop()
        engine.stop()  # a second stop changes nothing
    after = dict(tiny_model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_packing_can_be_turned_off(tiny_model: Any, text_tokenizer: Any):
    engine = Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig(pack_cpu_weights=False))
    try:
        assert PackedLinear not in _linears(tiny_model).values()
    finally:
        engine.stop()


def test_a_failure_while_packing_leaves_the_model_as_it_was(tiny_model: Any, monkeypatch: pytest.MonkeyPatch):
    before = dict(tiny_model.named_modules())

    def broken(model: Any) -> None:
        raise RuntimeError("simulated packing failure")

    monkeypatch.setattr(cpu_platform, "PackedLinears", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        HeldModel(tiny_model, EngineConfig(), torch.float32, CPU)
    after = dict(tiny_model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_an_engine_that_fails_to_build_leaves_the_model_as_it_was(
    tiny_model: Any, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
):
    from quiver.server.engine import engine as engine_module

    before = dict(tiny_model.named_modules())

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated setup failure")

    monkeypatch.setattr(engine_module, "DeviceAdapters", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig())
    after = dict(tiny_model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def _stack_bytes(model: nn.Module) -> int:
    """Device bytes the LoRA wrappers' slot stacks really take."""
    return sum(b.nbytes for name, b in model.named_buffers() if name.endswith(("lora_A", "lora_B")))


@pytest.mark.parametrize("fit", [2, 3])
def test_lora_slots_and_slot_zero_fit_the_device_budget(tiny_model: Any, fit: int):
    per_slot = slot_bytes(tiny_model, 8, torch.float32)
    config = EngineConfig(max_lora_rank=8, max_lora_slots=16, max_device_adapter_bytes=fit * per_slot + per_slot // 2,
                          max_lora_gather_bytes=fit * per_slot)
    held = HeldModel(tiny_model, config, torch.float32, CPU)
    try:
        assert held.lora.slot_bytes == per_slot  # computed without allocating a slot
        assert held.lora.gather_bytes == config.max_lora_gather_bytes
        assert held.lora.num_slots == fit - 1  # slot 0 is in the stacks too
        assert _stack_bytes(tiny_model) == held.lora.stack_bytes <= config.max_device_adapter_bytes
    finally:
        held.release()
    with pytest.raises(ValueError, match="--max-lora-gather-bytes"):
        EngineConfig(max_lora_gather_bytes=-1)


def test_a_model_without_linear_layers_is_refused_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel  # Conv1D projections, no nn.Linear to wrap

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="no linear layer"):
        HeldModel(model, EngineConfig(), torch.float32, CPU)
