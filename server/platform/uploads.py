"""Small host values (row indices, positions, sampling parameters) onto the device without waiting for it.

`torch.tensor(values, device="cuda")` copies from pageable memory, and torch then synchronises the stream:
the host waits for every kernel queued before it, so a decode step that uploads a few indices stalls the
pipeline as a `.item()` would. Copying through page-locked memory with `non_blocking=True` queues the copy
behind those kernels instead; torch's pinned-memory allocator keeps the staging block alive until the copy
has run. On a CPU it is a plain tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quiver.server.platform.base import platform_for


def upload(
    values: Sequence[int] | Sequence[float] | torch.Tensor, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Host `values` (a list, or a tensor in host memory) as a tensor of `dtype` on `device`, queued on its
    current stream."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    return platform_for(device).to_device(host, device)


def select_rows(t: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """`t[rows]` for a host list of row indices, without the synchronising upload that indexing with a list
    makes; `t` itself when `rows` are all of its rows in order."""
    if len(rows) == t.shape[0] and list(rows) == list(range(len(rows))):
        return t
    return t.index_select(0, upload(rows, torch.long, t.device))
