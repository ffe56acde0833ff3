"""The adapter store: every registered adapter version as a directory `<root>/<name>/<version>/`.

A version directory holds PEFT's files (adapter_config.json, adapter_model.safetensors, maybe more) and
Quiver's `quiver_adapter.json`. Writes follow the write-to-temporary, fsync, rename pattern: files are copied
into `<root>/.staging/`, every file and the directory are fsynced, and one `rename` publishes the version,
then the parent directory is fsynced. A crash at any point leaves either no new version or a complete one,
and what was there before stays readable. Deletion is the same in reverse: a rename into `.staging/` makes
the version vanish at once, then its files are removed; readers that already opened or mmapped them keep
working, since Linux keeps unlinked files alive while they are open.

Serving reads a version through `StoredAdapter.opened()`, which first checks its files against what the metadata
recorded at registration (the weights' SHA-256, the config's where the registry recorded it, and the files' total
size): a file corrupted on disk fails that adapter with DATA_LOSS instead of serving wrong weights.

Writers (put, delete) serialise on a threading.Lock and an advisory `flock` on `<root>/.lock`, so threads
and processes (a server and a CLI) never interleave; whoever holds the lock owns `.staging/`, so anything
found there is debris from a crashed writer and is removed. Readers take no lock: renames are atomic, and a
version directory whose metadata is missing or invalid is skipped (and logged), never returned.
All methods block on disk I/O; async callers run them in a worker thread.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from quiver.adapters.metadata import METADATA_FILE, AdapterMetadata, sha256_file
from quiver.adapters.names import (
    MAX_VERSION,
    AdapterRef,
    decode_page_token,
    encode_page_token,
    parse_version,
    safe_child,
    validate_file_name,
    validate_name,
    validate_ref,
)
from quiver.common.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

log = logging.getLogger(__name__)

RegisterMode = Literal["create", "new_version", "replace"]

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE)
CONFIG_DIGEST = "config_sha256"  # the config's SHA-256, which the registry records in metadata.extra
STAGING_DIR = ".staging"  # adapter names start with [a-z0-9], so these never collide with one
LOCK_FILE = ".lock"
MAX_PAGE_SIZE = 1000
MAX_FILES = 64
_MAX_METADATA_BYTES = 1 << 20
_COPY_CHUNK = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class StoredAdapter:
    """One complete adapter version in a store."""

    metadata: AdapterMetadata
    """The version's quiver_adapter.json."""
    path: Path
    """Directory holding the version's files (a remote store's: where its local cache keeps them, which may not be
    there yet: read through `opened()`); gone once the version is deleted."""
    fetch: Callable[[], AbstractContextManager[Path]] | None = field(default=None, compare=False, repr=False)
    """The store's way to make the files ready in `path` while open: a remote store fetches them into its cache
    (checksummed), the local store checksums them in place; None: `path` is used as it is."""

    @contextmanager
    def opened(self) -> Iterator[Path]:
        """The directory holding the version's files, present and checksummed while open (DataLoss if corrupt)."""
        if self.fetch is None:
            yield self.path
            return
        with self.fetch() as path:
            yield path


@dataclass(frozen=True)
class _ModeRule:
    """What a register mode does about versions already stored under the name."""

    refuse_existing: bool
    """Raise AlreadyExists if the name has any version."""
    drop_older: bool
    """Remove the older versions once the new one is in place."""


# Every mode stores the new version as latest+1 (1 for a new name).
MODE_RULES: dict[str, _ModeRule] = {
    "create": _ModeRule(refuse_existing=True, drop_older=False),
    "new_version": _ModeRule(refuse_existing=False, drop_older=False),
    "replace": _ModeRule(refuse_existing=False, drop_older=True),
}


class AdapterStore(Protocol):
    """Where adapter versions live: LocalAdapterStore (a directory), S3AdapterStore (S3-compatible object storage,
    adapters/s3_store.py); `open_store` (adapters/stores.py) picks one from the --store location."""

    def put(
        self,
        name: str,
        files: Mapping[str, Path],
        make_metadata: Callable[[int], AdapterMetadata],
        mode: RegisterMode,
    ) -> StoredAdapter:
        """Store `files` (destination file name -> source path) as a new version of `name`."""

    def get(self, ref: AdapterRef) -> StoredAdapter:
        """The referenced version (latest when ref.version is None); NotFound if absent."""

    def list(self, page_size: int, page_token: str = "") -> tuple[builtins.list[StoredAdapter], str]:
        """The latest version of each name, sorted by name, and the next page's token ("" after the last)."""

    def versions(self, name: str) -> builtins.list[StoredAdapter]:
        """Every version of `name`, oldest first; NotFound if it has none."""

    def delete(self, ref: AdapterRef) -> builtins.list[StoredAdapter]:
        """Remove one version, or all when ref.version is None; returns what was removed. NotFound if absent."""


