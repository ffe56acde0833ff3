"""The Triton LoRA backend: kernels that read the slot stacks by index (triton_kernels.py), no gathered copies.

A decode step (one token per row) runs BGMV over the mapping's per-token slots; a prefill (T tokens per row)
runs SGMV over its segments. Both pass through h (N, r) float32, the shrunk activations, allocated per call:
N * r floats, small beside the layer's own output.
"""

from __future__ import annotations

import torch
import triton

from quiver.server.engine.lora.backend import SlotStacks
from quiver.server.engine.lora.mapping import LoraMapping
from quiver.server.engine.lora.triton_kernels import bgmv_expand, bgmv_shrink, sgmv_expand, sgmv_shrink

_BLOCK_K = 64  # input features per shrink iteration
_BLOCK_M = 64  # output features per expand program
_BLOCK_T = 16  # tokens per segmented program (tl.dot needs >= 16)


class TritonLoraBackend:
    """BGMV at decode steps, SGMV at prefills."""

    name = "triton"

    def add_lora(self, out: torch.Tensor, x: torch.Tensor, slots: SlotStacks, mapping: LoraMapping) -> None:
        n = mapping.rows * mapping.tokens
        assert out.shape[:-1] == x.shape[:-1] and out.numel() == n * out.shape[-1], "mapping and batch differ"
        x2 = x.reshape(n, x.shape[-1])  # (N, K)
        out2 = out.view(n, out.shape[-1])  # (N, M): the base output, written in place
        a, b = slots.lora_A, slots.lora_B  # (S + 1, R, K), (S + 1, R, M)
        assert x2.stride(1) == 1 and a.is_contiguous() and b.is_contiguous()
        rank, k, m = mapping.rank, a.shape[2], b.shape[2]
        block_r = max(16, triton.next_power_of_2(rank))
        h = torch.empty(n, rank, dtype=torch.float32, device=out.device)  # (N, r)
        if mapping.tokens == 1:
            slot_ids = mapping.token_slots
            bgmv_shrink[(n,)](x2, a, slot_ids, h, k, rank, x2.stride(0), a.stride(0), a.stride(1), h.stride(0),
                              BLOCK_R=block_r, BLOCK_K=_BLOCK_K)
            bgmv_expand[(n, triton.cdiv(m, _BLOCK_M))](
                h, b, slot_ids, out2, m, rank, h.stride(0), b.stride(0), b.stride(1), out2.stride(0),
                BLOCK_R=block_r, BLOCK_M=_BLOCK_M)
            return
        segments = len(mapping.segments)
        precision = "ieee" if a.dtype == torch.float32 else "tf32"
        blocks = triton.cdiv(mapping.max_segment_tokens, _BLOCK_T)
        bounds = (mapping.seg_starts, mapping.seg_stops, mapping.seg_slots)  # (G,) each
        sgmv_shrink[(segments, blocks)](
            x2, a, *bounds, h, k, rank, x2.stride(0), a.stride(0), a.stride(1), h.stride(0),
            BLOCK_T=_BLOCK_T, BLOCK_R=block_r, BLOCK_K=_BLOCK_K, PRECISION=precision)
        sgmv_expand[(segments, blocks, triton.cdiv(m, _BLOCK_M))](
            h, b, *bounds, out2, m, rank, h.stride(0), b.stride(0), b.stride(1), out2.stride(0),
            BLOCK_T=_BLOCK_T, BLOCK_R=block_r, BLOCK_M=_BLOCK_M, PRECISION=precision)
