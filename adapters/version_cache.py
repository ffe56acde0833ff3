"""A remote store's local read-through cache: each adapter version's files in a directory of their own, fetched
once, checksummed, and evicted least recently used when the cache outgrows its bytes.

A version is keyed by its manifest's digest, so a version deleted and registered again under the same number
(other files) never reuses the old directory. Fetching downloads into `<root>/.tmp/`, checks every file's SHA-256
and size against the manifest (a mismatch is DataLoss: that adapter fails, nothing is kept), fsyncs, then renames
the directory into place, so a directory in the cache is always whole. A cache disk that fills up fails the fetch
with RESOURCE_EXHAUSTED, leaving nothing behind. Every open checksums the cached files again: a copy corrupted on
the local disk is fetched anew (DataLoss only if the store's own copy is corrupt).

Several processes may share one root (Ray Serve's replicas on a node do): each version has a lock file in
`<root>/.locks/`. A fetch holds it exclusively, so a version downloads once however many threads or processes
ask; a reader holds it shared while the directory is open, and eviction only takes versions it can lock
exclusively at once, so it never removes a directory under a reader. Leftovers of a crashed fetch are removed by
the next process that starts, once the process that made them is gone.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from quiver.common.errors import DataLoss, ResourceExhausted

log = logging.getLogger(__name__)

_TMP = ".tmp"
_LOCKS = ".locks"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _intact(directory: Path, files: Mapping[str, RemoteFile]) -> bool:
    """Whether `directory` holds every file as the manifest lists it (size and SHA-256)."""
    if not directory.is_dir():
        return False
    for name, expected in files.items():
        try:
            if (directory / name).stat().st_size != expected.size:
                return False
            with open(directory / name, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != expected.sha256:
                    return False
        except (FileNotFoundError, NotADirectoryError):
            return False
    return True


class VersionCache:
    """Size-bounded LRU of fetched versions under `root`, safe across threads and processes."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self._max_bytes = max_bytes
        for sub in (_TMP, _LOCKS):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for entry in (root / _TMP).iterdir():  # a crashed fetch's leftovers, if its process is gone
            pid = entry.name.rsplit(".", 2)[-2] if entry.name.count(".") >= 2 else ""
            if not pid.isdigit() or not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)

    def path(self, key: str) -> Path:
        """Where version `key` (a manifest digest) lives once fetched."""
        return self.root / key

    @contextmanager
    def opened(self, key: str, files: Mapping[str, RemoteFile], download: Download, label: str) -> Iterator[Path]:
        """The version's directory, fetched first if absent, kept (never evicted) while open.

        The cached files are checksummed at every open: a copy corrupted on the local disk is fetched again.
        """
        target = self.path(key)
        with open(self.root / _LOCKS / key, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # readers share it; eviction needs it exclusively
            if _intact(target, files):
                os.utime(target)  # most recently used
            else:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch of a version at a time, across threads and processes
                if not _intact(target, files):  # another fetch may have finished while this one waited
                    if target.is_dir():  # no reader has it open: they hold the lock shared
                        log.warning("the cached copy of adapter %s is corrupt; fetching it again", label)
                        shutil.rmtree(target)
                    self._fetch(target, files, download, label)
                fcntl.flock(lock, fcntl.LOCK_SH)
            self._evict()
            yield target

    def _fetch(self, target: Path, files: Mapping[str, RemoteFile], download: Download, label: str) -> None:
        staging = self.root / _TMP / f"{target.name}.{os.getpid()}.{threading.get_ident()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            for name, expected in files.items():
                with open(staging / name, "wb") as out:
                    hashing = _Hashing(out)
                    download(expected.sha256, hashing)  # type: ignore[arg-type]
                    out.flush()
                    os.fsync(out.fileno())
                if (hashing.digest.hexdigest(), hashing.size) != (expected.sha256, expected.size):
                    raise DataLoss(
                        f"adapter {label}: {name} fails its checksum in the store ({hashing.size} bytes, sha256 "
                        f"{hashing.digest.hexdigest()}; the manifest says {expected.size} bytes, {expected.sha256})"
                    )
            _fsync_dir(staging)
            try:
                os.rename(staging, target)
            except OSError as e:  # another process, whose lock file was replaced meanwhile, got there first
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            _fsync_dir(self.root)
        except OSError as e:
            if e.errno in _DISK_FULL:
                raise ResourceExhausted(f"adapter {label}: the adapter cache {self.root} is out of disk space") from e
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; else what a failure left
        log.info("fetched adapter %s into %s", label, target)

    def _evict(self) -> None:
        """Remove the least recently used versions nobody has open while the cache holds more than its bytes."""
        entries = []
        for entry in self.root.iterdir():
            if entry.name in (_TMP, _LOCKS):
                continue
            with suppress(FileNotFoundError):  # another process evicted it meanwhile
                entries.append((entry.stat().st_mtime, sum(f.stat().st_size for f in entry.iterdir()), entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries):
            if total <= self._max_bytes:
                return
            if self._remove_unless_open(entry):
                total -= size
                log.info("evicted %s from the adapter cache (%d bytes left)", entry.name, total)

    def _remove_unless_open(self, entry: Path) -> bool:
        with open(self.root / _LOCKS / entry.name, "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # open in some thread or process
                return False
            shutil.rmtree(entry, ignore_errors=True)
            return True
