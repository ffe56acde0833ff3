"""Prepacked oneDNN linears: same outputs as nn.Linear, only plain fp32 CPU linears packed, restored exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quiver.server.cpu_linear import PackedLinear, PackedLinears, can_pack

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
    hooked = nn.Linear(8, 8)
    hooked.register_forward_hook(lambda module, args, out: out)  # a packed forward would skip it
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), _Subclassed(8, 8), hooked, nn.ReLU())
    before = list(model)
    assert [can_pack(m) for m in before] == [True, False, False, False, False]
    packed = PackedLinears(model)
    assert packed.paths == ["0"]
    assert isinstance(model[0], PackedLinear) and model[0].base_layer is before[0]
    assert model[0].weight is before[0].weight and model[0].bias is before[0].bias
    assert packed.extra_bytes == before[0].weight.nbytes
    assert list(model)[1:] == before[1:]
    packed.unpack()
    packed.unpack()  # idempotent
    assert list(model) == before
