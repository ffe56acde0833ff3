"""Prepacked oneDNN linears: same outputs as nn.Linear, only plain fp32 CPU linears packed, restored exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from quiver.server.config import EngineConfig
from quiver.server.cpu_linear import PackedLinear, PackedLinears, can_pack
from quiver.server.engine import Engine

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


class _Subclassed(nn.Linear):
    """Stands for bitsandbytes' quantized layers, which subclass nn.Linear."""


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (8, 24), (3, 5, 24), (2, 0, 24)])
def test_packed_linear_matches_nn_linear(bias: bool, shape: tuple[int, ...]):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        out = PackedLinear(layer)(x)
        assert out.shape == (*shape[:-1], 40)
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_only_plain_fp32_linears_are_packed_and_unpack_restores_the_same_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), _Subclassed(8, 8), nn.ReLU())
    before = list(model)
    assert [can_pack(m) for m in before] == [True, False, False, False]
    packed = PackedLinears(model)
    assert packed.paths == ["0"]
    assert isinstance(model[0], PackedLinear) and model[0].base_layer is before[0]
    assert packed.extra_bytes == before[0].weight.nbytes
    assert list(model)[1:] == before[1:]
    packed.unpack()
    packed.unpack()  # idempotent
    assert list(model) == before


def _linears(model: nn.Module) -> dict[str, type]:
    return {path: type(m) for path, m in model.named_modules() if isinstance(m, (nn.Linear, PackedLinear))}


def test_the_engine_packs_while_it_runs_and_gives_the_model_back(tiny_model: Any, smol_tokenizer: Any):
    before = dict(tiny_model.named_modules())
    engine = Engine(tiny_model, smol_tokenizer, frozenset(), EngineConfig())
    try:
        packed = [path for path, kind in _linears(tiny_model).items() if kind is PackedLinear]
        # Every linear, the LoRA wrappers' base layers and the output head included.
        assert "lm_head" in packed and any(p.endswith("q_proj.base_layer") for p in packed)
        with pytest.raises(ValueError, match="in use by another engine"):
            Engine(tiny_model, smol_tokenizer, frozenset(), EngineConfig())
    finally:
        engine.stop()
    after = dict(tiny_model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_packing_can_be_turned_off(tiny_model: Any, smol_tokenizer: Any):
    engine = Engine(tiny_model, smol_tokenizer, frozenset(), EngineConfig(pack_cpu_weights=False))
    try:
        assert PackedLinear not in _linears(tiny_model).values()
    finally:
        engine.stop()
