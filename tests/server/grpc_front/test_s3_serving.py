"""Two Quiver servers sharing one S3 adapter store (moto's server on loopback): a registration on either is
served by both, a replaced adapter is served at its new version everywhere, a corrupted object fails its adapter
only (DATA_LOSS), and the CLI works offline on the same store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from quiver.clients.client import QuiverClient
from quiver.clients.errors import QuiverRpcError
from quiver.server.config import AdapterConfig, ModelConfig

from ...adapters.adapter_factory import make_lora, make_prompt_tuning
from ...conftest import write_tiny_checkpoint
from ...s3_server import client as s3_client
from ...server_thread import ServerThread

TOKEN = "admin"
PROMPT = "w7 w5 w9 w11"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "tiny", tie_word_embeddings=False)


def _load(base_dir: Path, cache: Path) -> Any:
    from quiver.server.model.model_loader import load_base_model

    return load_base_model(ModelConfig(model=str(base_dir), device="cpu", quantize="none", cache_dir=str(cache)))


@pytest.fixture
def servers(base_dir: Path, s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> Iterator[list[ServerThread]]:
    """Two servers (each its own copy of the model and its own local cache) on one bucket."""
    started = []
    try:
        for i in range(2):
            config = AdapterConfig(store=f"s3://{s3_bucket}/shared", s3_endpoint_url=s3_endpoint,
                                   store_cache_dir=str(tmp_path / f"cache{i}"), admin_token=TOKEN)
            started.append(ServerThread(_load(base_dir, tmp_path / f"models{i}"), tmp_path, adapter_config=config))
        yield started
    finally:
        for srv in started:
            srv.close()


def _generate(srv: ServerThread, adapter: str) -> str:
    with QuiverClient(srv.target, timeout=60) as c:
        return c.generate(PROMPT, adapter=adapter, max_new_tokens=8).text


def test_a_registration_on_one_replica_is_served_by_both(servers: list[ServerThread], base_dir: Path,
                                                         tmp_path: Path):
    a, b = servers
    lora = make_lora(base_dir, tmp_path / "lora", r=4, target_modules="all-linear", seed=5)
    with QuiverClient(a.target, admin_token=TOKEN) as admin:
        admin.register_adapter(lora, "shared")
    with QuiverClient(b.target) as reader:
        assert [x.name for x in reader.list_adapters().adapters] == ["shared"]
    assert _generate(a, "shared") == _generate(b, "shared") != _generate(a, "")
    # Replaced on B while A has v1 hot in its tiers: A serves v2 at once, as B does.
    before = _generate(a, "shared")
    other = make_lora(base_dir, tmp_path / "lora2", r=4, target_modules="all-linear", seed=6)
    with QuiverClient(b.target, admin_token=TOKEN) as admin:
        assert admin.register_adapter(other, "shared", mode="replace").version == 2
    assert _generate(a, "shared") == _generate(b, "shared") != before
    with QuiverClient(a.target, admin_token=TOKEN) as admin:
        admin.delete_adapter("shared")
    with QuiverClient(b.target) as reader, pytest.raises(QuiverRpcError) as err:
        reader.generate(PROMPT, adapter="shared", max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_a_corrupted_object_fails_that_adapter_only(servers: list[ServerThread], base_dir: Path, tmp_path: Path,
                                                    s3_endpoint: str, s3_bucket: str):
    a, b = servers
    with QuiverClient(a.target, admin_token=TOKEN) as admin:
        bad = admin.register_adapter(make_prompt_tuning(base_dir, tmp_path / "p", num_virtual_tokens=3), "soft")
        admin.register_adapter(make_lora(base_dir, tmp_path / "l", r=2, seed=8), "fine")
    s3_client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"shared/blobs/sha256/{bad.sha256}", Body=b"garbage")
    with QuiverClient(b.target) as c:
        with pytest.raises(QuiverRpcError) as err:
            c.generate(PROMPT, adapter="soft", max_new_tokens=2)
        assert err.value.code == grpc.StatusCode.DATA_LOSS and "checksum" in err.value.details
        assert c.generate(PROMPT, adapter="fine", max_new_tokens=2).completion_tokens == 2
        assert c.generate(PROMPT, max_new_tokens=2).completion_tokens == 2


def test_the_cli_works_offline_on_the_s3_store(base_dir: Path, s3_endpoint: str, s3_bucket: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    from quiver.clients.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("QUIVER_CACHE_DIR", str(tmp_path / "cache"))
    store = f"s3://{s3_bucket}/offline"
    lora = make_lora(base_dir, tmp_path / "lora", r=2)
    assert main(["adapters", "register", str(lora), "--name", "cli-made", "--store", store,
                 "--model", str(base_dir)]) == 0
    assert capsys.readouterr().out.strip() == "cli-made@1"
    assert main(["adapters", "list", "--store", store]) == 0
    assert "cli-made" in capsys.readouterr().out