class LocalAdapterStore:
    """AdapterStore on a local file system (see the module docstring for the layout and guarantees)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self._staging = self.root / STAGING_DIR
        self._staging.mkdir(exist_ok=True)
        self._lock_path = self.root / LOCK_FILE
        self._thread_lock = threading.Lock()
        self._warned: set[Path] = set()
        with self._locked(wait=False):
            pass  # clears a crashed writer's staging, unless another process is writing right now
        log.info("adapter store at %s", self.root)

    def put(
        self,
        name: str,
        files: Mapping[str, Path],
        make_metadata: Callable[[int], AdapterMetadata],
        mode: RegisterMode,
    ) -> StoredAdapter:
        """Store a new version of `name`; the store picks the number, `make_metadata(version)` the metadata.

        The metadata's sha256 and size_bytes must describe the files as copied (they are checked while
        copying, so a source changed after validation is refused with FailedPrecondition).
        """
        validate_name(name, "name")
        rule = MODE_RULES.get(mode)
        if rule is None:
            raise InvalidArgument("mode", f"must be one of {', '.join(MODE_RULES)}, got {mode!r}")
        sources = check_files(files)
        with self._locked():
            name_dir = safe_child(self.root, name, field="name")
            existing = self._version_dirs(name_dir)
            valid = self._valid_versions(name, existing)
            if valid and rule.refuse_existing:
                raise AlreadyExists(f"adapter {name!r} already exists (latest version {valid[-1].metadata.version})")
            version = max(self._taken_numbers(name_dir), default=0) + 1  # a planted link's number is skipped too
            if version > MAX_VERSION:
                raise ResourceExhausted(f"adapter {name!r} has used every version number")
            metadata = make_metadata(version)
            if (metadata.name, metadata.version) != (name, version):
                raise ValueError(f"make_metadata({version}) returned metadata for {metadata.name}@{metadata.version}")
            stored = self._publish(name_dir, sources, metadata)
            if rule.drop_older:
                for path in existing.values():
                    self._discard(path)
        log.info("stored adapter %s@%d (%d bytes, mode %s)", name, version, metadata.size_bytes, mode)
        return stored

    def delete(self, ref: AdapterRef) -> builtins.list[StoredAdapter]:
        """Remove one version, or every version when ref.version is None (the name then disappears at once)."""
        validate_ref(ref)
        with self._locked():
            name_dir = safe_child(self.root, ref.name)
            valid = self._valid_versions(ref.name, self._version_dirs(name_dir))
            doomed = [s for s in valid if ref.version in (None, s.metadata.version)]
            if not doomed:
                raise NotFound(f"adapter {ref} not found")
            if ref.version is None:
                self._discard(name_dir)
            else:
                self._discard(doomed[0].path)
                if not any(name_dir.iterdir()):
                    name_dir.rmdir()
                    _fsync_dir(self.root)
        log.info("deleted adapter %s (%d version(s))", ref, len(doomed))
        return doomed

    def get(self, ref: AdapterRef) -> StoredAdapter:
        """The referenced version, or the latest complete one when ref.version is None; NotFound if absent."""
        validate_ref(ref)
        name_dir = safe_child(self.root, ref.name)
        if ref.version is None:
            for version, path in sorted(self._version_dirs(name_dir).items(), reverse=True):
                if (stored := self._read_version(path, ref.name, version)) is not None:
                    return stored
        else:
            path = safe_child(self.root, ref.name, str(ref.version))
            if path.is_dir() and (stored := self._read_version(path, ref.name, ref.version)) is not None:
                return stored
        raise NotFound(f"adapter {ref} not found")

    def versions(self, name: str) -> builtins.list[StoredAdapter]:
        """Every complete version of `name`, oldest first; NotFound if there is none."""
        validate_name(name, "name")
        name_dir = safe_child(self.root, name, field="name")
        valid = self._valid_versions(name, self._version_dirs(name_dir))
        if not valid:
            raise NotFound(f"adapter {name!r} not found")
        return valid

    def list(self, page_size: int, page_token: str = "") -> tuple[builtins.list[StoredAdapter], str]:
        """A page of the latest version of each name, sorted by name, and the next page's token ("" at the end).

        The token is the last name returned, base64-encoded; names added or removed between pages are simply
        found or not found when the listing reaches their place.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be in 1..{MAX_PAGE_SIZE}, got {page_size!r}")
        after = decode_page_token(page_token)
        page: builtins.list[StoredAdapter] = []
        for name in self._names():
            if after is not None and name <= after:
                continue
            try:
                latest = self.get(AdapterRef(name, None))
            except (NotFound, InvalidArgument):  # an empty or symlinked name directory
                continue
            if len(page) == page_size:  # one more exists, so the caller needs another page
                return page, encode_page_token(page[-1].metadata.name)
            page.append(latest)
        return page, ""

    @contextmanager
    def _locked(self, wait: bool = True) -> Iterator[bool]:
        """Exclusive writer access across threads and processes; clears what crashed writers left behind.

        With wait=False, yields False at once if another process holds the lock (its staging is live).
        """
        with self._thread_lock, open(self._lock_path, "ab") as lock_file:
            try:  # the flock is released when the file closes, or when the process dies
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            self._clear_staging()
            yield True

    def _clear_staging(self) -> None:
        """Remove everything in .staging/; only call while holding the writer lock."""
        for entry in self._staging.iterdir():
            log.warning("removing %s left by an interrupted adapter write or delete", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _publish(self, name_dir: Path, sources: dict[str, Path], metadata: AdapterMetadata) -> StoredAdapter:
        """Copy `sources` and the metadata into a staging directory, fsync it all, and rename it into place."""
        staging = self._staging / f"{metadata.name}@{metadata.version}.{secrets.token_hex(4)}"
        try:
            os.mkdir(staging)
            digests, total = {}, 0
            for dest_name, source in sources.items():
                size, digests[dest_name] = _copy_synced(source, staging / dest_name)
                total += size
            if (metadata.sha256, metadata.size_bytes) != (digests[WEIGHTS_FILE], total):
                raise FailedPrecondition(  # the source changed after validation, or make_metadata is wrong
                    f"adapter files changed while being stored: {WEIGHTS_FILE} sha256 {digests[WEIGHTS_FILE]}, "
                    f"{total} bytes in all; metadata says {metadata.sha256}, {metadata.size_bytes} bytes"
                )
            _write_synced(staging / METADATA_FILE, metadata.to_json().encode("utf-8"))
            _fsync_dir(staging)
            if not name_dir.is_dir():
                name_dir.mkdir()
                _fsync_dir(self.root)
            final = name_dir / str(metadata.version)
            os.rename(staging, final)
            _fsync_dir(name_dir)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in _DISK_FULL:
                raise ResourceExhausted(f"adapter store {self.root} is out of disk space") from e
            raise
        return _stored(metadata, final)

    def _discard(self, path: Path) -> None:
        """Make `path` vanish atomically (rename into .staging/), then delete its files."""
        tomb = self._staging / f"deleted-{secrets.token_hex(8)}"
        os.rename(path, tomb)
        _fsync_dir(path.parent)
        shutil.rmtree(tomb, ignore_errors=True)  # leftovers are cleared by the next writer

    def _names(self) -> builtins.list[str]:
        """Sorted names of the real directories in the root that are valid adapter names."""
        return sorted(d for d in _subdirs(self.root) if _is_valid(validate_name, d))

    def _version_dirs(self, name_dir: Path) -> dict[int, Path]:
        """{version: directory} for the numerically named real directories under `name_dir`, complete or not."""
        return {parse_version(d): name_dir / d for d in _subdirs(name_dir) if _is_valid(parse_version, d)}

    def _taken_numbers(self, name_dir: Path) -> builtins.list[int]:
        """Every version number an entry under `name_dir` has, whatever it is (a new version is never renamed onto
        one)."""
        try:
            with os.scandir(name_dir) as entries:
                return [parse_version(e.name) for e in entries if _is_valid(parse_version, e.name)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _valid_versions(self, name: str, dirs: dict[int, Path]) -> builtins.list[StoredAdapter]:
        found = (self._read_version(path, name, version) for version, path in sorted(dirs.items()))
        return [stored for stored in found if stored is not None]

    def _read_version(self, path: Path, name: str, version: int) -> StoredAdapter | None:
        """The version in `path`, or None (logged once) if its metadata is missing, invalid or for another name."""
        metadata_path = path / METADATA_FILE
        try:
            if metadata_path.is_symlink():  # the store writes none: planted, and never followed
                raise ValueError("its metadata is a symbolic link")
            if metadata_path.stat().st_size > _MAX_METADATA_BYTES:
                raise ValueError(f"larger than {_MAX_METADATA_BYTES} bytes")
            metadata = AdapterMetadata.from_json(metadata_path.read_text(encoding="utf-8"))
            if (metadata.name, metadata.version) != (name, version):
                raise ValueError(f"describes {metadata.name}@{metadata.version}")
        except (OSError, ValueError) as e:
            if path.is_dir() and path not in self._warned:  # a vanished directory was just deleted: no news
                self._warned.add(path)
                log.warning("ignoring incomplete adapter version %s: %s", path, e)
            return None
        return _stored(metadata, path)


def _stored(metadata: AdapterMetadata, path: Path) -> StoredAdapter:
    @contextmanager
    def checked() -> Iterator[Path]:
        verify_files(path, metadata)
        yield path

    return StoredAdapter(metadata, path, checked)


def verify_files(path: Path, metadata: AdapterMetadata) -> None:
    """Raise DataLoss unless the files in the version directory `path` are what `metadata` recorded when they were
    stored: the weights' SHA-256, the config's (when recorded in extra), and every file's total size.

    FileNotFoundError (not DataLoss) when the whole version was deleted meanwhile.
    """
    label = f"adapter {metadata.name}@{metadata.version}"
    expected = {WEIGHTS_FILE: metadata.sha256}
    if config_digest := metadata.extra.get(CONFIG_DIGEST):
        expected[CONFIG_FILE] = config_digest
    try:
        with os.scandir(path) as entries:
            files = [e for e in entries if e.name != METADATA_FILE]
        if links := sorted(e.name for e in files if e.is_symlink()):  # the store writes none: planted
            raise DataLoss(f"{label}: {', '.join(links)} in the store is a symbolic link")
        total = sum(e.stat().st_size for e in files if e.is_file())
        found = {file_name: sha256_file(path / file_name) for file_name in expected}
    except FileNotFoundError as e:
        if not (path / METADATA_FILE).is_file():
            raise  # deleted: the caller reports NotFound
        raise DataLoss(f"{label}: {e.filename} is missing from the store") from e
    for file_name, digest in expected.items():
        if found[file_name] != digest:
            raise DataLoss(f"{label}: {file_name} fails its checksum in the store (sha256 {found[file_name]}; "
                           f"registered as {digest})")
    if total != metadata.size_bytes:
        raise DataLoss(f"{label}: its files hold {total} bytes in the store; registered as {metadata.size_bytes}")


def default_store_dir() -> Path:
    """$QUIVER_STORE_DIR, else $XDG_DATA_HOME/quiver/adapters, else ~/.local/share/quiver/adapters."""
    if explicit := os.environ.get("QUIVER_STORE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says relative values are to be ignored
        return Path(xdg) / "quiver" / "adapters"
    return Path.home() / ".local" / "share" / "quiver" / "adapters"


def _subdirs(path: Path) -> builtins.list[str]:
    """Names of the real (not symlinked) directories in `path`; none if `path` is missing."""
    try:
        with os.scandir(path) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_valid(check: Callable[[str], object], text: str) -> bool:
    try:
        check(text)
    except InvalidArgument:
        return False
    return True


def check_files(files: Mapping[str, Path]) -> dict[str, Path]:
    """Validated {destination file name: source path}, in sorted order; raises InvalidArgument("files", ...)."""
    if len(files) > MAX_FILES:
        raise InvalidArgument("files", f"at most {MAX_FILES} files per adapter, got {len(files)}")
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise InvalidArgument("files", f"missing {', '.join(missing)}")
    sources: dict[str, Path] = {}
    for dest_name in sorted(files):
        validate_file_name(dest_name, "files")
        if dest_name == METADATA_FILE:
            raise InvalidArgument("files", f"{METADATA_FILE} is written by the store, not supplied")
        source = Path(files[dest_name])
        if not source.is_file():
            raise InvalidArgument("files", f"source for {dest_name} is not a regular file: {source}")
        sources[dest_name] = source
    return sources


def _copy_synced(source: Path, dest: Path) -> tuple[int, str]:
    """Copy `source` to the new file `dest`, fsync it; return (bytes copied, sha256 of those bytes)."""
    digest = hashlib.sha256()
    buffer = bytearray(_COPY_CHUNK)
    view = memoryview(buffer)
    total = 0
    with open(source, "rb") as fin, open(dest, "xb") as fout:
        while n := fin.readinto(buffer):
            fout.write(view[:n])
            digest.update(view[:n])
            total += n
        fout.flush()
        os.fsync(fout.fileno())
    return total, digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """fsync a directory, making the creations, renames and removals of its entries durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
