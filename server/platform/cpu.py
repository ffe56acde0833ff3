"""The CPU platform: prepacked (and sibling-fused) fp32 linears, one multi-threaded torch thread, one sampled
row drawn at a time (its (V,) temporaries stay in the caches; a batch's do not)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from quiver.server.config import EngineConfig
from quiver.server.platform.base import PLATFORMS, HeldWeights, NoHeldWeights, Platform
from quiver.server.platform.cpu_linear import PackedLinears
from quiver.server.platform.cpu_threads import claim_for_this_thread

log = logging.getLogger(__name__)


class PackedWeights:
    """The model's packable linears replaced by prepacked ones (PackedLinears) while an engine holds it."""

    def __init__(self, model: Any) -> None:
        self._packed = PackedLinears(model)
        if self._packed.paths:
            log.info("%d linears prepacked for oneDNN (%.0f MiB host copies)", len(self._packed.paths),
                     self._packed.extra_bytes / 2**20)

    @property
    def extra_bytes(self) -> int:
        return self._packed.extra_bytes

    def release(self) -> None:
        self._packed.unpack()


class CpuPlatform(Platform):
    name: ClassVar[str] = "cpu"
    sampler_rows_per_draw: ClassVar[int | None] = 1

    def hold_weights(self, model: Any, config: EngineConfig) -> HeldWeights:
        return PackedWeights(model) if config.pack_cpu_weights else NoHeldWeights()

    def enter_engine_thread(self, config: EngineConfig) -> None:
        claim_for_this_thread(config.threads)


PLATFORMS["cpu"] = CpuPlatform()
