"""LoRA slot storage: every target linear wrapped once, with rank-padded stacks of preallocated adapter slots.

LoRA (Hu et al., 2021) adds a low-rank update to a frozen linear: y = W x + s * B A x. Serving many adapters
at once follows S-LoRA (Sheng et al., 2023) and Punica (Chen et al., 2023): the base weights are never merged,
swapped or re-selected; each target linear is wrapped once (BatchedLoraLinear) and every forward adds the LoRA
term of each row's slot, computed by the engine's LoRA backend (backend.py) from one mapping per forward
(mapping.py):

    y[b] = base_layer(x[b]) + (x[b] @ A[s_b]^T) @ B[s_b]^T        s_b = the slot of row b; slot 0 is all zeros

Slots are rank-padded to `max_rank` (ranks above an adapter's own are zero), and each forward uses only the
first `rank` of them, the largest rank in the batch. A slot keeps A as PEFT does, (r, in), and B transposed,
(r, out), with the scale s (alpha / r, or alpha / sqrt(r) with rsLoRA, per module) folded in when the slot is
loaded: a load pays the transpose and the scaling once, the hot path never. `base_layer` may be an nn.Linear
or a bitsandbytes Linear4bit / Linear8bitLt (both subclass nn.Linear); the LoRA math runs in the slots' dtype.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from quiver.adapters.base_spec import EMBEDDING_LEAF_NAMES
from quiver.server.config import LORA_GATHER_BYTES
from quiver.server.engine.lora.backend import LoraBackend
from quiver.server.engine.lora.mapping import LoraMapping, build_mapping
from quiver.server.engine.lora.torch_backend import TorchLoraBackend

# PEFT's LoRA keys: "base_model.model.<module path>.lora_A.weight" (".lora_A.default.weight" also occurs).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])(?:\.default)?\.weight$")


class LoraState:
    """What every wrapper of one model reads at its forward: the backend, and this forward's mapping."""

    def __init__(self, backend: LoraBackend) -> None:
        self.backend = backend
        self.mapping: LoraMapping | None = None
        """The mapping of the next forward; None: no row uses LoRA (wrappers return their base output)."""


class BatchedLoraLinear(nn.Module):
    """A base linear plus rank-padded LoRA slot stacks; one forward serves rows with different adapters."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor

    def __init__(
        self, base_layer: nn.Module, *, num_slots: int, max_rank: int, dtype: torch.dtype, state: LoraState
    ) -> None:
        super().__init__()
        assert isinstance(base_layer, nn.Linear), "bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear"
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.state = state
        device = _layer_device(base_layer)
        slots = num_slots + 1  # slot 0: no LoRA, always zeros
        # Buffers, not parameters: never trained, never in named_parameters(), not saved with the model.
        self.register_buffer(
            "lora_A", torch.zeros(slots, max_rank, self.in_features, dtype=dtype, device=device), persistent=False
        )  # (S+1, max_rank, in): A per slot
        self.register_buffer(
            "lora_B", torch.zeros(slots, max_rank, self.out_features, dtype=dtype, device=device), persistent=False
        )  # (S+1, max_rank, out): (scale * B)^T per slot
        self.scratch: dict[str, Any] = {}  # the backend's own per-layer state (SlotStacks.scratch)
        self.targeted: set[int] = set()  # slots whose adapter targets this linear (the others are zeros here)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, out)
        mapping = self.state.mapping
        # A batch whose adapters all leave this linear alone (q/v-only LoRAs at an MLP) adds only zeros: skip it.
        if mapping is not None and not self.targeted.isdisjoint(mapping.slots):
            self.state.backend.add_lora(out, x, self, mapping)
        return out

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Fill `slot` with A (r, in) and B (out, r) scaled by `scale`, zero above rank r; None: zeros."""
        r = 0 if a is None or b is None else a.shape[0]
        # Write each element once: the adapter's part, then zeros above its rank (cold loads are copy-bound).
        if r < self.lora_A.shape[1]:
            self.lora_A[slot, r:].zero_()  # (max_rank - r, in)
            self.lora_B[slot, r:].zero_()  # (max_rank - r, out)
        if a is None or b is None:
            self.targeted.discard(slot)
            return
        self.targeted.add(slot)
        self.lora_A[slot, :r].copy_(a)  # (r, in), contiguous; copy_ also crosses devices and dtypes
        self.lora_B[slot, :r].copy_(b.mT).mul_(scale)  # (r, out): B^T with the scale folded in, in the slot's dtype

    def extra_repr(self) -> str:
        slots, max_rank, _ = self.lora_A.shape
        return f"num_slots={slots - 1}, max_rank={max_rank}, dtype={self.lora_A.dtype}"


