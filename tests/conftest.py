"""Shared fixtures: tiny random Llama checkpoints on disk, and the real default model converted once.

The default model's converted checkpoint lives in `$QUIVER_CACHE_DIR` when set, else in
`<rootdir>/.pytest_cache/quiver-models`, which survives between runs: the GGUF conversion (~40 s on two CPU
cores) happens once per machine, not once per test session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quiver.common.model_source import resolve_checkpoint

from .server_thread import ServerThread

# Small enough to build and save in well under a second, large enough for bitsandbytes' 64-wide blocks.
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
}
TINY_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def write_tiny_tokenizer(out_dir: Path) -> None:
    """A word-level tokenizer over '<unk> <s> </s> w0 … w252' with a chat template and no pad token."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(TINY_LLAMA["vocab_size"] - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)


def write_tiny_checkpoint(
    out_dir: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer: bool = True, **overrides: Any
) -> Path:
    """Save a random Llama (TINY_LLAMA updated with `overrides`) as safetensors, plus a tokenizer."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    torch.nn.Module.to(model, dtype)  # via Module: transformers' typed `to` wrapper confuses mypy
    model.save_pretrained(out_dir)
    if tokenizer:
        write_tiny_tokenizer(out_dir)
    return out_dir


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A tiny random Llama checkpoint directory with tokenizer, fresh per test."""
    return write_tiny_checkpoint(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def default_cache_dir(pytestconfig: pytest.Config) -> Path:
    """Cache directory shared by every test (and every run) that needs the real default model."""
    if explicit := os.environ.get("QUIVER_CACHE_DIR"):
        return Path(explicit)
    return pytestconfig.rootpath / ".pytest_cache" / "quiver-models"


@pytest.fixture(scope="session")
def default_checkpoint(default_cache_dir: Path) -> Path:
    """The default SmolLM2-135M-Instruct converted to a safetensors checkpoint (converted at most once)."""
    return resolve_checkpoint(None, default_cache_dir)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback for the whole session, with test credentials in the environment."""
    from .s3_server import moto_server, restore, set_credentials

    before = set_credentials()
    try:
        with moto_server() as endpoint:
            yield endpoint
    finally:
        restore(before)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    from .s3_server import new_bucket

    return new_bucket(s3_endpoint)


@pytest.fixture(autouse=True, scope="module")
def no_server_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module that leaves a server running (a fixture that failed before its cleanup, say) is closed here and
    fails, so the leak is reported where it happened instead of as every later module's "model in use"."""
    yield
    left = list(ServerThread.open)
    for server in left:
        server.close()
    assert not left, f"{request.module.__name__} left {len(left)} server(s) running"
