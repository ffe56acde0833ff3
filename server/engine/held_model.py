"""The base model as an engine holds it: target linears wrapped for batched LoRA, then the platform's own
preparation of the weights (on a CPU, prepacked linears: server/platform/).

An engine rewires the model's modules in place while it runs and gives them back when it stops, so one model
serves one engine at a time, and a failure while rewiring leaves the model as it was.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from quiver.server.config import EngineConfig
from quiver.server.engine.lora.backend import choose_backend
from quiver.server.engine.lora.slots import BatchedLoraLinear, LoraSlots, slot_bytes
from quiver.server.platform.base import Platform
from quiver.server.platform.cpu_linear import PackedLinear

log = logging.getLogger(__name__)


class HeldModel:
    """LoRA slots over `model`'s target linears, then the platform's weights (on a CPU, its plain fp32 linears
    prepacked); `release` undoes both."""

    def __init__(self, model: Any, config: EngineConfig, dtype: torch.dtype, platform: Platform) -> None:
        if any(isinstance(m, (BatchedLoraLinear, PackedLinear)) for m in model.modules()):
            raise ValueError("the model is in use by another engine: stop that engine first")
        self.lora = _lora_slots(model, config, dtype)
        try:
            # After the LoRA wrappers exist, so their base layers are prepared too.
            self._weights = platform.hold_weights(model, config)
        except BaseException:
            self.lora.unwrap()
            raise
        self._released = False

    @property
    def packed_bytes(self) -> int:
        """Memory of the platform's copies of the base weights (0 once released)."""
        return 0 if self._released else self._weights.extra_bytes

    def release(self) -> None:
        """Give the model its original modules back; idempotent."""
        if not self._released:
            self._weights.release()  # before unwrapping: packed linears sit inside the LoRA wrappers
            self._released = True
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
    backend = choose_backend(config.lora_backend, next(model.parameters()).device)
    return LoraSlots(
        model, num_slots=slots, max_rank=config.max_lora_rank, dtype=dtype, gather_bytes=config.max_lora_gather_bytes,
        backend=backend,
    )
