"""Choosing the LoRA backend: once, at start-up, loudly when the one asked for cannot run."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from quiver.server.config import EngineConfig, ModelConfig
from quiver.server.engine.engine import Engine
from quiver.server.engine.lora.backend import BackendUnavailable, choose_backend
from quiver.server.engine.lora.slots import BatchedLoraLinear

from ....conftest import write_tiny_checkpoint


def test_auto_is_torch_on_a_cpu_and_the_choice_is_logged(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="quiver.server.engine.lora.backend"):
        assert choose_backend("auto", torch.device("cpu")).name == "torch"
    assert "LoRA backend: torch" in caplog.text


def test_triton_on_a_cpu_without_the_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="runs its kernels on CUDA devices, not on cpu"):
        choose_backend("triton", torch.device("cpu"))


def test_triton_missing_is_refused_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(BackendUnavailable, match=r"needs the triton package \(pip install triton\)"):
        choose_backend("triton", torch.device("cpu"))
    assert choose_backend("auto", torch.device("cuda")).name == "torch"  # auto on CUDA without triton: torch
    with pytest.raises(BackendUnavailable, match="unknown LoRA backend 'cutlass'"):
        choose_backend("cutlass", torch.device("cpu"))


def test_an_engine_asked_for_an_unavailable_backend_does_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from quiver.server.model.model_loader import load_base_model

    base = write_tiny_checkpoint(tmp_path / "tiny")
    loaded: Any = load_base_model(ModelConfig(model=str(base), device="cpu", quantize="none",
                                              cache_dir=str(tmp_path / "cache")))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="--lora-backend triton"):
        Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, EngineConfig(lora_backend="triton"))
    # Nothing of the failed start stays on the model: another engine can take it.
    assert not any(isinstance(m, BatchedLoraLinear) for m in loaded.model.modules())
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, EngineConfig(lora_backend="torch"))
    assert engine.lora.backend.name == "torch"
    engine.stop()
