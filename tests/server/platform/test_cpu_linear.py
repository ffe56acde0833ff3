"""Prepacked oneDNN linears: same outputs as nn.Linear, only plain fp32 CPU linears packed, restored exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quiver.server.engine.lora.slots import LoraSlots
from quiver.server.platform.cpu_linear import PackedLinear, PackedLinears, can_pack

from ..engine.test_decode_step import random_lora

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


class _Attention(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 24, bias), nn.Linear(16, 8, bias), nn.Linear(16, 8, bias)
        self.o_proj = nn.Linear(24, 16, bias)


@pytest.mark.parametrize("bias", [True, False])
@torch.inference_mode()
def test_siblings_share_one_packed_weight_and_each_gets_its_own_output(bias: bool):
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": _Attention(bias), "mlp": nn.ModuleDict(
        {"gate_proj": nn.Linear(16, 32, bias), "up_proj": nn.Linear(16, 32, bias), "down_proj": nn.Linear(32, 16)})})
    plain = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    PackedLinears(model)
    packed = {name: model.get_submodule(name) for name in plain}
    shared = {name for name, m in packed.items() if isinstance(m, PackedLinear) and m._shared is not None}
    assert shared == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
    x = torch.randn(3, 2, 16)
    for order in (["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.v_proj", "attn.q_proj", "attn.k_proj"]):
        for name in order:
            out = packed[name](x)
            torch.testing.assert_close(out, plain[name](x), rtol=1e-5, atol=1e-5)
            out.add_(1000.0)  # a LoRA wrapper adds into its part in place: no sibling, no later call, sees it
    again = packed["attn.q_proj"](x)  # the same sibling twice for one input: computed anew
    torch.testing.assert_close(again, plain["attn.q_proj"](x), rtol=1e-5, atol=1e-5)
    y = torch.randn(3, 2, 16)  # a new input while k and v of x are pending: they are dropped, not handed out
    torch.testing.assert_close(packed["attn.k_proj"](y), plain["attn.k_proj"](y), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed["mlp.up_proj"](x), plain["mlp.up_proj"](x), rtol=1e-5, atol=1e-5)


def test_incomplete_or_mismatched_sibling_groups_are_packed_one_by_one():
    attn = _Attention(False)
    attn.k_proj = nn.Linear(16, 8, bias=True)  # mixed biases
    mlp = nn.ModuleDict({"gate_proj": nn.Linear(16, 32), "down_proj": nn.Linear(32, 16)})  # no up_proj
    model = nn.ModuleDict({"attn": attn, "mlp": mlp})
    PackedLinears(model)
    assert all(m._shared is None for m in model.modules() if isinstance(m, PackedLinear))


@torch.inference_mode()
def test_lora_wrapped_siblings_share_a_pack_and_the_model_output_is_unchanged():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 5))
    slots = LoraSlots(model, num_slots=1, max_rank=4, target_leaf_names={"q_proj", "v_proj", "up_proj"})
    random_lora(slots, 1, 4)
    slots.set_batch([1, 0], [4, 0])  # row 0 with the LoRA, added in place into its shared parts
    expected = model(input_ids=ids).logits
    packed = PackedLinears(model)
    attn = model.model.layers[0].self_attn
    q, k = attn.q_proj.base_layer, attn.k_proj  # a wrapper's base layer and a bare linear, one group
    assert isinstance(q, PackedLinear) and isinstance(k, PackedLinear)
    assert q._shared is not None and k._shared is not None and q._shared[0] is k._shared[0]
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    slots.set_batch([0, 0], [0, 0])
    assert not torch.allclose(model(input_ids=ids).logits[0], expected[0], rtol=1e-4, atol=1e-4)  # LoRA mattered
    assert packed.extra_bytes == sum(m.base_layer.weight.nbytes for m in model.modules() if isinstance(m, PackedLinear))
    packed.unpack()
    slots.unwrap()
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
