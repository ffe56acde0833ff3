"""Batched multi-LoRA over any base linear, with preallocated adapter slots.

LoRA (Hu et al., 2021) adds a low-rank update to a frozen linear: y = W x + s * B A x. Serving many adapters
at once follows S-LoRA (Sheng et al., 2023) and Punica (Chen et al., 2023): the base weights are never merged,
swapped or re-selected; every target linear is wrapped once, and each forward computes the LoRA term for all
rows together by gathering each row's adapter from a stack of preallocated slots:

    y[b] = base_layer(x[b]) + (x[b] @ A[s_b]) @ B[s_b]        s_b = slot_ids[b]; slot 0 is all zeros

Slots are rank-padded to `max_rank` (ranks above an adapter's own are zero), and each forward uses only the
first `rank` of them, the largest rank in the batch. A slot keeps A as PEFT does, (r, in), and B transposed,
(r, out), so the gather of each row's weights, which runs once per change of the batch while the gathered
weights are reused (LoraBatch.reuse), copies contiguous blocks: for 8 rank-16 all-linear adapters of the
default model, gathering B from PEFT's (out, r) layout took 28 ms on a CPU, from this one 5 ms. A load pays
that transpose once. When every LoRA row uses one adapter (a lone request's prefill, one-adapter traffic),
the slot itself is used, as a view: nothing is copied (about 9 ms of a warm LoRA request's time to first
token on the default model on a CPU). The scale s
(alpha / r, or alpha / sqrt(r) with rsLoRA, per module) is folded into B when a slot is loaded, so the hot path
is two gathers and two batched matmuls, the second accumulating in place into the base output. `base_layer`
may be an nn.Linear or a bitsandbytes Linear4bit / Linear8bitLt (both subclass nn.Linear); the LoRA math runs
in the slots' own dtype.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quiver.adapters.base_spec import EMBEDDING_LEAF_NAMES
from quiver.server.config import LORA_GATHER_BYTES
from quiver.server.uploads import upload

# PEFT's LoRA keys: "base_model.model.<module path>.lora_A.weight" (".lora_A.default.weight" also occurs).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])(?:\.default)?\.weight$")


@dataclass
class LoraBatch:
    """Per-forward LoRA selection, set by the engine before each model forward (shared by all wrappers)."""

    slot_ids: torch.Tensor | None = None
    """(G,) long on the model device: the slot of each of G equal runs of consecutive rows among the first
    `rows`, G = rows (one slot per row) or G = 1 (they share one slot, used in place: `shared_slot`);
    None when no row uses LoRA (wrappers skip the math)."""
    rows: int = 0
    """LoRA applies to the first `rows` rows of the batch; the rows after them have no LoRA. The engine puts
    LoRA rows first, so rows without one (base, soft prompt, prefix) cost nothing here."""
    rank: int = 0
    """Columns of the stacks to use: the largest rank among this batch's slots (<= max_rank)."""
    shared_slot: int | None = None
    """The slot of the single group when G = 1 (every LoRA row uses one adapter): wrappers then use that
    slot's own weights as views, with nothing to gather (slot_ids stays set for the rows' G = 1)."""
    generation: int = 0
    """Changes whenever the selection or a slot's weights change; wrappers key their gathered weights on it."""
    reuse: bool = False
    """Whether wrappers keep the gathered per-row weights for the next forward with the same generation: decode
    steps repeat the same selection until a sequence joins or leaves, so the gather then runs once, not per step."""
    transient: bool = False
    """A one-off selection (a prefill or a prefill chunk between decode steps): wrappers neither reuse nor drop the
    weights they keep for the decode selection, which comes back at the next step."""

    def select_none(self) -> None:
        """No row uses LoRA: wrappers return their base output."""
        self.slot_ids, self.rows, self.rank, self.shared_slot = None, 0, 0, None


