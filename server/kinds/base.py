"""What every adapter kind provides (server/kinds/__init__.py has the registry)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from quiver.adapters.metadata import AdapterMetadata
    from quiver.server.adapter_tiers import DeviceAdapter

HostTensors = tuple[dict[str, torch.Tensor], dict[str, float]]  # tensors by name, LoRA scalings by module path


@dataclass(frozen=True)
class PrefillParts:
    """What a kind adds to a row's prefill forward."""

    soft: torch.Tensor | None = None  # (P, H) embeddings placed before the prompt's
    prefix: torch.Tensor | None = None  # (L, 2, H_kv, P, D) cache entries placed before everything


class AdapterKind:
    """One adapter method. Kinds whose weights are one device tensor (not a LoRA slot) name it in `tensor_field`
    of `DeviceAdapter`."""

    name: ClassVar[str]
    uses_lora_slot: ClassVar[bool] = False  # held in the preallocated LoRA stacks, else in the tensor budget
    tensor_field: ClassVar[str | None] = None  # DeviceAdapter's field holding the kind's one device tensor

    def load_host(self, path: Path) -> HostTensors:
        """The kind's tensors, read from a stored version's directory (safetensors only)."""
        raise NotImplementedError

    def parts(self, adapter: DeviceAdapter) -> PrefillParts:
        """What a row using `adapter` adds to its prefill."""
        return PrefillParts()

    def virtual_tokens(self, metadata: AdapterMetadata) -> int:
        """Positions the adapter adds to a row's cache before its prompt."""
        return metadata.num_virtual_tokens or 0