class LoraSlots:
    """Wraps a model's target linears in place (BatchedLoraLinear) and manages the slot stacks."""

    def __init__(
        self,
        model: nn.Module,
        *,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype | None = None,
        target_leaf_names: Collection[str] | None = None,
        gather_bytes: int = LORA_GATHER_BYTES,
        backend: LoraBackend | None = None,
    ) -> None:
        """`gather_bytes`: most bytes of per-row weights a backend may keep derived between decode steps
        (LoraMapping.keep_derived); `backend`: the LoRA math (default: the torch backend)."""
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots ({num_slots}) and max_rank ({max_rank}) must be at least 1")
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.gather_bytes = gather_bytes
        self.dtype = dtype if dtype is not None else _compute_dtype(model)
        self.state = LoraState(backend if backend is not None else TorchLoraBackend())
        self._device = next(model.parameters()).device
        self._wrappers: dict[str, BatchedLoraLinear] = {}
        for path in _target_paths(model, target_leaf_names):
            wrapper = BatchedLoraLinear(
                model.get_submodule(path), num_slots=num_slots, max_rank=max_rank, dtype=self.dtype, state=self.state
            )
            model.set_submodule(path, wrapper)
            self._wrappers[path] = wrapper
        if not self._wrappers:
            raise ValueError(f"{type(model).__name__} has no linear layer to wrap (targets: {target_leaf_names})")
        self.module_paths = frozenset(self._wrappers)
        # The decode mapping, under its key (row slots, rank, tokens): decode steps repeat it until rows change.
        self._decode: tuple[tuple[tuple[int, ...], int, int], LoraMapping | None] | None = None
        self._generations = 0  # every new mapping, and every change of a slot's weights, gets a new generation
        self.slot_bytes = _slot_bytes(self._wrappers.values(), max_rank, self.dtype)

    @property
    def backend(self) -> LoraBackend:
        return self.state.backend

    @property
    def mapping(self) -> LoraMapping | None:
        """The mapping the next forward uses (set by `set_batch`)."""
        return self.state.mapping

    @property
    def stack_bytes(self) -> int:
        """Device memory of the slot stacks: `num_slots` slots plus slot 0 (all zeros)."""
        return self.slot_bytes * (self.num_slots + 1)

    def load(self, slot: int, tensors: Mapping[str, torch.Tensor], scalings: Mapping[str, float]) -> int:
        """Copy a PEFT LoRA state dict into `slot` (1..num_slots); modules it does not target are zeroed.

        `scalings` maps module path -> scale (ValidatedAdapter.lora_scalings). Returns the adapter's rank.
        The adapter was validated at registration, so a mismatch here is a ValueError, with the slot untouched.
        """
        self._check_slot(slot)
        pairs = lora_pairs(tensors)
        problems = [self._pair_problem(path, a, b, scalings) for path, (a, b) in sorted(pairs.items())]
        if reasons := [p for p in problems if p]:
            raise ValueError(f"cannot load LoRA into slot {slot}: " + "; ".join(reasons))
        self._invalidate()
        with torch.no_grad():
            for path, wrapper in self._wrappers.items():
                a, b = pairs.get(path, (None, None))
                wrapper.set_slot(slot, a, b, scalings.get(path, 0.0))
        return max(a.shape[0] for a, _ in pairs.values())

    def _invalidate(self) -> None:
        """A slot's weights change: nothing derived from them before may be reused."""
        self._decode = None
        self._generations += 1
        if self.state.mapping is not None:
            self.state.mapping = dataclasses.replace(self.state.mapping, generation=self._generations)

    def clear(self, slot: int) -> None:
        """Zero `slot`, so rows pointing at it get the base output."""
        self._check_slot(slot)
        self._invalidate()
        with torch.no_grad():
            for wrapper in self._wrappers.values():
                wrapper.set_slot(slot, None, None, 0.0)

    def set_batch(
        self, slot_ids: Sequence[int], ranks: Sequence[int], *, tokens: int = 1, transient: bool = False
    ) -> LoraMapping | None:
        """Map each row to its slot for the next forward, over `tokens` tokens per row; `ranks` are the rows'
        adapter ranks (0 for slot 0). Rows may come in any order. Returns the mapping (None: no LoRA row).

        `transient`: a one-off forward (a prefill) between decode steps; the decode mapping, and what backends
        derived for it, stay for the next decode step, which reuses the same mapping while its rows are unchanged."""
        key = (tuple(slot_ids), max(ranks, default=0), tokens)
        if not transient and self._decode is not None and self._decode[0] == key:
            self.state.mapping = self._decode[1]
            return self.state.mapping
        self._generations += 1
        rows, rank = key[0], key[1]
        mapping = build_mapping(rows, rank, tokens=tokens, device=self._device, generation=self._generations,
                                keep_derived=False, transient=transient)
        if mapping is not None and not transient:  # keeping the decode step's gathered copies: within the budget?
            lo, hi = mapping.span
            mapping = dataclasses.replace(mapping, keep_derived=self.gathered_bytes(hi - lo, rank) <= self.gather_bytes)
        if not transient:
            if mapping is None and self._decode is not None and self._decode[1] is not None:
                for wrapper in self._wrappers.values():  # no LoRA row left: nothing derived is needed any more
                    wrapper.scratch.clear()
            self._decode = (key, mapping)
        self.state.mapping = mapping
        return mapping

    def gathered_bytes(self, rows: int, rank: int) -> int:
        """Device bytes of every wrapper's weights gathered for `rows` rows at `rank`."""
        return rows * self.slot_bytes * rank // self.max_rank

    def unwrap(self) -> None:
        """Put the original base layers back; this LoraSlots is unusable afterwards."""
        for path, wrapper in self._wrappers.items():
            self.model.set_submodule(path, wrapper.base_layer)
        self._wrappers.clear()
        self.state.mapping = None

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.num_slots:
            raise ValueError(f"slot {slot} is outside 1..{self.num_slots}")

    def _pair_problem(self, path: str, a: torch.Tensor, b: torch.Tensor, scalings: Mapping[str, float]) -> str:
        wrapper = self._wrappers.get(path)
        if wrapper is None:
            return f"{path} is not a wrapped module"
        r = a.shape[0]
        if r > self.max_rank:
            return f"{path} has rank {r}, over max_rank {self.max_rank}"
        if tuple(a.shape) != (r, wrapper.in_features) or tuple(b.shape) != (wrapper.out_features, r):
            shapes = f"A {tuple(a.shape)} / B {tuple(b.shape)}"
            return f"{path}: {shapes} do not fit {wrapper.in_features} -> {wrapper.out_features} features"
        if path not in scalings:
            return f"{path} has no scaling"
        return ""


