"""The per-forward LoRA mapping: segments, span and per-token slots, for rows in any order."""

from __future__ import annotations

import pytest
import torch

from quiver.server.engine.lora.mapping import Segment, build_mapping, segments_of


@pytest.mark.parametrize(
    ("row_slots", "segments"),
    [
        ([0, 0], ()),
        ([1], (Segment(0, 1, 1),)),
        ([2, 2, 0, 2], (Segment(0, 2, 2), Segment(3, 4, 2))),
        ([0, 3, 1, 1, 0], (Segment(1, 2, 3), Segment(2, 4, 1))),
    ],
)
def test_segments_are_runs_of_one_nonzero_slot(row_slots: list[int], segments: tuple[Segment, ...]):
    assert segments_of(row_slots) == segments


def test_mapping_tensors_agree_with_its_host_facts():
    row_slots, tokens = [0, 3, 3, 0, 1, 2, 0], 4
    mapping = build_mapping(row_slots, 8, tokens=tokens, device=torch.device("cpu"), generation=5,
                            keep_derived=True, transient=False)
    assert mapping is not None
    assert (mapping.rows, mapping.tokens, mapping.rank, mapping.span) == (7, 4, 8, (1, 6))
    assert mapping.shared_slot is None and mapping.max_segment_tokens == 8
    assert mapping.token_slots.dtype == torch.int32 and mapping.token_slots.shape == (28,)
    assert mapping.token_slots.view(7, 4).tolist() == [[s] * tokens for s in row_slots]
    assert mapping.seg_starts.tolist() == [4, 16, 20] and mapping.seg_stops.tolist() == [12, 20, 24]
    assert mapping.seg_slots.tolist() == [3, 1, 2]
    assert mapping.span_slots.tolist() == [3, 3, 0, 1, 2]


def test_no_lora_row_means_no_mapping_and_one_slot_is_shared():
    cpu = torch.device("cpu")
    assert build_mapping([0, 0, 0], 0, tokens=3, device=cpu, generation=1, keep_derived=False, transient=True) is None
    mapping = build_mapping([0, 4, 4, 0], 2, tokens=1, device=cpu, generation=1, keep_derived=False, transient=True)
    assert mapping is not None and mapping.shared_slot == 4 and mapping.span == (1, 3)