class BatchedLoraLinear(nn.Module):
    """A base linear plus rank-padded LoRA slot stacks; one forward serves rows with different adapters."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor

    def __init__(
        self, base_layer: nn.Module, *, num_slots: int, max_rank: int, dtype: torch.dtype, batch: LoraBatch
    ) -> None:
        super().__init__()
        assert isinstance(base_layer, nn.Linear), "bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear"
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.batch = batch
        device = _layer_device(base_layer)
        slots = num_slots + 1  # slot 0: no LoRA, always zeros
        # Buffers, not parameters: never trained, never in named_parameters(), not saved with the model.
        self.register_buffer(
            "lora_A", torch.zeros(slots, max_rank, self.in_features, dtype=dtype, device=device), persistent=False
        )  # (S+1, max_rank, in): A per slot
        self.register_buffer(
            "lora_B", torch.zeros(slots, max_rank, self.out_features, dtype=dtype, device=device), persistent=False
        )  # (S+1, max_rank, out): (scale * B)^T per slot
        self._gathered: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (generation, a, b)

    def _weights(self, slot_ids: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's A^T (G, in, r) and scaled B^T (G, r, out), reused while the generation holds."""
        shared = self.batch.shared_slot
        if shared is not None:  # one adapter for all LoRA rows: its slot as it is, no copy
            if not self.batch.transient:
                self._gathered = None
            a_slot, b_slot = self.lora_A[shared : shared + 1], self.lora_B[shared : shared + 1]  # (1, R, in/out)
            return a_slot[:, :rank].mT, b_slot[:, :rank]  # (1, in, r), (1, r, out)
        generation = self.batch.generation
        if self._gathered is not None and self._gathered[0] == generation:
            return self._gathered[1], self._gathered[2]  # the usual decode step: nothing else to do
        a_src, b_src = self.lora_A.narrow(1, 0, rank), self.lora_B.narrow(1, 0, rank)  # (S+1, r, in), (S+1, r, out)
        # A enters bmm as a transposed view, as fast as a copy; B must be row-major: baddbmm_ on a transposed
        # (G, out, r) view took 1.5-1.7x as long on a CPU (out 576 / 1536, r 16, G 8).
        a, b = a_src.index_select(0, slot_ids).mT, b_src.index_select(0, slot_ids)  # (G, in, r), (G, r, out)
        if self.batch.reuse:
            self._gathered = (generation, a, b)
        elif not self.batch.transient:
            self._gathered = None
        return a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, out)
        batch = self.batch
        if batch.slot_ids is None:
            return out
        a, b = self._weights(batch.slot_ids, batch.rank)  # (G, in, r), (G, r, out)
        groups, rows = a.shape[0], batch.rows  # G = rows, or 1 when they share a slot
        target = out
        if rows != out.shape[0]:  # the LoRA rows come first, so both slices are contiguous views
            x, target = x[:rows], out[:rows]  # (R, T, in), (R, T, out)
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        h = torch.bmm(x.reshape(groups, -1, self.in_features), a)  # (G, R / G * T, r)
        if out.dtype == b.dtype:
            target.view(groups, -1, self.out_features).baddbmm_(h, b)  # (G, R / G * T, out) += h @ b, in place
        else:
            target += torch.bmm(h, b).view(target.shape).to(out.dtype)  # (R, T, out)
        return out

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Fill `slot` with A (r, in) and B (out, r) scaled by `scale`, zero above rank r; None: zeros."""
        r = 0 if a is None or b is None else a.shape[0]
        # Write each element once: the adapter's part, then zeros above its rank (cold loads are copy-bound).
        if r < self.lora_A.shape[1]:
            self.lora_A[slot, r:].zero_()  # (max_rank - r, in)
            self.lora_B[slot, r:].zero_()  # (max_rank - r, out)
        if a is None or b is None:
            return
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
    ) -> None:
        """`gather_bytes`: most bytes of gathered per-row weights kept between decode steps (LoraBatch.reuse)."""
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots ({num_slots}) and max_rank ({max_rank}) must be at least 1")
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.gather_bytes = gather_bytes
        self.dtype = dtype if dtype is not None else _compute_dtype(model)
        self.batch = LoraBatch()
        self._device = next(model.parameters()).device
        self._wrappers: dict[str, BatchedLoraLinear] = {}
        for path in _target_paths(model, target_leaf_names):
            wrapper = BatchedLoraLinear(
                model.get_submodule(path), num_slots=num_slots, max_rank=max_rank, dtype=self.dtype, batch=self.batch
            )
            model.set_submodule(path, wrapper)
            self._wrappers[path] = wrapper
        if not self._wrappers:
            raise ValueError(f"{type(model).__name__} has no linear layer to wrap (targets: {target_leaf_names})")
        self.module_paths = frozenset(self._wrappers)
        # The decode selection (groups, rows, rank), with its generation and slot ids (G,) on the device.
        self._selection: tuple[tuple[tuple[int, ...], int, int], int, torch.Tensor] | None = None
        self._generations = 0  # every selection gets a new generation
        self.slot_bytes = _slot_bytes(self._wrappers.values(), max_rank, self.dtype)

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
        """A slot's weights change: no wrapper may reuse weights gathered before."""
        self._selection = None
        self._generations += 1
        self.batch.generation = self._generations

    def clear(self, slot: int) -> None:
        """Zero `slot`, so rows pointing at it get the base output."""
        self._check_slot(slot)
        self._invalidate()
        with torch.no_grad():
            for wrapper in self._wrappers.values():
                wrapper.set_slot(slot, None, None, 0.0)

    def set_batch(self, slot_ids: Sequence[int], ranks: Sequence[int], *, transient: bool = False) -> None:
        """Select each row's slot for the next forward; `ranks` are the rows' adapter ranks (0 for slot 0).

        `transient`: a one-off forward (a prefill) between decode steps; the decode selection, and the weights
        gathered for it, stay for the next decode step."""
        self.batch.transient = transient
        if not any(slot_ids):
            self.batch.select_none()
            if not transient:
                self._selection = None
            return
        rows = _leading_lora_rows(slot_ids)
        shared = len(set(slot_ids[:rows])) == 1  # one adapter for all LoRA rows: a single group
        groups = tuple(slot_ids[:1] if shared else slot_ids[:rows])
        rank = max(ranks)
        key = (groups, rows, rank)
        if transient or self._selection is None or self._selection[0] != key:
            self._generations += 1
            selection = (key, self._generations, upload(groups, torch.long, self._device))
            if not transient:
                self._selection = selection
        else:
            selection = self._selection
        _, self.batch.generation, self.batch.slot_ids = selection
        self.batch.rows, self.batch.rank, self.batch.shared_slot = rows, rank, groups[0] if shared else None
        # Keeping the gathered copies costs G slots' worth of memory at this rank; bound it.
        self.batch.reuse = not transient and self.gathered_bytes(len(groups), rank) <= self.gather_bytes

    def gathered_bytes(self, groups: int, rank: int) -> int:
        """Device bytes of every wrapper's weights gathered for `groups` groups at `rank`."""
        return groups * self.slot_bytes * rank // self.max_rank

    def unwrap(self) -> None:
        """Put the original base layers back; this LoraSlots is unusable afterwards."""
        for path, wrapper in self._wrappers.items():
            self.model.set_submodule(path, wrapper.base_layer)
        self._wrappers.clear()
        self.batch.select_none()

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


def _leading_lora_rows(slot_ids: Sequence[int]) -> int:
    """How many rows the LoRA math covers: up to the last row with a slot (slot-0 rows before it ride along)."""
    return max(i for i, slot in enumerate(slot_ids) if slot) + 1


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
