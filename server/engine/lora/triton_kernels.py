"""Triton kernels for multi-LoRA: shrink (h = x A^T) and expand (out += h B^T), reading the slot stacks by index.

As in Punica (Chen et al., 2023) and S-LoRA, no per-row copy of any adapter is made: each program looks up
its slot and reads that slot's rows of the stacks directly.

- BGMV (decode, one token per row): one program per token (shrink) or per token and block of output
  features (expand); the products are elementwise multiply-and-sum over a block, as one row is too few for
  a matrix unit.
- SGMV (prefill, segments of consecutive tokens with one slot): one program per segment, block of its
  tokens (and block of output features), with `tl.dot` over (tokens x features) tiles. Operands enter the
  dot as float32: exact ("ieee") for float32 stacks, as torch's float32 matmuls are; "tf32" for half stacks,
  which holds every fp16 and bf16 value exactly, so the products equal a half-precision dot's.

Shapes (N tokens, K = in features, M = out features, R = the stacks' rank, r <= R the forward's rank):
x (N, K), A stack (S + 1, R, K), h (N, r) float32, B stack (S + 1, R, M), out (N, M). Slot 0 (no LoRA) is
skipped: its tokens' h is never written nor read. Accumulation is float32; `out` is read and written in its
own dtype. Every program writes a disjoint part of h and out, so no atomics are needed.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bgmv_shrink(x_ptr, a_ptr, slots_ptr, h_ptr, K, rank, sx, sa_slot, sa_rank, sh,
                BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[n, :rank] = A[slot(n), :rank] @ x[n]; grid (N,)."""
    n = tl.program_id(0)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    if slot == 0:
        return
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + n * sx + k, mask=k < K, other=0.0).to(tl.float32)  # (BLOCK_K,)
        a = tl.load(a_ptr + slot * sa_slot + r[:, None] * sa_rank + k[None, :],
                    mask=(r[:, None] < rank) & (k[None, :] < K), other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_K)
        acc += tl.sum(a * xv[None, :], axis=1)
    tl.store(h_ptr + n * sh + r, acc, mask=r < rank)


@triton.jit
def bgmv_expand(h_ptr, b_ptr, slots_ptr, out_ptr, M, rank, sh, sb_slot, sb_rank, so,
                BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[n, block] += h[n, :rank] @ B[slot(n), :rank, block]; grid (N, cdiv(M, BLOCK_M))."""
    n = tl.program_id(0)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    if slot == 0:
        return
    r = tl.arange(0, BLOCK_R)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    hv = tl.load(h_ptr + n * sh + r, mask=r < rank, other=0.0)  # (BLOCK_R,) float32
    b = tl.load(b_ptr + slot * sb_slot + r[:, None] * sb_rank + m[None, :],
                mask=(r[:, None] < rank) & (m[None, :] < M), other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_M)
    delta = tl.sum(hv[:, None] * b, axis=0)  # (BLOCK_M,)
    dst = out_ptr + n * so + m
    old = tl.load(dst, mask=m < M, other=0.0)
    tl.store(dst, (old.to(tl.float32) + delta).to(old.dtype), mask=m < M)


@triton.jit
def sgmv_shrink(x_ptr, a_ptr, starts_ptr, stops_ptr, seg_slots_ptr, h_ptr, K, rank, sx, sa_slot, sa_rank, sh,
                BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """h[t, :rank] = x[t] @ A[slot(g), :rank]^T for the tokens t of segment g; grid (G, cdiv(longest, BLOCK_T))."""
    g = tl.program_id(0)
    start, stop = tl.load(starts_ptr + g), tl.load(stops_ptr + g)
    t = start + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(seg_slots_ptr + g).to(tl.int64)
    if start + tl.program_id(1) * BLOCK_T >= stop:
        return
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + t[:, None].to(tl.int64) * sx + k[None, :],
                     mask=(t[:, None] < stop) & (k[None, :] < K), other=0.0)  # (BLOCK_T, BLOCK_K)
        at = tl.load(a_ptr + slot * sa_slot + r[None, :] * sa_rank + k[:, None],
                     mask=(r[None, :] < rank) & (k[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_R): A^T
        acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision=PRECISION)
    tl.store(h_ptr + t[:, None].to(tl.int64) * sh + r[None, :], acc, mask=(t[:, None] < stop) & (r[None, :] < rank))


@triton.jit
def sgmv_expand(h_ptr, b_ptr, starts_ptr, stops_ptr, seg_slots_ptr, out_ptr, M, rank, sh, sb_slot, sb_rank, so,
                BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """out[t, block] += h[t, :rank] @ B[slot(g), :rank, block] for the tokens t of segment g;
    grid (G, cdiv(longest, BLOCK_T), cdiv(M, BLOCK_M))."""
    g = tl.program_id(0)
    start, stop = tl.load(starts_ptr + g), tl.load(stops_ptr + g)
    t = start + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(seg_slots_ptr + g).to(tl.int64)
    if start + tl.program_id(1) * BLOCK_T >= stop:
        return
    r = tl.arange(0, BLOCK_R)
    m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    ht = tl.load(h_ptr + t[:, None].to(tl.int64) * sh + r[None, :],
                 mask=(t[:, None] < stop) & (r[None, :] < rank), other=0.0)  # (BLOCK_T, BLOCK_R) float32
    b = tl.load(b_ptr + slot * sb_slot + r[:, None] * sb_rank + m[None, :],
                mask=(r[:, None] < rank) & (m[None, :] < M), other=0.0)  # (BLOCK_R, BLOCK_M)
    delta = tl.dot(ht, b.to(tl.float32), input_precision=PRECISION)
    dst = out_ptr + t[:, None].to(tl.int64) * so + m[None, :]
    inside = (t[:, None] < stop) & (m[None, :] < M)
    old = tl.load(dst, mask=inside, other=0.0)
    tl.store(dst, (old.to(tl.float32) + delta).to(old.dtype), mask=inside)
