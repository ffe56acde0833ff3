"""On nf4 and int8 bases (bitsandbytes on CPU), Quiver's next-token logits for LoRA, soft-prompt and prefix
adapters match PEFT over the same quantized base.

Both paths call the same quantized base layers and differ only in how the adapter term is computed (batched
slot stacks vs PEFT's per-adapter modules), i.e. in float32 rounding of that term. The stated tolerances:
- nf4 (weights only quantized): max |Δlogit| ≤ 1e-3 and the same top-1 token.
- int8 (LLM.int8 also quantizes every layer's activations at run time, per token): a rounding-level change of
  an activation can move it across an int8 step, and that amplifies through 30 layers. Measured on CPU: relative
  L2 distance to PEFT ~0.15, while int8 itself moves the logits ~0.6 (relative L2) away from the fp32 model.
  Tolerance: relative L2 ≤ 0.25 and the same top-5 tokens in the same order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from quiver.adapters.base_spec import base_spec_from_checkpoint
from quiver.adapters.registry import AdapterRegistry, RegistrationOptions
from quiver.adapters.store import LocalAdapterStore, StoredAdapter
from quiver.adapters.validation import ValidationLimits
from quiver.server.engine.adapter_tiers import DeviceAdapters, load_host_adapter
from quiver.server.engine.lora.slots import LoraSlots
from quiver.server.engine.model_forward import ModelForward
from quiver.server.engine.prefill import PrefillRow, prefill

from ...adapters.adapter_factory import make_lora, make_prefix_tuning, make_prompt_tuning
from ...real_models import RealModels
from ..devices import DEVICES

pytestmark = pytest.mark.real_model

ATOL = 1e-3


def _nf4_close(ours: torch.Tensor, peft: torch.Tensor) -> bool:
    return (ours - peft).abs().max().item() <= ATOL and bool(ours.argmax() == peft.argmax())


def _int8_close(ours: torch.Tensor, peft: torch.Tensor) -> bool:
    relative = ((ours - peft).norm() / peft.norm()).item()
    return relative <= 0.25 and ours.topk(5).indices.tolist() == peft.topk(5).indices.tolist()


CLOSE = {"nf4": _nf4_close, "int8": _int8_close}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def stored(default_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, StoredAdapter]]:
    out = tmp_path_factory.mktemp("made")
    made = {
        "lora": make_lora(default_checkpoint, out / "lora", r=16, target_modules="all-linear", seed=1),
        "prompt": make_prompt_tuning(default_checkpoint, out / "prompt", num_virtual_tokens=4, seed=2),
        "prefix": make_prefix_tuning(default_checkpoint, out / "prefix", num_virtual_tokens=4, seed=3),
    }
    registry = AdapterRegistry(LocalAdapterStore(out / "store"), base_spec_from_checkpoint(default_checkpoint),
                               ValidationLimits())
    return {name: (path, registry.register(path, RegistrationOptions(name=name))) for name, path in made.items()}


@pytest.mark.parametrize("device_name", DEVICES)
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_adapter_logits_match_peft_on_quantized_base(scheme: str, device_name: str, real_models: RealModels,
                                                     stored: dict[str, tuple[Path, StoredAdapter]]):
    # float32 compute on every device (CUDA's default is bfloat16), so the stated tolerances apply.
    loaded = real_models.get(scheme, device_name)
    assert loaded.info.quantization == scheme
    model = loaded.model
    on = next(model.parameters()).device
    ids = loaded.tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"].to(on)  # (1, T)
    ours: dict[str, torch.Tensor] = {}
    slots = LoraSlots(model, num_slots=1, max_rank=16)
    device = DeviceAdapters(slots, max_bytes=2**30, device=on, dtype=torch.float32)
    try:
        with torch.inference_mode():
            for name, (_, adapter) in stored.items():
                entry = device.acquire(load_host_adapter(adapter))
                assert entry is not None
                ours[name] = prefill(ModelForward(model, slots), [PrefillRow(ids[0], entry)]).logits[0]
                device.release(entry)
            slots.set_batch([0], [0])
            base = model(input_ids=ids).logits[0, -1].float()
    finally:
        slots.unwrap()  # the same quantized weights now serve as PEFT's base
    for name, (adapter_dir, _) in stored.items():
        # PEFT cannot hold adapters of different types at once: wrap, compare, then take the base back.
        peft: Any = PeftModel.from_pretrained(model, adapter_dir)
        with torch.inference_mode():
            expected = peft(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
        model = peft.unload() if name == "lora" else peft.get_base_model()
        assert CLOSE[scheme](ours[name], expected), name
        assert (base - expected).abs().max().item() > 10 * ATOL, f"{name} should change the output"
