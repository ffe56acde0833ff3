"""Batched multi-LoRA: slot storage (slots.py), the per-forward row-to-slot mapping (mapping.py) and the math
behind a backend seam (backend.py: torch_backend.py for CPUs, triton_backend.py for GPUs)."""
