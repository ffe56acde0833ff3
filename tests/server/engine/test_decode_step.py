"""The plain-torch decode step against transformers' forward, and the choice between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from quiver.common.quantization import quantization_config
from quiver.server.config import EngineConfig
from quiver.server.engine import decode_step
from quiver.server.engine.batch import DecodeBatch
from quiver.server.engine.decode_step import decode_step_for, llama_step, transformers_step
from quiver.server.engine.engine import Engine
from quiver.server.engine.lora.slots import LoraSlots
from quiver.server.engine.model_forward import ModelForward
from quiver.server.engine.prefill import PrefillRow, prefill
from quiver.server.platform.cpu_linear import PackedLinears

from .test_engine import request, run, tokens_of

_DIMS: dict[str, Any] = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 128,
}
FAMILIES = {
    "llama-gqa": lambda: LlamaForCausalLM(LlamaConfig(**_DIMS, num_key_value_heads=2)),
    "llama-mha": lambda: LlamaForCausalLM(LlamaConfig(**_DIMS, num_key_value_heads=4, attention_bias=True)),
    "llama-one-kv-head": lambda: LlamaForCausalLM(LlamaConfig(**_DIMS, num_key_value_heads=1)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_DIMS, num_key_value_heads=2, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_DIMS, num_key_value_heads=2)),  # q/k/v with bias
}


def random_lora(slots: LoraSlots, slot: int, rank: int) -> None:
    """Load a random LoRA of `rank` on every wrapped module into `slot`."""
    tensors, scalings = {}, {}
    for path, wrapper in slots._wrappers.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, wrapper.in_features) / 4
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(wrapper.out_features, rank) / 4
        scalings[path] = 2.0
    slots.load(slot, tensors, scalings)


def _batch(model: Any, slots: LoraSlots, step: Any, lengths: tuple[int, ...]) -> DecodeBatch:
    """Rows of these prompt lengths (left-padded when they differ), prefilled with their LoRA slots."""
    torch.manual_seed(1)
    rows = [PrefillRow(torch.randint(0, 256, (n,)), None) for n in lengths]
    slots.set_batch([2, 1, 0, 0], [4, 8, 0, 0], transient=True)
    out = prefill(ModelForward(model, slots), rows)
    batch = DecodeBatch(torch.device("cpu"), 4, step)
    batch.add(out.cache, out.mask, out.lengths)
    return batch


@pytest.mark.parametrize("lengths", [(3, 9, 5, 7), (6, 6, 6, 6)], ids=["padded", "unpadded"])
@pytest.mark.parametrize("packed", [False, True], ids=["plain-linears", "packed-linears"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.inference_mode()
def test_plain_step_equals_transformers_forward_bit_for_bit(
    family: str, packed: bool, lengths: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    assert decode_step_for(model) is llama_step
    slots = LoraSlots(model, num_slots=2, max_rank=8)
    random_lora(slots, 1, 8)
    random_lora(slots, 2, 4)
    if packed:
        PackedLinears(model)
    _assert_steps_equal(model, slots, lengths)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@torch.inference_mode()
def test_plain_step_equals_transformers_forward_over_a_quantized_base(scheme: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    FAMILIES["llama-gqa"]().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=quantization_config(scheme, torch.float32),
        device_map="cpu",
    ).eval()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    assert decode_step_for(model) is llama_step
    slots = LoraSlots(model, num_slots=2, max_rank=8)
    random_lora(slots, 1, 8)
    random_lora(slots, 2, 4)
    _assert_steps_equal(model, slots, (3, 9, 5, 7))


def _assert_steps_equal(model: Any, slots: LoraSlots, lengths: tuple[int, ...]) -> None:
    """Decode the same rows (LoRA slots 2, 1, then base) through both steps: equal logits at every step."""
    theirs, ours = _batch(model, slots, transformers_step, lengths), _batch(model, slots, llama_step, lengths)
    assert bool(ours.mask.all()) == (len(set(lengths)) == 1)  # the unpadded case takes the step's unmasked path
    tokens = torch.randint(0, 256, (4,))
    for i in range(12):  # past one growth block, and rows leaving on the way
        if i == 6:
            theirs.keep([0, 1, 3])
            ours.keep([0, 1, 3])
            tokens = tokens[[0, 1, 3]]
        slots.set_batch([2, 1, 0, 0][: len(tokens)], [4, 8, 0, 0][: len(tokens)])
        expected, got = theirs.forward(model, tokens), ours.forward(model, tokens)
        assert torch.equal(got, expected), f"step {i}: max difference {(got - expected).abs().max()}"
        tokens = expected.argmax(-1)
    assert ours.lengths == theirs.lengths


def test_models_outside_the_registry_or_its_conditions_use_transformers_forward() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=1, n_head=4, n_positions=64))
    windowed = MistralForCausalLM(MistralConfig(**_DIMS, num_key_value_heads=2, sliding_window=4))
    llama = FAMILIES["llama-gqa"]()
    # transformers takes attn_implementation through **kwargs, which its stubs do not declare.
    eager = LlamaForCausalLM(LlamaConfig(**_DIMS, num_key_value_heads=2, attn_implementation="eager"))  # type: ignore[call-arg]
    wide_heads = LlamaForCausalLM(LlamaConfig(**_DIMS, num_key_value_heads=2, head_dim=512))

    class Subclassed(LlamaForCausalLM):
        """Stands for a class of the same name with other internals."""

    assert decode_step_for(gpt2) is transformers_step
    assert decode_step_for(windowed) is transformers_step
    assert decode_step_for(eager) is transformers_step  # the step runs sdpa
    assert decode_step_for(wide_heads) is transformers_step  # transformers' sdpa repeats keys above 256
    assert decode_step_for(Subclassed(LlamaConfig(**_DIMS))) is transformers_step
    assert decode_step_for(llama, plain=False) is transformers_step
    assert decode_step_for(llama) is llama_step
    handle = llama.model.layers[0].register_forward_hook(lambda *args: None)
    assert decode_step_for(llama) is transformers_step  # the hook would be bypassed
    handle.remove()
    assert decode_step_for(llama) is llama_step


@pytest.mark.parametrize("plain", [True, False])
def test_engine_decodes_through_the_step_its_config_names(
    tiny_model: Any, text_tokenizer: Any, monkeypatch: pytest.MonkeyPatch, plain: bool
) -> None:
    calls = {"plain": 0, "transformers": 0}

    def counting(name: str, step: Any) -> Any:
        def run(*args: Any) -> torch.Tensor:
            calls[name] += 1
            logits: torch.Tensor = step(*args)
            return logits
        return run

    monkeypatch.setitem(decode_step._STEPS, LlamaForCausalLM, counting("plain", llama_step))
    monkeypatch.setattr(decode_step, "transformers_step", counting("transformers", transformers_step))
    engine = Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig(plain_decode_step=plain))
    engine.start()
    try:
        generated = tokens_of(run(engine, request(text_tokenizer, "Hello there", max_new_tokens=4)))
    finally:
        engine.stop()
    assert len(generated) == 4
    assert calls == ({"plain": 3, "transformers": 0} if plain else {"plain": 0, "transformers": 3})
