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

from quiver.common.model_source import resolve_checkpoint

from .real_models import RealModels, default_model_missing
from .served import load_served_base, write_served_adapters, write_served_base
from .server_thread import ServerThread
from .tiny import TINY_CHAT_TEMPLATE, TINY_LLAMA, write_tiny_checkpoint, write_tiny_tokenizer

__all__ = ["TINY_CHAT_TEMPLATE", "TINY_LLAMA", "write_tiny_checkpoint", "write_tiny_tokenizer"]

@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A tiny random Llama checkpoint directory with tokenizer, fresh per test."""
    return write_tiny_checkpoint(tmp_path / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (TINY_LLAMA, word-level tokenizer) written once per session; tests only read it."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="session")
def base_dir(tiny_base_dir: Path) -> Path:
    """The base of a module's adapters: `tiny_base_dir` unless a module or package overrides this name (and then
    `loaded` with it)."""
    return tiny_base_dir


@pytest.fixture(scope="session")
def loaded(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`tiny_base_dir` loaded for serving (fp32, CPU) once per session. It names `tiny_base_dir`, not `base_dir`:
    a session fixture over a name that packages override would keep whichever base it was first built with."""
    return load_served_base(tiny_base_dir, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def served_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny served model's checkpoint (tests/served.py), written once per session."""
    return write_served_base(tmp_path_factory.mktemp("served-base"))


@pytest.fixture(scope="session")
def served_loaded(served_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny served model, loaded once per session; each server over it borrows it and gives it back."""
    return load_served_base(served_base_dir, tmp_path_factory.mktemp("served-cache"))


@pytest.fixture(scope="session")
def served_adapter_dirs(served_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One adapter of each kind for the tiny served model, under a folder `served.start` allows imports from."""
    return write_served_adapters(served_base_dir, tmp_path_factory.mktemp("imports"))


@pytest.fixture(scope="session")
def default_cache_dir(pytestconfig: pytest.Config) -> Path:
    """Cache directory shared by every test (and every run) that needs the real default model."""
    if explicit := os.environ.get("QUIVER_CACHE_DIR"):
        return Path(explicit)
    return pytestconfig.rootpath / ".pytest_cache" / "quiver-models"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test of the default model is marked `real_model` (also those that only name `default_checkpoint` or
    `real_models`), so `-m "not real_model"` leaves none; without the package that ships the model they are
    skipped with the command that installs it, and everything else still runs."""
    missing = default_model_missing()
    without_model = pytest.mark.skipif(missing is not None, reason=missing or "")
    for item in items:
        if {"default_checkpoint", "real_models"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)
        if item.get_closest_marker("real_model"):
            item.add_marker(without_model)


@pytest.fixture(scope="session")
def real_models(default_cache_dir: Path) -> RealModels:
    """The default model, each way of loading it (fp32, nf4, int8, a device) loaded once per session."""
    return RealModels(default_cache_dir)


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
