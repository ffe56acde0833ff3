"""The LoRA backend seam: the math of y += (x A^T) B^T for every row's slot, behind one interface.

Slot storage (slots.py) and the per-forward mapping (mapping.py) are shared; how the low-rank update is
computed is a backend's business, chosen once when the engine starts (`--lora-backend`):

- `torch`: gathers each row's A and B out of the stacks and runs batched matmuls (torch_backend.py); the CPU
  path, with a cache of the gathered weights across decode steps.
- `triton`: shrink (x A^T) and expand (h B^T) kernels that read the stacks by slot index, per token at a
  decode step and per segment at a prefill, with no gathered copies (triton_backend.py; Punica's BGMV/SGMV).
- `auto`: triton on CUDA when it is installed, else torch.

A backend asked for by name that cannot run here fails at start-up with the reason; none is picked by an
import that happens to fail.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Protocol

import torch

from quiver.server.engine.lora.mapping import LoraMapping

log = logging.getLogger(__name__)

class SlotStacks(Protocol):
    """One wrapped linear's slots, as a backend sees them."""

    lora_A: torch.Tensor
    """(S + 1, R, in): A of each slot, rank-padded with zeros; slot 0 is all zeros."""
    lora_B: torch.Tensor
    """(S + 1, R, out): (scale * B)^T of each slot, rank-padded with zeros."""
    scratch: dict[str, object]
    """The backend's own per-layer state (the torch backend's gathered weights); empty at first."""


class LoraBackend(Protocol):
    """Adds every row's LoRA term to a wrapped linear's output."""

    name: str

    def add_lora(self, out: torch.Tensor, x: torch.Tensor, slots: SlotStacks, mapping: LoraMapping) -> None:
        """out (B, T, out) += x (B, T, in) @ A[s]^T @ B[s]^T for each row's slot s (rows with slot 0: nothing),
        in place; out and x are the base linear's output and input, B and T as in `mapping`."""
        ...


class BackendUnavailable(RuntimeError):
    """The LoRA backend asked for cannot run on this machine; the message says why."""


def _torch_backend(device: torch.device) -> LoraBackend:
    from quiver.server.engine.lora.torch_backend import TorchLoraBackend

    return TorchLoraBackend()


def _triton_backend(device: torch.device) -> LoraBackend:
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailable("--lora-backend triton needs the triton package (pip install triton)")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable(
            f"--lora-backend triton runs its kernels on CUDA devices, not on {device.type} (Triton's interpreter, "
            "TRITON_INTERPRET=1, runs them on a CPU for tests)"
        )
    from quiver.server.engine.lora.triton_backend import TritonLoraBackend

    return TritonLoraBackend()


BACKENDS: dict[str, Callable[[torch.device], LoraBackend]] = {"torch": _torch_backend, "triton": _triton_backend}


def choose_backend(choice: str, device: torch.device) -> LoraBackend:
    """The backend for `choice` on `device`, logged; BackendUnavailable when it was named and cannot run."""
    if choice == "auto":
        triton_ok = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        choice = "triton" if triton_ok else "torch"
        if device.type == "cuda" and not triton_ok:
            log.warning("LoRA backend: torch on CUDA, as triton is not installed (pip install triton)")
    factory = BACKENDS.get(choice)
    if factory is None:
        raise BackendUnavailable(f"unknown LoRA backend {choice!r}; choose from {['auto', *BACKENDS]}")
    backend = factory(device)
    log.info("LoRA backend: %s", backend.name)
    return backend
