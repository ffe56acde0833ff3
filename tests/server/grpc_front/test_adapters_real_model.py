"""Adapters of each kind made with PEFT on the real default model: registered over gRPC, kept across restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from quiver.clients import QuiverClient, QuiverRpcError

from ...adapters.adapter_factory import make_lora, make_prefix_tuning, make_prompt_tuning
from ...real_models import RealModels
from ...server_thread import ServerThread

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def loaded(real_models: RealModels) -> Any:
    return real_models.get()


def test_each_kind_registers_and_survives_restart(loaded: Any, default_checkpoint: Path, tmp_path: Path):
    made = {
        "smol-lora": make_lora(default_checkpoint, tmp_path / "lora", r=16, target_modules="all-linear"),
        "smol-prompt": make_prompt_tuning(default_checkpoint, tmp_path / "prompt", num_virtual_tokens=8),
        "smol-prefix": make_prefix_tuning(default_checkpoint, tmp_path / "prefix", num_virtual_tokens=4),
    }
    store = tmp_path / "store"
    first = ServerThread(loaded, store)
    try:
        with QuiverClient(first.target) as client:
            registered = {name: client.register_adapter(path, name) for name, path in made.items()}
    finally:
        first.close()
    assert registered["smol-lora"].rank == 16 and len(registered["smol-lora"].target_modules) == 7
    assert registered["smol-prompt"].num_virtual_tokens == 8
    assert registered["smol-prefix"].num_virtual_tokens == 4
    assert {info.base_fingerprint for info in registered.values()} == {loaded.info.fingerprint}

    second = ServerThread(loaded, store)
    try:
        with QuiverClient(second.target) as client:
            assert {a.name: a for a in client.iter_adapters()} == registered
            with pytest.raises(QuiverRpcError) as err:
                client.generate("Hello", adapter="smol-missing")
            assert err.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        second.close()
