"""The per-forward LoRA mapping: which slot each row and token of the batch uses, built once per forward.

A forward's input is a rectangular batch (B rows, T tokens each: T = 1 at a decode step, the padded prompt
length at a prefill). Rows may come in any order and any mix of slots; slot 0 means no LoRA. Every backend
reads the same immutable mapping, uploaded to the device in one copy:

    token_slots (B * T,) int32   slot of each token of the flattened (B * T) batch
    segments                     runs of consecutive rows with the same nonzero slot, in tokens:
      seg_starts (G,) int32      token offset where segment g starts
      seg_stops  (G,) int32      token offset where it ends (slot-0 rows may lie between segments)
      seg_slots  (G,) int32      the slot of segment g
    span_slots (S,) long         slot of each row of the span [lo, hi), from the first row with a slot to the
                                 last (slot-0 rows inside it included): the torch backend's per-row gather

with G <= B segments (slot-0 rows belong to none) and S = hi - lo. The host copies of the same facts
(`row_slots`, `segments`, `span`) let backends size their grids and slice without reading the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quiver.server.platform.uploads import upload


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of the batch, consecutive, all using `slot` (> 0)."""

    start: int
    stop: int
    slot: int


@dataclass(frozen=True)
class LoraMapping:
    """Row -> slot for one forward over a (rows, tokens) batch; None stands for "no row uses LoRA"."""

    rows: int
    """B: rows of the forward's batch."""
    tokens: int
    """T: tokens per row in this forward (1 at a decode step)."""
    rank: int
    """Columns of the slot stacks to use: the largest rank among the rows' adapters (<= the slots' rank)."""
    row_slots: tuple[int, ...]
    """(B,) host: each row's slot, 0 = no LoRA."""
    slots: frozenset[int]
    """The nonzero slots the rows use (a wrapped linear none of whose adapters it targets skips the math)."""
    segments: tuple[Segment, ...]
    """(G,) host: runs of consecutive rows with the same nonzero slot, in row order."""
    span: tuple[int, int]
    """[lo, hi): from the first row with a slot to one past the last."""
    shared_slot: int | None
    """The slot when every row of the span uses the same one (one segment covers the span), else None."""
    token_slots: torch.Tensor
    """(B * T,) int32 on the device: slot of each token of the flattened batch."""
    seg_starts: torch.Tensor
    """(G,) int32 on the device: token offset where each segment starts."""
    seg_stops: torch.Tensor
    """(G,) int32 on the device: token offset where each segment ends."""
    seg_slots: torch.Tensor
    """(G,) int32 on the device: slot of each segment."""
    span_slots: torch.Tensor
    """(hi - lo,) long on the device: slot of each row of the span."""
    generation: int
    """Identifies this selection of slots and weights: equal generations mean equal math, so a backend may key
    derived data (the torch backend's gathered weights) on it. Changes when a slot's weights change."""
    keep_derived: bool
    """Whether a backend may keep data derived for this mapping until the next forward with the same generation
    (decode steps repeat one mapping until a row joins or leaves); bounded by --max-lora-gather-bytes."""
    transient: bool
    """A one-off forward (a prefill between decode steps): backends keep what they derived for the decode
    mapping, which comes back at the next step."""

    @property
    def max_segment_tokens(self) -> int:
        """Tokens in the longest segment (sizes a segmented kernel's grid)."""
        return max(s.stop - s.start for s in self.segments) * self.tokens


def segments_of(row_slots: Sequence[int]) -> tuple[Segment, ...]:
    """Runs of consecutive rows with the same nonzero slot."""
    runs: list[Segment] = []
    for row, slot in enumerate(row_slots):
        if not slot:
            continue
        if runs and runs[-1].slot == slot and runs[-1].stop == row:
            runs[-1] = Segment(runs[-1].start, row + 1, slot)
        else:
            runs.append(Segment(row, row + 1, slot))
    return tuple(runs)


def build_mapping(
    row_slots: Sequence[int], rank: int, *, tokens: int, device: torch.device, generation: int, keep_derived: bool,
    transient: bool,
) -> LoraMapping | None:
    """The mapping of rows using `row_slots` (0 = no LoRA) over `tokens` tokens each; None when no row has a slot."""
    segments = segments_of(row_slots)
    if not segments:
        return None
    lo, hi = segments[0].start, segments[-1].stop
    shared = segments[0].slot if len(segments) == 1 else None
    token_slots = [slot for slot in row_slots for _ in range(tokens)]
    seg_starts = [s.start * tokens for s in segments]
    seg_stops = [s.stop * tokens for s in segments]
    seg_slots = [s.slot for s in segments]
    span_slots = list(row_slots[lo:hi])
    # One upload for all of them; the int32 views and the long span are cut from it on the device.
    packed = upload([*token_slots, *seg_starts, *seg_stops, *seg_slots, *span_slots], torch.long, device)
    n, g = len(token_slots), len(segments)
    return LoraMapping(
        rows=len(row_slots), tokens=tokens, rank=rank, row_slots=tuple(row_slots),
        slots=frozenset(s.slot for s in segments), segments=segments, span=(lo, hi),
        shared_slot=shared, token_slots=packed[:n].int(), seg_starts=packed[n : n + g].int(),
        seg_stops=packed[n + g : n + 2 * g].int(), seg_slots=packed[n + 2 * g : n + 3 * g].int(),
        span_slots=packed[n + 3 * g :],
        generation=generation, keep_derived=keep_derived, transient=transient,
    )
