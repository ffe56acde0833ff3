"""Base linears on a CPU with their weights prepacked once for oneDNN, as CPU serving stacks do.

torch's default CPU matmul (MKL sgemm) handles the engine's shapes poorly: a decode step multiplies a few rows
by each weight, and for the default model's vocabulary projection 8 rows took 3x one row. oneDNN's linear over
a weight reordered ahead of time into its blocked layout does the same math 1.2-2x faster at 1-32 rows and
also for prefill (bench/README.md). The reorder is a copy: the original linears stay inside the packed ones
(same parameters, tied embeddings still tied; state dict keys gain a ".base_layer") and come back on `unpack`.
The copy is a snapshot: the engine's base weights are frozen while it holds them.

Only plain fp32 nn.Linear modules on a CPU without hooks (accelerate's device-map hooks among them) are
packed. Outputs equal torch's to fp32 rounding (the order of the additions differs), which the engine's tests
against PEFT cover.
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack(module: nn.Module) -> bool:
    """A plain (not quantized: bitsandbytes' layers subclass nn.Linear) fp32 linear on a CPU, without hooks a
    packed forward would bypass."""
    if type(module) is not nn.Linear or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
        return False
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32


class PackedLinear(nn.Module):
    """`base_layer`'s forward through oneDNN with a prepacked copy of its weight."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer  # holds the parameters; put back by PackedLinears.unpack
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        # An opaque oneDNN tensor: a plain attribute, so it is never saved, moved or counted as a parameter.
        self._packed = torch.ops.mkldnn._reorder_linear_weight(base_layer.weight.detach())

    @property
    def weight(self) -> torch.Tensor:
        """The original weight (e.g. for get_output_embeddings().weight)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self._packed, self.base_layer.bias, "none", [], "")
        return out  # (..., out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked"


class PackedLinears:
    """Every packable linear of a model replaced by a PackedLinear, until `unpack`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.paths = [path for path, module in model.named_modules() if can_pack(module)]
        for path in self.paths:
            model.set_submodule(path, PackedLinear(model.get_submodule(path)))  # type: ignore[arg-type]

    @property
    def extra_bytes(self) -> int:
        """Host memory the packed copies take."""
        return sum(_packed(self.model, path).base_layer.weight.nbytes for path in self.paths)

    def unpack(self) -> None:
        """Put the original linears back; idempotent."""
        for path in self.paths:
            self.model.set_submodule(path, _packed(self.model, path).base_layer)
        self.paths = []


def _packed(model: nn.Module, path: str) -> PackedLinear:
    module = model.get_submodule(path)
    assert isinstance(module, PackedLinear), f"{path} is no longer packed"
    return module

