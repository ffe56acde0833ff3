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
from quiver.common.errors import DataLoss

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


def test_two_processes_sharing_a_root_fetch_once_and_never_evict_what_the_other_reads(tmp_path: Path):
    """Two caches on one root stand for two processes (each opens its own lock files, as a process would)."""
    first, second = VersionCache(tmp_path, 2**20), VersionCache(tmp_path, 1)  # the second evicts everything it can
    downloads: list[str] = []

    def download(sha256: str, out: BinaryIO) -> None:
        downloads.append(sha256)
        time.sleep(0.05)
        out.write(BY_DIGEST[sha256])

    with first.opened("v1", FILES, download, "x@1") as held:
        with second.opened("v1", FILES, download, "x@1") as same:
            assert same == held
        with second.opened("v2", FILES, download, "x@2"):
            pass  # its eviction pass finds v1 open in the other "process": kept
        assert (held / "a.bin").read_bytes() == CONTENT["a.bin"]
    assert len(downloads) == 2 * len(FILES)  # v1 once (not once per cache), and v2
    with second.opened("v3", FILES, download, "x@3"):
        pass
    assert not first.path("v1").exists()  # closed everywhere: now it may go
