"""Adapter kinds as classes: each kind is one module that knows how its tensors load into host memory, where they
live on the device (a LoRA slot, or a tensor of its own), what it adds to a row's prefill and how many positions
it takes before the prompt. A new kind is a new module and one entry in `KINDS`; no other file switches on kinds.
"""

from __future__ import annotations

from quiver.server.engine.kinds.base import AdapterKind, PrefillParts
from quiver.server.engine.kinds.lora import Lora
from quiver.server.engine.kinds.prefix_tuning import PrefixTuning
from quiver.server.engine.kinds.prompt_tuning import PromptTuning

# A stored adapter's `metadata.kind` -> its kind.
KINDS: dict[str, AdapterKind] = {kind.name: kind for kind in (Lora(), PromptTuning(), PrefixTuning())}

__all__ = ["KINDS", "AdapterKind", "PrefillParts"]
