"""What every adapter kind provides (server/engine/kinds/__init__.py has the registry)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from quiver.adapters.metadata import AdapterMetadata
    from quiver.server.engine.adapter_tiers import DeviceAdapter

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
    soft_prompt: ClassVar[bool] = False  # its virtual tokens are computed by the prefill forward (embeddings)

    def load_host(self, path: Path) -> HostTensors:
        """The kind's tensors, read from a stored version's directory (safetensors only)."""
        raise NotImplementedError

    def parts(self, adapter: DeviceAdapter) -> PrefillParts:
        """What a row using `adapter` adds to its prefill."""
        return PrefillParts()

    def virtual_tokens(self, metadata: AdapterMetadata) -> int:
        """Positions the adapter adds to a row's cache before its prompt: the one count of them."""
        return metadata.num_virtual_tokens or 0

    def prefill_positions(self, metadata: AdapterMetadata) -> int:
        """Of those, the positions a row's prefill forward computes: a soft prompt's (a prefix's are given)."""
        return self.virtual_tokens(metadata) if self.soft_prompt else 0
