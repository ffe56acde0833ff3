"""The platform: everything device-specific the engine needs, behind one interface chosen once at start-up.

The engine core has no device branches; it asks its platform (`platform_for(device)`, logged when an engine
starts) to
- prepare the base weights it holds (on a CPU: fp32 linears prepacked for oneDNN, sibling linears fused into
  one packed weight, server/platform/cpu_linear.py);
- set up the engine thread (on a CPU: its OpenMP and MKL threads claimed, server/platform/cpu_threads.py);
- say how many sampled rows are drawn together (a CPU draws a row at a time, a GPU all at once);
- copy small host values to the device (on CUDA through page-locked memory without blocking, so a step
  never waits for the device: server/platform/uploads.py).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import torch

from quiver.server.config import EngineConfig


class HeldWeights(Protocol):
    """Device-specific copies of the base weights made for one engine; `release` puts the originals back."""

    @property
    def extra_bytes(self) -> int:
        """Memory the copies take beside the model's own weights."""
        ...

    def release(self) -> None: ...


class NoHeldWeights:
    """The model's weights as they are."""

    extra_bytes = 0

    def release(self) -> None:
        pass


class Platform:
    """One device type's specifics; subclasses register in PLATFORMS."""

    name: ClassVar[str]
    sampler_rows_per_draw: ClassVar[int | None] = None
    """Sampled rows warped and drawn together (sampling.sample_next); None: all of them at once."""

    def hold_weights(self, model: Any, config: EngineConfig) -> HeldWeights:
        """Prepare the base weights for this device, after the LoRA wrappers exist (their base layers too)."""
        return NoHeldWeights()

    def enter_engine_thread(self, config: EngineConfig) -> None:
        """Called first on the engine thread, before any torch work there."""

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A small host tensor on `device`, queued behind the device's work (uploads.upload)."""
        return host.to(device)

    def synchronize(self, device: torch.device) -> None:
        """Wait for the device's queued work, so a host clock measures it (a CPU's work is already done)."""


PLATFORMS: dict[str, Platform] = {}  # device type -> its platform (stateless: one instance each)


def platform_for(device: torch.device) -> Platform:
    """The platform of `device`'s type; ValueError for a device type Quiver does not serve on."""
    platform = PLATFORMS.get(device.type)
    if platform is None:
        raise ValueError(f"no Quiver platform for {device.type} devices (have: {sorted(PLATFORMS)})")
    return platform
