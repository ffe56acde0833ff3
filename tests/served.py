"""A tiny served model for tests that need a real Quiver server: the checkpoint, its three adapters (one of
each kind) and `start`, which runs a server over them. The root conftest loads them once per session
(`served_base_dir`, `served_loaded`, `served_adapter_dirs`); any test package may start servers over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from quiver.clients.client import QuiverClient
from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig

from .adapters.adapter_factory import make_lora, make_prefix_tuning, make_prompt_tuning
from .server_thread import ServerThread
from .tiny import write_tiny_checkpoint

ADMIN = "admin-s3cret"
BASE_ID = "tiny"  # the checkpoint directory's name
ADAPTERS = ("lora", "prompt", "prefix")


def write_served_base(folder: Path) -> Path:
    """A tiny random Llama with its own output layer (tied embeddings make it repeat the prompt's last token whatever
    the adapter), scaled up so greedy choices have margins far above float rounding: the prompts the tests use keep
    at least 0.006 between the two most likely tokens for 16 steps under each adapter (PEFT's generate), so
    tokens compared across differently composed batches cannot flip. A long context lets a test run a generation
    for seconds."""
    out = write_tiny_checkpoint(folder / BASE_ID, max_position_embeddings=4096, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.save_pretrained(out)
    return out


def load_served_base(base_dir: Path, cache: Path) -> Any:
    from quiver.server.model.model_loader import load_base_model

    return load_base_model(ModelConfig(model=str(base_dir), device="cpu", quantize="none", cache_dir=str(cache)))


def write_served_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    """One adapter of each kind, under `root` (servers started by `start` allow imports from it)."""
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
