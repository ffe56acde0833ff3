"""A real Quiver server (gRPC and HTTP on loopback) over a tiny Llama with one adapter of each kind registered,
and the official `openai` clients pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from quiver.clients.client import QuiverClient

from ...served import ADAPTERS, ADMIN, BASE_ID, start
from ...server_thread import ServerThread

__all__ = ["ADAPTERS", "ADMIN", "BASE_ID", "start"]  # this package's tests import them from here


@pytest.fixture(scope="package")
def base_dir(served_base_dir: Path) -> Path:
    return served_base_dir


@pytest.fixture(scope="package")
def loaded(served_loaded: Any) -> Any:
    return served_loaded


@pytest.fixture(scope="package")
def adapter_dirs(served_adapter_dirs: dict[str, Path]) -> dict[str, Path]:
    return served_adapter_dirs


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


