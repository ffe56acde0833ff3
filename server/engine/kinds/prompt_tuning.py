"""Prompt tuning (Lester et al., 2021) and P-tuning's saved prompts: a soft prompt of virtual-token embeddings
placed before the row's prompt embeddings in its prefill."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from quiver.adapters.safetensors_check import load_safetensors
from quiver.server.engine.kinds.base import AdapterKind, HostTensors, PrefillParts

if TYPE_CHECKING:
    from quiver.server.engine.adapter_tiers import DeviceAdapter

WEIGHTS_FILE = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"


class PromptTuning(AdapterKind):
    name: ClassVar[str] = "prompt_tuning"
    tensor_field: ClassVar[str | None] = "prompt"
    soft_prompt: ClassVar[bool] = True

    def load_host(self, path: Path) -> HostTensors:
        return {"prompt": load_safetensors(path / WEIGHTS_FILE)[PROMPT_KEY]}, {}  # (P, H)

    def parts(self, adapter: DeviceAdapter) -> PrefillParts:
        return PrefillParts(soft=adapter.prompt)
