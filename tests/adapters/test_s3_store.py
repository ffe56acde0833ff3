"""The S3 adapter store against a real S3 endpoint on loopback (moto's server, over HTTP with boto3): the store
interface as the directory store has it, manifests written last, racing writers, a killed upload, checksums, the
local cache, and every reader seeing the newest version at once."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from quiver.adapters.names import AdapterRef
from quiver.adapters.s3_store import S3AdapterStore, parse_s3_url
from quiver.adapters.store import WEIGHTS_FILE
from quiver.adapters.stores import StoreOptions, open_store
from quiver.adapters.version_cache import VersionCache
from quiver.common.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound

from ..s3_server import client
from .crash_writer import SOURCE_FILES, metadata_factory, write_big_source


def make_source(directory: Path, seed: int, mebibytes: float = 0.01) -> tuple[dict[str, Path], str, int]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SOURCE_FILES[0]).write_text('{"peft_type": "LORA", "r": 4}')
    (directory / SOURCE_FILES[1]).write_bytes(hashlib.sha256(str(seed).encode()).digest() * int(mebibytes * 2**15 + 1))
    files = {name: directory / name for name in SOURCE_FILES}
    digest = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    return files, digest, sum(p.stat().st_size for p in files.values())


def store(endpoint: str, bucket: str, cache: Path, prefix: str = "team/a", cache_bytes: int = 2**30) -> S3AdapterStore:
    return S3AdapterStore(client(endpoint), bucket, f"{prefix}/", VersionCache(cache, cache_bytes))


def put(s: S3AdapterStore, name: str, source: Path, seed: int, mode: str = "create") -> Any:
    files, digest, size = make_source(source, seed)
    return s.put(name, files, metadata_factory(name, digest, size), mode)  # type: ignore[arg-type]


def test_put_get_list_versions_delete(s3_endpoint: str, s3_bucket: str, tmp_path: Path):
    s = store(s3_endpoint, s3_bucket, tmp_path / "cache")
    first = put(s, "alpha", tmp_path / "a1", 1)
    assert first.metadata.version == 1 and not first.path.exists()  # fetched only when served
    with first.opened() as path:
        assert (path / WEIGHTS_FILE).read_bytes() == (tmp_path / "a1" / WEIGHTS_FILE).read_bytes()
    with pytest.raises(AlreadyExists):
        put(s, "alpha", tmp_path / "a2", 2)
    assert put(s, "alpha", tmp_path / "a2", 2, "new_version").metadata.version == 2
    put(s, "beta", tmp_path / "b1", 3)
    page, token = s.list(1)
    assert [p.metadata.name for p in page] == ["alpha"] and token
    rest, token = s.list(5, token)
    assert [p.metadata.name for p in rest] == ["beta"] and token == ""
    assert page[0].metadata.version == 2
    assert [v.metadata.version for v in s.versions("alpha")] == [1, 2]
    assert s.get(AdapterRef("alpha", 1)).metadata.sha256 == first.metadata.sha256
    assert [d.metadata.version for d in s.delete(AdapterRef("alpha", 2))] == [2]
    assert s.get(AdapterRef("alpha", None)).metadata.version == 1
    s.delete(AdapterRef("alpha", None))
    with pytest.raises(NotFound):
        s.get(AdapterRef("alpha", None))
    replaced = put(s, "beta", tmp_path / "b2", 4, "replace")
    assert [v.metadata.version for v in s.versions("beta")] == [replaced.metadata.version] == [2]
    with pytest.raises(InvalidArgument):
        s.get(AdapterRef("../etc", None))


def test_a_second_replica_sees_every_change_at_once(s3_endpoint: str, s3_bucket: str, tmp_path: Path):
    writer = store(s3_endpoint, s3_bucket, tmp_path / "w")
    reader = store(s3_endpoint, s3_bucket, tmp_path / "r")
    put(writer, "gamma", tmp_path / "g1", 1)
    old = reader.get(AdapterRef("gamma", None))
    with old.opened() as path:
        old_bytes = (path / WEIGHTS_FILE).read_bytes()
    put(writer, "gamma", tmp_path / "g2", 2, "replace")
    new = reader.get(AdapterRef("gamma", None))  # the manifest is read on every get: never a stale cache
    assert new.metadata.version == 2
    with new.opened() as path:
        assert (path / WEIGHTS_FILE).read_bytes() == (tmp_path / "g2" / WEIGHTS_FILE).read_bytes() != old_bytes
    writer.delete(AdapterRef("gamma", None))
    with pytest.raises(NotFound):
        reader.get(AdapterRef("gamma", None))
    # Deleted and registered again: version 1 once more, other files, another cache directory.
    again = put(writer, "gamma", tmp_path / "g3", 3)
    seen = reader.get(AdapterRef("gamma", None))
    assert seen.metadata.version == 1 and seen.path != old.path
    with seen.opened() as path:
        assert (path / WEIGHTS_FILE).read_bytes() == (tmp_path / "g3" / WEIGHTS_FILE).read_bytes()
    assert again.metadata.sha256 == seen.metadata.sha256


def test_racing_writers_never_overwrite_a_version(s3_endpoint: str, s3_bucket: str, tmp_path: Path):
    stores = [store(s3_endpoint, s3_bucket, tmp_path / f"c{i}") for i in range(4)]
    made: list[int] = []
    refused: list[Exception] = []

    def write(i: int, mode: str, name: str) -> None:
        try:
            made.append(put(stores[i % 4], name, tmp_path / f"{name}{i}", i, mode).metadata.version)
        except (AlreadyExists, FailedPrecondition) as e:
            refused.append(e)

    threads = [threading.Thread(target=write, args=(i, "new_version", "many")) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(made) == list(range(1, 9)) and not refused  # each writer got a version of its own
    assert len({v.metadata.sha256 for v in stores[0].versions("many")}) == 8
    made.clear()
    threads = [threading.Thread(target=write, args=(i, "create", "once")) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert made == [1] and len(refused) == 5 and all(isinstance(e, AlreadyExists) for e in refused)


def test_a_manifest_is_written_last(s3_endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    s = store(s3_endpoint, s3_bucket, tmp_path / "cache")

    def crash(*args: Any) -> bool:
        raise ConnectionError("the writer died before its manifest")

    monkeypatch.setattr(s, "_publish", crash)
    with pytest.raises(ConnectionError):
        put(s, "half", tmp_path / "h", 1)
    keys = [o["Key"] for o in client(s3_endpoint).list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert any("/blobs/" in k for k in keys) and not any("/versions/" in k for k in keys)
    assert s.list(10) == ([], "")
    with pytest.raises(NotFound):
        s.get(AdapterRef("half", None))


def test_a_killed_upload_leaves_nothing_listed(s3_endpoint: str, s3_bucket: str, tmp_path: Path):
    from .s3_crash_writer import run_and_kill

    source = tmp_path / "big"
    source.mkdir()
    digest, size = write_big_source(source, 48)
    blobs = run_and_kill(s3_endpoint, s3_bucket, "team/a/", source, "big", digest, size)
    assert blobs >= 1  # killed after at least one file was uploaded, before the manifest
    s = store(s3_endpoint, s3_bucket, tmp_path / "cache")
    assert s.list(10) == ([], "")
    files = {name: source / name for name in SOURCE_FILES}
    stored = s.put("big", files, metadata_factory("big", digest, size), "create")  # the name is free
    with stored.opened() as path:
        assert hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest() == digest


def test_a_corrupted_object_fails_its_adapter_only(s3_endpoint: str, s3_bucket: str, tmp_path: Path):
    s = store(s3_endpoint, s3_bucket, tmp_path / "cache")
    bad = put(s, "bad", tmp_path / "bad", 1)
    put(s, "good", tmp_path / "good", 2)
    client(s3_endpoint).put_object(Bucket=s3_bucket, Key=f"team/a/blobs/sha256/{bad.metadata.sha256}",
                                   Body=b"not the weights")
    with pytest.raises(DataLoss, match="fails its checksum"), s.get(AdapterRef("bad", None)).opened():
        pass
    assert not bad.path.exists() and not any((tmp_path / "cache" / ".tmp").iterdir())  # nothing half-kept
    with s.get(AdapterRef("good", None)).opened() as path:
        assert (path / WEIGHTS_FILE).is_file()


def test_the_cache_evicts_the_least_recently_used_unpinned_version(s3_endpoint: str, s3_bucket: str, tmp_path: Path):
    _, _, size = make_source(tmp_path / "probe", 0)  # every version below has this size
    s = store(s3_endpoint, s3_bucket, tmp_path / "cache", cache_bytes=int(2.5 * size))  # room for two
    made = [put(s, f"v{i}", tmp_path / f"v{i}", i) for i in range(3)]
    assert {m.metadata.size_bytes for m in made} == {size}
    with made[0].opened() as first:
        with made[1].opened(), made[2].opened():
            assert first.is_dir()  # pinned while open: never evicted under a reader
        assert first.is_dir()
    with made[1].opened():
        pass
    with made[2].opened():
        pass
    assert not made[0].path.exists() and made[2].path.is_dir()  # the least recently used went first


def test_locations_pick_the_backend(s3_endpoint: str, s3_bucket: str, tmp_path: Path):
    assert parse_s3_url("s3://b/x/y/") == ("b", "x/y/") and parse_s3_url("s3://b") == ("b", "")
    for bad in ("s3://", "s3:///x"):
        with pytest.raises(InvalidArgument):
            parse_s3_url(bad)
    remote = open_store(StoreOptions(f"s3://{s3_bucket}/p", s3_endpoint, str(tmp_path / "c")))
    assert isinstance(remote, S3AdapterStore)
    with pytest.raises(FailedPrecondition, match="cannot be reached"):
        open_store(StoreOptions("s3://no-such-bucket-here", s3_endpoint, str(tmp_path / "c")))
    with pytest.raises(InvalidArgument, match="unknown store scheme"):
        open_store(StoreOptions("gs://bucket"))
    os.environ["AWS_ENDPOINT_URL"] = s3_endpoint  # boto3's standard variable, when no flag is given
    try:
        assert isinstance(open_store(StoreOptions(f"s3://{s3_bucket}", None, str(tmp_path / "d"))), S3AdapterStore)
    finally:
        del os.environ["AWS_ENDPOINT_URL"]


def test_a_manifest_cannot_write_outside_the_cache(s3_endpoint: str, s3_bucket: str, tmp_path: Path):
    s = store(s3_endpoint, s3_bucket, tmp_path / "cache")
    good = put(s, "evil", tmp_path / "e", 1)
    key = "team/a/versions/evil/0000000001.json"
    document = json.loads(client(s3_endpoint).get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    document["files"]["../../escaped"] = document["files"].pop(WEIGHTS_FILE)
    document["files"][WEIGHTS_FILE] = {"sha256": good.metadata.sha256, "size": 1}
    client(s3_endpoint).put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(document).encode())
    with pytest.raises(DataLoss, match="corrupt"):
        s.get(AdapterRef("evil", None))
    assert not (tmp_path / "escaped").exists() and s.list(10) == ([], "")  # listed past, never served


def test_an_unreachable_store_is_unavailable(s3_bucket: str, tmp_path: Path):
    from quiver.common.errors import Unavailable

    dead = S3AdapterStore(client("http://127.0.0.1:9"), s3_bucket, "p/", VersionCache(tmp_path / "c", 2**20))
    with pytest.raises(Unavailable, match="failed"):
        dead.get(AdapterRef("anything", None))
