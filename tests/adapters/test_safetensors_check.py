"""Loading checked safetensors keeps nothing behind: a server validates and loads adapters all day."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quiver.adapters.safetensors_check import load_checked_safetensors, load_safetensors

LOADS = 2000


def retained_bytes(load: object, path: Path) -> int:
    """Traced bytes still held after LOADS loads whose results were dropped (after a warm-up)."""
    for _ in range(100):
        load(path)  # type: ignore[operator]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(LOADS):
            load(path)  # type: ignore[operator]
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_loading_retains_nothing_where_the_library_file_loader_does(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    tensors = {f"layer{i}.weight": torch.randn(4, 8) for i in range(8)}
    save_file(tensors, str(path))
    loaded = load_checked_safetensors(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    ours = retained_bytes(load_safetensors, path)
    library = retained_bytes(load_file, path)
    print(f"\nretained over {LOADS} loads: ours {ours} B, safetensors.torch.load_file {library} B")
    assert ours < 16 * 1024
    # The reason this module exists: should a safetensors release stop retaining, load_file can come back.
    assert library > 8 * ours
