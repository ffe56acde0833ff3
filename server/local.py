"""An in-process Quiver server for scripts and commands that need one for a while (`quiver eval` without
--server): gRPC only, on a free loopback port, over a model and a store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from quiver.common.model_choices import Quantize


@contextmanager
def local_server(model: str | None, store: str | None, quantize: Quantize = "auto") -> Iterator[str]:
    """An in-process gRPC server over `model` (quantized as `quantize`, ModelConfig's meaning) and `store` (port 0,
    no HTTP or metrics endpoint) for the duration; its target. The caller's torch thread count, which the server
    lowers to one for the threads outside its engine, is given back afterwards (a script that trains after
    evaluating would otherwise train on one thread)."""
    import torch

    from quiver.server.platform.cpu_threads import reserve_for_engine

    threads = torch.get_num_threads()
    reserve_for_engine()  # as `quiver serve` does: the engine's thread is then the only multi-threaded one
    try:
        with _serving(model, store, quantize) as target:
            yield target
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _serving(model: str | None, store: str | None, quantize: Quantize) -> Iterator[str]:
    from quiver.server.app import start_server
    from quiver.server.config import AdapterConfig, EngineConfig, ModelConfig, ServerConfig
    from quiver.server.model.model_loader import load_base_model

    loaded = load_base_model(ModelConfig(model=model, quantize=quantize))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="quiver-eval-server", daemon=True)
    thread.start()
    try:
        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0, reflection=False)
        start = start_server(loaded, EngineConfig(), config, AdapterConfig(store=store))
        running = asyncio.run_coroutine_threadsafe(start, loop).result()
        try:
            yield f"127.0.0.1:{running.port}"
        finally:
            asyncio.run_coroutine_threadsafe(running.stop(0), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
