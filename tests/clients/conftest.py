"""The real Quiver server the client and CLI tests call: the session's tiny served model (tests/served.py) with its
three adapters ("lora", "prompt", "prefix") and a classifier ("classifier", a SEQ_CLS LoRA with three labels), one
server per module; and what those tests share for watching it."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quiver.clients.client import QuiverClient

from ..adapters.adapter_factory import make_classifier
from ..served import ADMIN, start
from ..server_thread import ServerThread

CLASSIFIER = "classifier"
LABELS = ("neg", "neutral", "pos")
LONG = 2000
"""max_new_tokens of a generation that runs for seconds on the tiny model: long enough to cancel mid-way."""


@pytest.fixture(scope="session")
def classifier_dir(served_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(served_base_dir, tmp_path_factory.mktemp("classifier"), "lora", num_labels=len(LABELS))


@pytest.fixture(scope="module")
def server(served_loaded: Any, served_adapter_dirs: dict[str, Path], classifier_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """One real server per module (only one may hold the shared model at a time), closed at the module's end."""
    srv = start(served_loaded, tmp_path_factory.mktemp("store"), served_adapter_dirs)
    try:
        with QuiverClient(srv.target, admin_token=ADMIN) as admin:
            admin.register_adapter(classifier_dir, CLASSIFIER, labels=LABELS)
        yield srv
    finally:
        srv.close()


def unused_target() -> str:
    """A loopback address nothing listens on: a call there fails UNAVAILABLE, so a test that gets a ValueError
    instead knows nothing was sent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def busy(server: ServerThread) -> int:
    """Requests the server's engine is decoding or has queued."""
    engine = server.running.engine
    return int(engine.num_running + engine.num_waiting)


def calls_ended(server: ServerThread, method: str, code: str) -> int:
    """gRPC calls of `method` that ended with status `code`, from the server's Prometheus metrics."""
    url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    prefix = f'quiver_requests_total{{code="{code}",method="{method}"}} '
    return next((int(float(line[len(prefix):])) for line in body.splitlines() if line.startswith(prefix)), 0)


SERVED = sorted([CLASSIFIER, "lora", "prefix", "prompt"])
"""The adapters a module's server holds; tests that add others delete them again (the `admin` fixture)."""


@pytest.fixture
def admin(server: ServerThread) -> Iterator[QuiverClient]:
    """An admin client of the module's server that deletes, after the test, every adapter the test added."""
    with QuiverClient(server.target, timeout=60, admin_token=ADMIN) as c:
        yield c
        for name in {a.name for a in c.iter_adapters()} - set(SERVED):
            c.delete_adapter(name)
