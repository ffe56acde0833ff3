"""The platform is chosen once per engine from the device, and holds what differs between devices."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine
from quiver.server.platform.base import platform_for
from quiver.server.platform.cpu import CpuPlatform, PackedWeights
from quiver.server.platform.cpu_linear import PackedLinear
from quiver.server.platform.cuda import CudaPlatform


def test_each_device_type_has_its_platform_and_others_are_refused():
    cpu, cuda = platform_for(torch.device("cpu")), platform_for(torch.device("cuda"))
    assert isinstance(cpu, CpuPlatform) and isinstance(cuda, CudaPlatform)
    assert (cpu.sampler_rows_per_draw, cuda.sampler_rows_per_draw) == (1, None)
    with pytest.raises(ValueError, match="no Quiver platform for meta devices"):
        platform_for(torch.device("meta"))


def test_the_cpu_platform_packs_the_weights_only_when_asked(tiny_model: Any):
    held = CpuPlatform().hold_weights(tiny_model, EngineConfig())
    try:
        assert isinstance(held, PackedWeights) and held.extra_bytes > 0
        assert any(isinstance(m, PackedLinear) for m in tiny_model.modules())
    finally:
        held.release()
    assert not any(isinstance(m, PackedLinear) for m in tiny_model.modules())
    assert CpuPlatform().hold_weights(tiny_model, EngineConfig(pack_cpu_weights=False)).extra_bytes == 0
    assert CudaPlatform().hold_weights(tiny_model, EngineConfig()).extra_bytes == 0  # weights as loaded


def test_an_engine_logs_its_platform(tiny_model: Any, text_tokenizer: Any, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="quiver.server.engine.engine"):
        engine = Engine(tiny_model, text_tokenizer, frozenset(), EngineConfig())
    try:
        assert "platform: cpu" in caplog.text
        assert engine.packed_weight_bytes > 0
    finally:
        engine.stop()


def test_importing_the_engine_reads_torchs_default_threads_before_anyone_changes_them():
    """The bench and `quiver serve` set torch's threads to one after their imports; the engine's thread must
    still claim torch's default (a lazily imported platform read the changed value, and ran on one thread)."""
    import subprocess
    import sys

    code = (
        "import torch; default = torch.get_num_threads()\n"
        "from quiver.server.engine.engine import Engine\n"
        "torch.set_num_threads(1)\n"
        "from quiver.server.platform.cpu_threads import default_threads\n"
        "assert default_threads() == default, (default_threads(), default)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
