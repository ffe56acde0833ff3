"""Devices the engine tests run on: the CPU always, CUDA as well where a GPU is present (marker `gpu`)."""

from __future__ import annotations

import pytest
import torch

CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    id="cuda",
)
DEVICES = ["cpu", CUDA]


def lora_backend_device(backend: str) -> torch.device:
    """Where a test of `backend` runs its LoRA math: the triton backend on CUDA where there is one (compiled
    kernels), else on the CPU in Triton's interpreter (tests/__init__.py); the torch backend on the CPU."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
