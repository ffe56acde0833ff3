"""LoRA (Hu et al., 2021): low-rank deltas on linears, held in a preallocated device slot and applied per row
inside the linears (server/engine/lora/); nothing added to the prompt or the cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from quiver.adapters.classifier_head import split_head
from quiver.adapters.peft_config import LoraSpec, read_peft_config
from quiver.adapters.safetensors_check import load_safetensors
from quiver.server.engine.kinds.base import AdapterKind, HostTensors
from quiver.server.engine.lora.slots import lora_pairs

if TYPE_CHECKING:
    from quiver.adapters.metadata import AdapterMetadata

WEIGHTS_FILE = "adapter_model.safetensors"


class Lora(AdapterKind):
    name: ClassVar[str] = "lora"
    uses_lora_slot: ClassVar[bool] = True

    def load_host(self, path: Path) -> HostTensors:
        _, tensors = split_head(load_safetensors(path / WEIGHTS_FILE))  # a SEQ_CLS adapter's head is not LoRA
        spec = read_peft_config(path).spec
        assert isinstance(spec, LoraSpec), "validated at registration"
        return tensors, {module: spec.scaling_for(module) for module in lora_pairs(tensors)}

    def virtual_tokens(self, metadata: AdapterMetadata) -> int:
        return 0
