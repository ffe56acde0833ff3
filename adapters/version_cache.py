"""A remote store's local read-through cache: each adapter version's files in a directory of their own, fetched
once, checksummed, and evicted least recently used when the cache outgrows its bytes.

A version is keyed by its manifest's digest, so a version deleted and registered again under the same number
(other files) never reuses the old directory. Fetching downloads into `<root>/.tmp/`, checks every file's
SHA-256 and size against the manifest (a mismatch is DataLoss: that adapter fails, nothing is kept), then renames
the directory into place, so a directory in the cache is always whole. One fetch per version at a time, across
threads: the others wait for it. Directories open for reading are pinned, never evicted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from quiver.server.errors import DataLoss

log = logging.getLogger(__name__)

_TMP = ".tmp"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of a version as its manifest lists it."""

    sha256: str
    size: int


# Downloads one file: (file's SHA-256, writable binary file) -> writes the object's bytes into it.
Download = Callable[[str, BinaryIO], None]


class _Hashing:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._file.write(data)


class VersionCache:
    """Size-bounded LRU of fetched versions under `root` (thread-safe; one process per root)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self._max_bytes = max_bytes
        (root / _TMP).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / _TMP, ignore_errors=True)  # a crashed fetch's leftovers
        (root / _TMP).mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._pins: dict[str, int] = {}

    def path(self, key: str) -> Path:
        """Where version `key` (a manifest digest) lives once fetched."""
        return self.root / key

    @contextmanager
    def opened(self, key: str, files: Mapping[str, RemoteFile], download: Download, label: str) -> Iterator[Path]:
        """The version's directory, fetched first if absent, pinned while open."""
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
            gate = self._fetching.setdefault(key, threading.Lock())
        try:
            with gate:
                target = self.path(key)
                if target.is_dir():
                    os.utime(target)  # most recently used
                else:
                    self._fetch(target, files, download, label)
            self._evict()
            yield target
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]

    def _fetch(self, target: Path, files: Mapping[str, RemoteFile], download: Download, label: str) -> None:
        staging = self.root / _TMP / f"{target.name}.{os.getpid()}.{threading.get_ident()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for name, expected in files.items():
                with open(staging / name, "wb") as out:
                    hashing = _Hashing(out)
                    download(expected.sha256, hashing)  # type: ignore[arg-type]
                if (hashing.digest.hexdigest(), hashing.size) != (expected.sha256, expected.size):
                    raise DataLoss(
                        f"adapter {label}: {name} fails its checksum in the store ({hashing.size} bytes, sha256 "
                        f"{hashing.digest.hexdigest()}; the manifest says {expected.size} bytes, {expected.sha256})"
                    )
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.info("fetched adapter %s into %s", label, target)

    def _evict(self) -> None:
        """Remove the least recently used unpinned versions while the cache holds more than its bytes."""
        with self._lock:
            entries = []
            for entry in self.root.iterdir():
                if entry.name == _TMP or not entry.is_dir():
                    continue
                size = sum(f.stat().st_size for f in entry.iterdir())
                entries.append((entry.stat().st_mtime, size, entry))
            total = sum(size for _, size, _ in entries)
            for _, size, entry in sorted(entries):
                if total <= self._max_bytes:
                    return
                if entry.name in self._pins:
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                total -= size
                log.info("evicted %s from the adapter cache (%d bytes left)", entry.name, total)
