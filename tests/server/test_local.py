"""The in-process server of `quiver eval` and the example scripts (server/local.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from quiver.clients.client import QuiverClient
from quiver.server.local import local_server

from ..conftest import write_tiny_checkpoint


def test_serves_and_gives_the_callers_threads_back(tmp_path: Path):
    """A script that evaluates and then trains must train on all its threads, not on the one the server leaves
    to threads outside its engine."""
    base = write_tiny_checkpoint(tmp_path / "tiny")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with local_server(str(base), str(tmp_path / "store")) as target, QuiverClient(target, timeout=60) as client:
            assert torch.get_num_threads() == 1  # the caller's thread, while the engine runs
            assert client.generate("w1 w2", max_new_tokens=3, ignore_eos=True).completion_tokens == 3
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_serves_over_the_quantization_asked_for(tmp_path: Path):
    """`examples/dialogsum` scores a QLoRA adapter over the nf4 base it was trained on; the default on the CPU is
    the plain base."""
    base = write_tiny_checkpoint(tmp_path / "tiny")
    for quantize, expected in (("auto", "none"), ("nf4", "nf4")):
        with local_server(str(base), str(tmp_path / "store"), quantize=quantize) as target, \
                QuiverClient(target, timeout=60) as client:
            assert client.model_info().quantization == expected
            assert client.generate("w1 w2", max_new_tokens=2, ignore_eos=True).completion_tokens == 2