def lora_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (A (r, in), B (out, r)) from PEFT's saved keys; ValueError for any other key or half."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            raise ValueError(f"tensor {name!r} is not a PEFT LoRA weight")
        halves.setdefault(match["module"], {})[match["half"]] = tensor
    missing = sorted(module for module, pair in halves.items() if len(pair) != 2)
    if missing:
        raise ValueError(f"modules with only one of lora_A / lora_B: {missing}")
    return {module: (pair["A"], pair["B"]) for module, pair in halves.items()}


def slot_bytes(
    model: nn.Module, max_rank: int, dtype: torch.dtype | None = None, target_leaf_names: Collection[str] | None = None
) -> int:
    """Bytes of one slot that LoraSlots(model, ...) would have, found without allocating any."""
    modules = (model.get_submodule(path) for path in _target_paths(model, target_leaf_names))
    targets = [m for m in modules if isinstance(m, nn.Linear)]  # all of them: _target_paths picks linears
    return _slot_bytes(targets, max_rank, dtype if dtype is not None else _compute_dtype(model))


def _slot_bytes(linears: Iterable[nn.Linear | BatchedLoraLinear], max_rank: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return element * sum(max_rank * (m.in_features + m.out_features) for m in linears)


def _target_paths(model: nn.Module, leaf_names: Collection[str] | None) -> list[str]:
    # Every linear except the output head / embeddings, as in quiver.adapters.base_spec (what validation accepts).
    paths = []
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if not isinstance(module, nn.Linear) or leaf in EMBEDDING_LEAF_NAMES:
            continue
        if leaf_names is None or leaf in leaf_names:
            paths.append(path)
    return paths



def _compute_dtype(model: nn.Module) -> torch.dtype:
    # Quantized weights are integer tensors; the first floating parameter (the embeddings) has the compute dtype.
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _layer_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device
