"""A real Quiver server (gRPC and HTTP on loopback) over a tiny Llama with one adapter of each kind registered,
and the official `openai` clients pointed at it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from quiver.clients.client import QuiverClient
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig

from ...adapters.adapter_factory import make_lora, make_prefix_tuning, make_prompt_tuning
from ...conftest import write_tiny_checkpoint
from ...server_thread import ServerThread

ADMIN = "admin-s3cret"
BASE_ID = "tiny"  # the checkpoint directory's name
ADAPTERS = ("lora", "prompt", "prefix")


@pytest.fixture(scope="package")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with its own output layer (tied embeddings make it repeat the prompt's last token whatever
    the adapter), scaled up so greedy choices have margins far above float rounding: the prompts the tests use keep
    at least 0.006 between the two most likely tokens for 16 steps under each adapter (PEFT's generate), so
    tokens compared across differently composed batches cannot flip. A long context lets a test run a generation
    for seconds."""
    out = write_tiny_checkpoint(tmp_path_factory.mktemp("base") / BASE_ID, max_position_embeddings=4096,
                                tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="package")
def loaded(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from quiver.server.model.model_loader import load_base_model

    cache = tmp_path_factory.mktemp("cache")
    return load_base_model(ModelConfig(model=str(base_dir), device="cpu", quantize="none", cache_dir=str(cache)))


@pytest.fixture(scope="package")
def adapter_dirs(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One adapter of each kind, under a directory the servers allow imports from."""
    root = tmp_path_factory.mktemp("imports")
    return {
        "lora": make_lora(base_dir, root / "lora", r=4, target_modules="all-linear", seed=1),
        "prompt": make_prompt_tuning(base_dir, root / "prompt", num_virtual_tokens=5, seed=2),
        "prefix": make_prefix_tuning(base_dir, root / "prefix", num_virtual_tokens=3, prefix_projection=True, seed=3),
    }


def start(loaded: Any, store: Path, adapter_dirs: dict[str, Path], *, register: bool = True,
          engine: dict[str, Any] | None = None, adapters: dict[str, Any] | None = None, **server: Any) -> ServerThread:
    """A server over `store`, with the adapters registered over gRPC unless `register` is False."""
    roots = (str(next(iter(adapter_dirs.values())).parent),)
    adapter_config = AdapterConfig(store=str(store), admin_token=ADMIN, import_roots=roots, **(adapters or {}))
    srv = ServerThread(loaded, store, EngineConfig(max_lora_rank=8, **(engine or {})), adapter_config, **server)
    if register:
        try:
            with QuiverClient(srv.target, admin_token=ADMIN) as client:
                for name, path in adapter_dirs.items():
                    client.register_adapter(path, name)
        except BaseException:
            srv.close()
            raise
    return srv


@pytest.fixture(scope="module")
def server(loaded: Any, adapter_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerThread]:
    srv = start(loaded, tmp_path_factory.mktemp("store"), adapter_dirs)
    yield srv
    srv.close()


@pytest.fixture
def client(server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def grpc_client(server: ServerThread) -> Iterator[QuiverClient]:
    with QuiverClient(server.target, timeout=60) as c:
        yield c


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `predicate` becomes true within `timeout` seconds (polled every 10 ms)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False
