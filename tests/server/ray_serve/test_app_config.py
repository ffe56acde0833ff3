"""A Serve config file's `args` become the same typed configs as `quiver serve-ray`'s flags, checked as strictly."""

from __future__ import annotations

from typing import Any

import pytest

from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig
from quiver.server.ray_serve.app import RayServeConfig, _config


def test_sections_become_the_configs():
    assert _config(ModelConfig, {"quantize": "nf4", "device": "cuda"}) == ModelConfig(quantize="nf4", device="cuda")
    assert _config(AdapterConfig, {"import_roots": ["/a", "/b"]}).import_roots == ("/a", "/b")
    assert _config(EngineConfig, {"max_running": 64, "preempt": True}).max_running == 64
    assert _config(RayServeConfig, {"engine_gpus": 1, "engine_replicas": 2}).engine_gpus == 1


@pytest.mark.parametrize(("cls", "values", "problem"), [
    (ModelConfig, {"quantize": "fp8"}, "quantize"),
    (AdapterConfig, {"import_roots": "/data"}, "import_roots"),
    (EngineConfig, {"max_running": "64"}, "max_running"),
    (EngineConfig, {"preempt": 1}, "preempt"),
    (EngineConfig, {"max_runing": 64}, "unknown"),
    (RayServeConfig, {"http_port": 8000}, "quiver serve-ray"),
    (RayServeConfig, {"engine_replicas": 0}, "engine-replicas"),
])
def test_wrong_values_fail_as_the_flags_would(cls: type[Any], values: dict[str, Any], problem: str):
    with pytest.raises(ValueError, match=problem):
        _config(cls, values)
