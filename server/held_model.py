"""The base model as an engine holds it: target linears wrapped for batched LoRA, CPU linears prepacked.

An engine rewires the model's modules in place while it runs and gives them back when it stops, so one model
serves one engine at a time, and a failure while rewiring leaves the model as it was.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from quiver.server.config import EngineConfig
from quiver.server.cpu_linear import PackedLinear, PackedLinears
from quiver.server.lora import BatchedLoraLinear, LoraSlots, slot_bytes

log = logging.getLogger(__name__)


class HeldModel:
    """LoRA slots over `model`'s target linears, then (on a CPU) its plain fp32 linears prepacked; `release`
    undoes both."""

    def __init__(self, model: Any, config: EngineConfig, dtype: torch.dtype) -> None:
        if any(isinstance(m, (BatchedLoraLinear, PackedLinear)) for m in model.modules()):
            raise ValueError("the model is in use by another engine: stop that engine first")
        self.lora = _lora_slots(model, config, dtype)
        try:
            # After the LoRA wrappers exist, so their base layers are packed too.
            self._packed = PackedLinears(model) if config.pack_cpu_weights else None
        except BaseException:
            self.lora.unwrap()
            raise
        if self._packed is not None and self._packed.paths:
            log.info("%d linears prepacked for oneDNN (%.0f MiB host copies)", len(self._packed.paths),
                     self._packed.extra_bytes / 2**20)

    @property
    def packed_bytes(self) -> int:
        """Host memory of the prepacked weight copies (0 once released)."""
        return self._packed.extra_bytes if self._packed is not None else 0

    def release(self) -> None:
        """Give the model its original modules back; idempotent."""
        if self._packed is not None:
            self._packed.unpack()  # before unwrapping: packed linears sit inside the LoRA wrappers
        self.lora.unwrap()


def _lora_slots(model: Any, config: EngineConfig, dtype: torch.dtype) -> LoraSlots:
    """As many LoRA slots as the device adapter budget holds beside slot 0 (all zeros, for rows without a LoRA),
    at most `max_lora_slots`, at least one."""
    per_slot = slot_bytes(model, config.max_lora_rank, dtype)
    if not per_slot:
        raise ValueError(f"{type(model).__name__} has no linear layer to wrap for LoRA")
    fit = config.max_device_adapter_bytes // per_slot - 1
    slots = max(1, min(config.max_lora_slots, fit))
    if fit < 1:
        log.warning("--max-device-adapter-bytes (%d) holds less than one LoRA slot of rank %d besides slot 0; "
                    "using one slot (%d bytes with slot 0), which leaves no room for prompts and prefixes",
                    config.max_device_adapter_bytes, config.max_lora_rank, 2 * per_slot)
    log.info("LoRA: %d device slots of rank %d (%.1f MiB each, %.1f MiB with slot 0)", slots, config.max_lora_rank,
             per_slot / 2**20, per_slot * (slots + 1) / 2**20)
    return LoraSlots(
        model, num_slots=slots, max_rank=config.max_lora_rank, dtype=dtype, gather_bytes=config.max_lora_gather_bytes
    )
