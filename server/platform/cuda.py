"""The CUDA platform: weights as loaded (bitsandbytes or plain), every sampled row drawn at once; host values
reach the device through page-locked memory without blocking (uploads.py), so a decode step synchronises once,
when the sampled tokens are read back."""

from __future__ import annotations

from typing import ClassVar

import torch

from quiver.server.platform.base import PLATFORMS, Platform


class CudaPlatform(Platform):
    name: ClassVar[str] = "cuda"
    sampler_rows_per_draw: ClassVar[int | None] = None

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        # From pageable memory torch would synchronise the stream; page-locked memory lets the copy queue.
        return host.pin_memory().to(device, non_blocking=True)

    def synchronize(self, device: torch.device) -> None:
        # Only where a metric times a forward: the step synchronises anyway when it reads the sampled tokens back.
        torch.cuda.synchronize(device)


PLATFORMS["cuda"] = CudaPlatform()