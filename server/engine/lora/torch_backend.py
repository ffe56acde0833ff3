"""The torch LoRA backend: gather each row's slot weights, then two batched matmuls (the CPU path).

    y[b] += (x[b] @ A[s_b]^T) @ B[s_b]^T        s_b = the slot of row b; slot 0 is all zeros

over the mapping's span of rows (first to last row with a slot; slot-0 rows inside it ride along with zero
weights, so no row order is assumed and rows outside the span cost nothing). A slot keeps B transposed,
(r, out), so each row's gather copies contiguous blocks (PEFT's (out, r) layout would gather strided
columns). Decode steps repeat one mapping until a row joins or leaves, so the gathered weights are kept per
layer under the mapping's generation (`keep_derived`) and the gather runs once per change of the batch; a
transient mapping (a prefill between decode steps) neither uses nor drops them. When the whole span uses
one slot, that slot is used in place as a view: nothing is gathered.
"""

from __future__ import annotations

import torch

from quiver.server.engine.lora.backend import SlotStacks
from quiver.server.engine.lora.mapping import LoraMapping

GATHERED = "torch.gathered"  # scratch key: (generation, A^T (S, in, r), B^T (S, r, out))


class TorchLoraBackend:
    """Gather + batched matmul; the LoRA math runs in the slots' dtype."""

    name = "torch"

    def add_lora(self, out: torch.Tensor, x: torch.Tensor, slots: SlotStacks, mapping: LoraMapping) -> None:
        a, b = weights_for(slots, mapping)  # (G, in, r), (G, r, out); G = 1 (shared) or the span's rows
        groups, (lo, hi) = a.shape[0], mapping.span
        target = out
        if (lo, hi) != (0, out.shape[0]):  # slices along dim 0 of contiguous tensors stay contiguous views
            x, target = x[lo:hi], out[lo:hi]  # (S, T, in), (S, T, out)
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        h = torch.bmm(x.reshape(groups, -1, a.shape[1]), a)  # (G, S / G * T, r)
        if out.dtype == b.dtype:
            target.view(groups, -1, b.shape[2]).baddbmm_(h, b)  # (G, S / G * T, out) += h @ b, in place
        else:
            target += torch.bmm(h, b).view(target.shape).to(out.dtype)  # (S, T, out)


def weights_for(slots: SlotStacks, mapping: LoraMapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's A^T (G, in, r) and B^T (G, r, out), r = the mapping's rank."""
    rank, scratch = mapping.rank, slots.scratch
    shared = mapping.shared_slot
    if shared is not None:  # one slot for the whole span: used as it is, no copy
        if not mapping.transient:
            scratch.pop(GATHERED, None)
        a_slot, b_slot = slots.lora_A[shared : shared + 1], slots.lora_B[shared : shared + 1]  # (1, R, in/out)
        return a_slot[:, :rank].mT, b_slot[:, :rank]
    kept = scratch.get(GATHERED)
    if isinstance(kept, tuple) and kept[0] == mapping.generation:
        return kept[1], kept[2]  # the usual decode step: nothing else to do
    a_src, b_src = slots.lora_A.narrow(1, 0, rank), slots.lora_B.narrow(1, 0, rank)  # (S+1, r, in), (S+1, r, out)
    # A enters bmm as a transposed view, as fast as a copy; B stays row-major (baddbmm_ over a transposed
    # (G, out, r) view is slower on a CPU).
    a, b = a_src.index_select(0, mapping.span_slots).mT, b_src.index_select(0, mapping.span_slots)
    if mapping.keep_derived:
        scratch[GATHERED] = (mapping.generation, a, b)
    elif not mapping.transient:
        scratch.pop(GATHERED, None)
    return a, b
