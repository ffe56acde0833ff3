"""Quiver's tests.

Without a CUDA device the Triton LoRA kernels run in Triton's interpreter, on CPU tensors. `triton.jit` reads
TRITON_INTERPRET when a function is defined, and transformers imports triton (and with it triton.language's
own jitted functions) on its first import, so the variable is set here, before any test module or conftest
imports anything. With a CUDA device the kernels are compiled, as in serving.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
