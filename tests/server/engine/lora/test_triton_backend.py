"""The Triton LoRA kernels against the torch backend and a float64 reference, on random slot stacks.

Without CUDA they run in Triton's interpreter on CPU tensors (tests/__init__.py); with CUDA, compiled (marker
`gpu`). Cases cover decode (BGMV: one token per row) and prefill (SGMV: segments), mixed ranks below the
stacks' rank, slot-0 rows anywhere (before, between and after LoRA rows), one segment and many, and every
floating dtype the slots may have.
"""

from __future__ import annotations

import pytest
import torch

from quiver.server.engine.lora.backend import LoraBackend, choose_backend
from quiver.server.engine.lora.mapping import build_mapping
from quiver.server.engine.lora.torch_backend import TorchLoraBackend

from ...devices import lora_backend_device

# With CUDA these are GPU tests (`pytest -m gpu` runs them); without, they run interpreted in every run.
pytestmark = [pytest.mark.gpu] if torch.cuda.is_available() else []

SLOTS, RANK, IN, OUT = 5, 16, 96, 80  # stacks (S + 1, R, IN) and (S + 1, R, OUT); IN, OUT not block multiples
# Relative to the largest LoRA term: half precision rounds h to its own precision in the torch backend.
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CASES = {
    # name: (row slots, tokens per row, adapter rank of each slot 1..S)
    "decode-mixed": ([2, 0, 1, 1, 3, 0, 5], 1, [4, 16, 1, 8, 7]),
    "decode-one-row": ([4], 1, [4, 16, 1, 8, 7]),
    "decode-slot0-edges": ([0, 0, 3, 0], 1, [4, 16, 1, 8, 7]),
    "prefill-one-segment": ([3, 3, 3], 21, [4, 16, 2, 8, 7]),
    "prefill-many-segments": ([0, 2, 2, 0, 1, 5, 5, 0], 7, [3, 6, 1, 8, 5]),
    "prefill-single-token-rows": ([1, 2], 2, [16, 16, 16, 16, 16]),
    "prefill-long-segment": ([1], 70, [9, 1, 1, 1, 1]),
}
DEVICE = lora_backend_device("triton")


class Stacks:
    """SlotStacks: random adapters of the given ranks, zero above each rank and in slot 0."""

    def __init__(self, ranks: list[int], dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lora_A = torch.randn(SLOTS + 1, RANK, IN, generator=g) / IN**0.5
        self.lora_B = torch.randn(SLOTS + 1, RANK, OUT, generator=g)
        self.lora_A[0], self.lora_B[0] = 0, 0
        for slot, r in enumerate(ranks, start=1):
            self.lora_A[slot, r:], self.lora_B[slot, r:] = 0, 0
        self.lora_A, self.lora_B = self.lora_A.to(DEVICE, dtype), self.lora_B.to(DEVICE, dtype)
        self.scratch: dict[str, object] = {}


def _reference(out: torch.Tensor, x: torch.Tensor, stacks: Stacks, row_slots: list[int], rank: int) -> torch.Tensor:
    """out + x A[s]^T B[s]^T per row, in float64 on the CPU."""
    expected = out.double().cpu().clone()
    a, b = stacks.lora_A.double().cpu(), stacks.lora_B.double().cpu()
    for row, slot in enumerate(row_slots):
        expected[row] += x[row].double().cpu() @ a[slot, :rank].T @ b[slot, :rank]
    return expected


def _run(backend: LoraBackend, case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    row_slots, tokens, ranks = CASES[case]
    stacks = Stacks(ranks, dtype, seed=len(case))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(row_slots), tokens, IN, generator=g).to(DEVICE, dtype)
    out = torch.randn(len(row_slots), tokens, OUT, generator=g).to(DEVICE, dtype)
    rank = max(ranks[s - 1] for s in row_slots if s)
    mapping = build_mapping(row_slots, rank, tokens=tokens, device=DEVICE, generation=1, keep_derived=False,
                            transient=True)
    assert mapping is not None
    before = out.clone()
    backend.add_lora(out, x, stacks, mapping)
    return out, before, _reference(before, x, stacks, row_slots, rank)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_equals_torch_backend_and_reference(case: str, dtype: torch.dtype):
    triton_backend = choose_backend("triton", DEVICE)
    got, before, expected = _run(triton_backend, case, dtype)
    torch_got, _, _ = _run(TorchLoraBackend(), case, dtype)
    scale = (expected - before.double().cpu()).abs().max().item()
    assert scale > 0.1  # the LoRA terms are large enough for a wrong slot or rank to show
    tolerance = RTOL[dtype] * scale + (0 if dtype == torch.float32 else RTOL[dtype] * before.abs().max().item())
    for name, result in (("triton", got), ("torch", torch_got)):
        diff = (result.double().cpu() - expected).abs().max().item()
        assert diff <= tolerance, f"{name}: max diff {diff} over {tolerance}"
    # Rows without a slot are untouched, bit for bit.
    row_slots = CASES[case][0]
    for row, slot in enumerate(row_slots):
        if slot == 0:
            assert torch.equal(got[row], before[row]), f"row {row} has slot 0 but changed"


@pytest.mark.parametrize("case", ["decode-mixed", "prefill-many-segments"])
def test_rank_columns_above_the_batch_rank_are_not_read(case: str):
    """The mapping's rank bounds what the kernels read: garbage above it in the stacks changes nothing."""
    backend = choose_backend("triton", DEVICE)
    row_slots, tokens, ranks = CASES[case]
    rank = max(ranks[s - 1] for s in row_slots if s)
    clean, dirty = Stacks(ranks, torch.float32, 3), Stacks(ranks, torch.float32, 3)
    dirty.lora_A[:, rank:], dirty.lora_B[:, rank:] = float("nan"), float("nan")
    x = torch.randn(len(row_slots), tokens, IN).to(DEVICE)
    outs = []
    for stacks in (clean, dirty):
        out = torch.zeros(len(row_slots), tokens, OUT, device=DEVICE)
        mapping = build_mapping(row_slots, rank, tokens=tokens, device=DEVICE, generation=1, keep_derived=False,
                                transient=True)
        assert mapping is not None
        backend.add_lora(out, x, stacks, mapping)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and not outs[1].isnan().any()
