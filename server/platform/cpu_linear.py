"""Base linears on a CPU with their weights prepacked once for oneDNN, as CPU serving stacks do.

torch's default CPU matmul (MKL sgemm) handles the engine's shapes poorly: a decode step multiplies a few rows by each
weight, and its time grows with the rows far sooner than the arithmetic does. oneDNN's linear over a weight reordered
ahead of time into its blocked layout does the same math faster at every batch size the engine runs, prefill included
(bench/README.md, "What bounds a step"). The reorder is a copy: the original linears stay inside the packed ones (same
parameters, tied embeddings still tied; state dict keys gain a ".base_layer") and come back on `unpack`. The copy is a
snapshot: the engine's base weights are frozen while it holds them.

Linears that always read the same input (a layer's q/k/v projections, an MLP's gate and up) are packed as one
weight, stacked along the outputs: the first of them to see an input computes all their outputs in one GEMM
and the others take their part of it. One call instead of three reads the input once and pays oneDNN's
fixed cost per call once (docs/engine.md, "On a CPU", has the measurements).

Only plain fp32 nn.Linear modules on a CPU without hooks (accelerate's device-map hooks among them) are
packed. Outputs equal torch's to fp32 rounding (the order of the additions differs), which the engine's tests
against PEFT cover.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Leaf names of linears that read the same input in every architecture that has them (Llama-style layers).
SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def can_pack(module: nn.Module) -> bool:
    """A plain (not quantized: bitsandbytes' layers subclass nn.Linear) fp32 linear on a CPU, without hooks a
    packed forward would bypass."""
    if type(module) is not nn.Linear or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
        return False
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # An opaque oneDNN tensor: kept as a plain attribute, so it is never saved, moved or counted as a parameter.
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    return packed


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out  # (..., out_features)


class SharedPack:
    """One packed weight for sibling linears (same input, same bias presence): their weights stacked along the
    outputs. The first sibling to see an input computes every sibling's part; each part is handed out once.
    Siblings must see the very same input tensor, unchanged in between, as transformers' layers give them."""

    def __init__(self, layers: Sequence[nn.Linear]) -> None:
        self._packed = _pack(torch.cat([layer.weight.detach() for layer in layers]))  # (sum out, in)
        biases = [layer.bias for layer in layers]
        self._bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])
        self._sizes = [layer.out_features for layer in layers]
        # The input of the last GEMM (held, so its identity cannot be reused) and the parts not yet taken.
        self._pending: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Sibling `index`'s output for `x` (..., in) -> (..., out_index)."""
        pending = self._pending
        if pending is None or pending[0] is not x or pending[1][index] is None:
            # Contiguous parts: callers (the LoRA wrappers) add into them in place.
            parts: list[torch.Tensor | None] = [
                p.contiguous() for p in _linear(x, self._packed, self._bias).split(self._sizes, dim=-1)
            ]
            pending = (x, parts)
        out = pending[1][index]
        assert out is not None
        pending[1][index] = None  # taken: the taker may change it in place, so a second call computes anew
        self._pending = pending if any(p is not None for p in pending[1]) else None
        return out


class PackedLinear(nn.Module):
    """`base_layer`'s forward through oneDNN with a prepacked copy of its weight, or with its part of a
    SharedPack."""

    def __init__(self, base_layer: nn.Linear, shared: tuple[SharedPack, int] | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer  # holds the parameters; put back by PackedLinears.unpack
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self._shared = shared
        self._packed = _pack(base_layer.weight) if shared is None else None

    @property
    def weight(self) -> torch.Tensor:
        """The original weight (e.g. for get_output_embeddings().weight)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._shared is not None:
            return self._shared[0].part(x, self._shared[1])
        assert self._packed is not None
        return _linear(x, self._packed, self.base_layer.bias)  # (..., out_features)

    def extra_repr(self) -> str:
        shared = ", weight shared with its siblings" if self._shared is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked{shared}"


class PackedLinears:
    """Every packable linear of a model replaced by a PackedLinear, until `unpack`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.paths = [path for path, module in model.named_modules() if can_pack(module)]
        shared = _shared_packs(model, self.paths)
        for path in self.paths:
            model.set_submodule(path, PackedLinear(model.get_submodule(path), shared.get(path)))  # type: ignore[arg-type]

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


def _shared_packs(model: nn.Module, paths: Sequence[str]) -> dict[str, tuple[SharedPack, int]]:
    """Path -> (its SharedPack, its index) for every complete group of SIBLINGS among `paths` (a LoRA wrapper's
    base layer, "...q_proj.base_layer", counts as its wrapper's name)."""
    by_role = {_role(path): path for path in paths}
    shared: dict[str, tuple[SharedPack, int]] = {}
    for role in by_role:
        owner, _, leaf = role.rpartition(".")
        names = next((group for group in SIBLINGS if group[0] == leaf), ())
        prefix = f"{owner}." if owner else ""
        members = [by_role[prefix + name] for name in names if prefix + name in by_role]
        if not names or len(members) != len(names):
            continue
        layers = [model.get_submodule(path) for path in members]
        if len({(m.in_features, m.bias is None) for m in layers if isinstance(m, nn.Linear)}) != 1:
            continue  # different inputs or mixed biases: not siblings after all
        pack = SharedPack([m for m in layers if isinstance(m, nn.Linear)])
        shared.update({path: (pack, i) for i, path in enumerate(members)})
    return shared


def _role(path: str) -> str:
    return path.removesuffix(".base_layer")
