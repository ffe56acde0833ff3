"""Prefix tuning (Li & Liang, 2021): per-layer key/value entries at the start of the row's cache (derived once at
registration, adapters/prefix.py), so the prompt's positions start after them, as PEFT places them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from quiver.adapters.prefix import PREFIX_FILE, PREFIX_KEY
from quiver.adapters.safetensors_check import load_safetensors
from quiver.server.engine.kinds.base import AdapterKind, HostTensors, PrefillParts

if TYPE_CHECKING:
    from quiver.server.engine.adapter_tiers import DeviceAdapter


class PrefixTuning(AdapterKind):
    name: ClassVar[str] = "prefix_tuning"
    tensor_field: ClassVar[str | None] = "prefix"

    def load_host(self, path: Path) -> HostTensors:
        return {"prefix": load_safetensors(path / PREFIX_FILE)[PREFIX_KEY]}, {}  # (L, 2, H_kv, P, D)

    def parts(self, adapter: DeviceAdapter) -> PrefillParts:
        return PrefillParts(prefix=adapter.prefix)
