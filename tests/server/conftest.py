"""Fixtures for engine and gRPC tests: a tiny random Llama that shares the default model's tokenizer."""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from quiver.server.config import EngineConfig
from quiver.server.engine.engine import Engine


@pytest.fixture(scope="session")
def smol_tokenizer(default_checkpoint: Path) -> Any:
    """The default model's tokenizer, from its converted checkpoint (parsing the GGUF again is slow)."""
    tok = AutoTokenizer.from_pretrained(default_checkpoint)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_model(smol_tokenizer: Any) -> LlamaForCausalLM:
    """Random 2-layer Llama over the real vocabulary, so real text round-trips through it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=smol_tokenizer.eos_token_id,
        bos_token_id=smol_tokenizer.bos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; sharpen them so greedy ties cannot hide a bug.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    return model.eval()


@pytest.fixture
def engine(tiny_model: Any, smol_tokenizer: Any) -> Iterator[Engine]:
    """A running engine over the tiny model, ending sequences at the tokenizer's end-of-sequence token."""
    eng = Engine(tiny_model, smol_tokenizer, frozenset({smol_tokenizer.eos_token_id}), EngineConfig(max_queued=8))
    eng.start()
    yield eng
    eng.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


PORT_ATTEMPTS = 3


class ServerThread:
    """A real Quiver server (gRPC and HTTP) on its own event loop in a background thread; `server` overrides
    ServerConfig fields (ports default to free ones; http_port=0 turns HTTP off)."""

    open: ClassVar[list[ServerThread]] = []
    """Servers started and not yet closed: `no_server_left_running` closes a module's leftovers and fails it."""

    def __init__(self, loaded: Any, store: Path, engine_config: Any = None, adapter_config: Any = None,
                 **server: Any) -> None:
        import asyncio

        from quiver.server.app import start_server
        from quiver.server.config import AdapterConfig, EngineConfig, ServerConfig

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        adapter_config = adapter_config or AdapterConfig(store=str(store))
        for attempt in range(PORT_ATTEMPTS):
            # A port found free can be taken by another process before the server binds it: try new ones then
            # (the server opens its ports before it touches the model, so a failed start leaves nothing behind).
            ports = {"port": 0, "metrics_port": _free_port(), "http_port": _free_port()}
            config = ServerConfig(**{"host": "127.0.0.1", **ports, **server})
            start = start_server(loaded, engine_config or EngineConfig(), config, adapter_config)
            try:
                self.running = asyncio.run_coroutine_threadsafe(start, self.loop).result(timeout=60)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or attempt == PORT_ATTEMPTS - 1:
                    self._stop_loop()
                    raise
            except BaseException:
                self._stop_loop()
                raise
        ServerThread.open.append(self)
        self.target = f"127.0.0.1:{self.running.port}"
        self.http = f"http://127.0.0.1:{self.running.http_port}"

    def close(self) -> None:
        """Stop the server (its engine gives the shared model its modules back); idempotent."""
        import asyncio

        if self not in ServerThread.open:
            return
        ServerThread.open.remove(self)
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(timeout=60)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(autouse=True, scope="module")
def no_server_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """A module that leaves a server running (a fixture that failed before its cleanup, say) is closed here and
    fails, so the leak is reported where it happened instead of as every later module's "model in use"."""
    yield
    left = list(ServerThread.open)
    for server in left:
        server.close()
    assert not left, f"{request.module.__name__} left {len(left)} server(s) running"
