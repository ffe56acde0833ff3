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
