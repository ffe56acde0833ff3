"""The local cache of a remote store: one download per version however many threads ask at once, nothing kept
from a fetch that fails its checksum, and directories open for reading never evicted."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from quiver.adapters.version_cache import RemoteFile, VersionCache
from quiver.server.errors import DataLoss

CONTENT = {"a.bin": b"x" * 5000, "b.json": b"{}"}
FILES = {name: RemoteFile(hashlib.sha256(data).hexdigest(), len(data)) for name, data in CONTENT.items()}
BY_DIGEST = {f.sha256: CONTENT[name] for name, f in FILES.items()}


def test_threads_asking_at_once_share_one_download(tmp_path: Path):
    cache = VersionCache(tmp_path, 2**20)
    downloads: list[str] = []

    def slow_download(sha256: str, out: BinaryIO) -> None:
        downloads.append(sha256)
        time.sleep(0.05)
        out.write(BY_DIGEST[sha256])

    paths: list[Path] = []

    def reader() -> None:
        with cache.opened("v1", FILES, slow_download, "x@1") as path:
            paths.append(path)
            assert (path / "a.bin").read_bytes() == CONTENT["a.bin"]

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(downloads) == sorted(f.sha256 for f in FILES.values())  # each file once, not once per thread
    assert len(set(paths)) == 1 and len(paths) == 8


def test_a_checksum_failure_keeps_nothing(tmp_path: Path):
    cache = VersionCache(tmp_path, 2**20)

    def corrupt(sha256: str, out: BinaryIO) -> None:
        out.write(b"tampered")

    with pytest.raises(DataLoss, match="fails its checksum"), cache.opened("v1", FILES, corrupt, "x@1"):
        pass
    assert not cache.path("v1").exists() and not any((tmp_path / ".tmp").iterdir())
