"""The adapter store on S3-compatible object storage, shared by every replica (`--store s3://bucket/prefix`).

Layout under `s3://bucket/prefix/`:
- `blobs/sha256/<hex>`: file contents, content-addressed (two versions with the same weights share one object);
- `versions/<name>/<version, 10 digits>.json`: a version's manifest, its metadata and each file's SHA-256 and size.

A registration uploads every file (skipping blobs already there), verifies each (size, and the SHA-256 where the
server reports checksums), then writes the manifest last, with `If-None-Match: *`: a reader never sees half an
adapter, a crashed upload leaves only unlisted blobs, and two writers racing for one version number cannot
overwrite each other (the loser takes the next number, or gets ALREADY_EXISTS in `create` mode). Versions are
immutable; deleting removes manifests (blobs stay: another version may share them).

Every `get` of a name lists its manifests and reads the newest, so a replaced or deleted adapter is never served
from a stale cache; files are fetched into the local `VersionCache` (checksummed) only when a version is served.
Credentials come from boto3's standard chain, the endpoint from `endpoint_url` or boto3's `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from quiver.adapters.metadata import AdapterMetadata, metadata_from_json
from quiver.adapters.names import (
    AdapterRef,
    decode_page_token,
    encode_page_token,
    validate_file_name,
    validate_name,
    validate_ref,
)
from quiver.adapters.store import MAX_PAGE_SIZE, MODE_RULES, WEIGHTS_FILE, RegisterMode, StoredAdapter, check_files
from quiver.adapters.version_cache import RemoteFile, VersionCache
from quiver.common.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuiverError,
    Unavailable,
)

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_VERSION_DIGITS = 10
_PUT_ATTEMPTS = 8  # racing writers: each lost race moves on to the next version number
_DELETE_BATCH = 1000  # DeleteObjects' limit
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket"})


def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


@contextmanager
def _store_errors(location: str) -> Iterator[None]:
    """Errors of the object store as domain errors: refused credentials FAILED_PRECONDITION, anything else the
    store or the network did UNAVAILABLE (a client may retry); Quiver's own errors pass through."""
    try:
        yield
    except QuiverError:
        raise
    except Exception as e:
        import botocore.exceptions

        if not isinstance(e, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError):
            raise
        if _code(e) in _DENIED:
            raise FailedPrecondition(f"adapter store {location} refused the request: {e}") from e
        raise Unavailable(f"adapter store {location} failed: {e}") from e


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/") ("" for no prefix)."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise InvalidArgument("store", f"{url!r} is not an s3://bucket[/prefix] location")
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class S3AdapterStore:
    """AdapterStore on one bucket and prefix; `client` is a boto3 S3 client; `cache` keeps fetched versions."""

    def __init__(self, client: Any, bucket: str, prefix: str, cache: VersionCache) -> None:
        self._s3 = client
        self._bucket = bucket
        self._prefix = prefix
        self._cache = cache
        self._conditional_writes_checked = False
        self.location = f"s3://{bucket}/{prefix}"
        log.info("adapter store at %s (cache %s)", self.location, cache.root)

    # -- keys ----------------------------------------------------------------------------------------------

    def _blob(self, sha256: str) -> str:
        return f"{self._prefix}blobs/sha256/{sha256}"

    def _manifest(self, name: str, version: int) -> str:
        return f"{self._prefix}versions/{name}/{version:0{_VERSION_DIGITS}d}.json"


    # -- writes --------------------------------------------------------------------------------------------

    def put(self, name: str, files: Mapping[str, Path], make_metadata: Callable[[int], AdapterMetadata],
            mode: RegisterMode) -> StoredAdapter:
        """Upload `files`, verify them, then publish the manifest of version latest + 1 (see the module doc)."""
        validate_name(name, "name")
        rule = MODE_RULES.get(mode)
        if rule is None:
            raise InvalidArgument("mode", f"must be one of {', '.join(MODE_RULES)}, got {mode!r}")
        listed = {dest: (*_sha256(path), path) for dest, path in check_files(files).items()}
        with _store_errors(self.location):
            self._check_conditional_writes()
            for sha256, size, path in listed.values():
                self._upload(sha256, size, path)
            remote = {dest: RemoteFile(sha256, size) for dest, (sha256, size, _) in listed.items()}
            for _ in range(_PUT_ATTEMPTS):
                existing = self._version_numbers(name)
                if existing and rule.refuse_existing:
                    raise AlreadyExists(f"adapter {name!r} already exists (latest version {existing[-1]})")
                metadata = make_metadata((existing[-1] if existing else 0) + 1)
                self._check(metadata, remote)
                if self._publish(metadata, remote):
                    if rule.drop_older:
                        self._drop_after_replace(name, existing)
                    log.info("stored adapter %s@%d in %s (mode %s)", name, metadata.version, self.location, mode)
                    return self._stored(metadata, remote, self._manifest_bytes(metadata, remote))
        raise FailedPrecondition(f"adapter {name!r}: {_PUT_ATTEMPTS} writers raced for its next version; try again")

    def _check_conditional_writes(self) -> None:
        """Once per store: refuse to write where the server ignores If-None-Match (racing registrations would
        then overwrite each other's manifests)."""
        if self._conditional_writes_checked:
            return
        key = f"{self._prefix}.quiver-probe/{secrets.token_hex(8)}"
        self._s3.put_object(Bucket=self._bucket, Key=key, Body=b"1", IfNoneMatch="*")
        try:
            honoured = not self._publish_key(key, b"2")
        finally:
            self._s3.delete_object(Bucket=self._bucket, Key=key)
        if not honoured:
            raise FailedPrecondition(f"adapter store {self.location}: the server ignores conditional writes "
                                     "(If-None-Match), which registrations need to never overwrite each other")
        self._conditional_writes_checked = True

    def _drop_after_replace(self, name: str, versions: builtins.list[int]) -> None:
        """After `replace` published the new version: remove the older manifests, best effort (the new one is what
        `name` resolves to either way)."""
        try:
            self._delete_manifests(name, versions)
        except Exception:  # the registration succeeded; leftovers stay listed as older versions
            log.warning("adapter %s: older versions could not be removed after a replace", name, exc_info=True)

    def _delete_manifests(self, name: str, versions: builtins.list[int]) -> None:
        keys = [{"Key": self._manifest(name, v)} for v in versions]
        for start in range(0, len(keys), _DELETE_BATCH):
            reply = self._s3.delete_objects(Bucket=self._bucket, Delete={"Objects": keys[start:start + _DELETE_BATCH]})
            if failed := reply.get("Errors"):
                raise FailedPrecondition(f"adapter store {self.location} kept {len(failed)} version(s) of {name!r}: "
                                         f"{failed[0].get('Code')}: {failed[0].get('Message')}")

    def _upload(self, sha256: str, size: int, path: Path) -> None:
        key = self._blob(sha256)
        try:
            head = self._s3.head_object(Bucket=self._bucket, Key=key)
            if head["ContentLength"] == size:
                return  # content-addressed: already there
        except Exception as e:
            if _code(e) not in _MISSING:
                raise
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        with open(path, "rb") as body:  # the server checks ChecksumSHA256 where it supports it
            self._s3.put_object(Bucket=self._bucket, Key=key, Body=body, ChecksumSHA256=checksum)
        head = self._s3.head_object(Bucket=self._bucket, Key=key, ChecksumMode="ENABLED")
        if head["ContentLength"] != size or head.get("ChecksumSHA256", checksum) != checksum:
            raise DataLoss(f"the store kept {head['ContentLength']} bytes of a {size}-byte adapter file {sha256}")

    def _check(self, metadata: AdapterMetadata, remote: Mapping[str, RemoteFile]) -> None:
        total = sum(f.size for f in remote.values())
        if (metadata.sha256, metadata.size_bytes) != (remote[WEIGHTS_FILE].sha256, total):
            raise FailedPrecondition(  # the source changed after validation, or make_metadata is wrong
                f"adapter files changed while being stored: {WEIGHTS_FILE} sha256 {remote[WEIGHTS_FILE].sha256}, "
                f"{total} bytes in all; metadata says {metadata.sha256}, {metadata.size_bytes} bytes"
            )

    @staticmethod
    def _manifest_bytes(metadata: AdapterMetadata, remote: Mapping[str, RemoteFile]) -> bytes:
        files = {name: {"sha256": f.sha256, "size": f.size} for name, f in sorted(remote.items())}
        return json.dumps({"metadata": json.loads(metadata.to_json()), "files": files}, sort_keys=True).encode()

    def _publish(self, metadata: AdapterMetadata, remote: Mapping[str, RemoteFile]) -> bool:
        """Write the manifest unless that version exists already (False: another writer took the number)."""
        key = self._manifest(metadata.name, metadata.version)
        return self._publish_key(key, self._manifest_bytes(metadata, remote))

    def _publish_key(self, key: str, body: bytes) -> bool:
        try:
            self._s3.put_object(Bucket=self._bucket, Key=key, Body=body, IfNoneMatch="*",
                                ContentType="application/json")
        except Exception as e:
            if _code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def delete(self, ref: AdapterRef) -> builtins.list[StoredAdapter]:
        """Remove one version's manifest, or every one of the name's; the files stay (shared, content-addressed)."""
        validate_ref(ref)
        doomed = [s for s in self.versions(ref.name) if ref.version in (None, s.metadata.version)]
        if not doomed:
            raise NotFound(f"adapter {ref} not found")
        with _store_errors(self.location):
            self._delete_manifests(ref.name, [s.metadata.version for s in doomed])
        log.info("deleted adapter %s (%d version(s)) from %s", ref, len(doomed), self.location)
        return doomed

    # -- reads ---------------------------------------------------------------------------------------------

    def _keys(self, prefix: str, delimiter: str = "", start_after: str = "") -> Iterator[str]:
        """Keys (or, with a delimiter, common prefixes) under `prefix`, in order."""
        optional = {"Delimiter": delimiter, "StartAfter": start_after}
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=prefix, **{k: v for k, v in optional.items() if v})
        for page in pages:
            yield from (p["Prefix"] for p in page.get("CommonPrefixes", ()))
            yield from (o["Key"] for o in page.get("Contents", ()))

    def _version_numbers(self, name: str) -> builtins.list[int]:
        base = f"{self._prefix}versions/{name}/"
        found = (key[len(base):].removesuffix(".json") for key in self._keys(base) if key.endswith(".json"))
        return sorted(int(v) for v in found if v.isdigit() and len(v) == _VERSION_DIGITS)

    def _read(self, name: str, version: int) -> StoredAdapter | None:
        """The version's manifest, or None if it is gone (deleted meanwhile); DataLoss if it is unreadable."""
        try:
            raw = self._s3.get_object(Bucket=self._bucket, Key=self._manifest(name, version))["Body"].read()
        except Exception as e:
            if _code(e) in _MISSING:
                return None
            raise
        try:
            document = json.loads(raw)
            metadata = metadata_from_json(json.dumps(document["metadata"]))
            # Names go into paths of the local cache: only plain file names, never a way out of it.
            remote = {validate_file_name(f, "manifest"): RemoteFile(str(v["sha256"]), int(v["size"]))
                      for f, v in document["files"].items()}
            if (metadata.name, metadata.version) != (name, version) or WEIGHTS_FILE not in remote:
                raise ValueError(f"describes {metadata.name}@{metadata.version}")
        except (ValueError, KeyError, TypeError, AttributeError, InvalidArgument) as e:
            raise DataLoss(f"the manifest of adapter {name}@{version} in {self.location} is corrupt: {e}") from e
        return self._stored(metadata, remote, raw)

    def _stored(self, metadata: AdapterMetadata, remote: Mapping[str, RemoteFile], manifest: bytes) -> StoredAdapter:
        key = f"{metadata.name}@{metadata.version}-{hashlib.sha256(manifest).hexdigest()[:16]}"
        label = f"{metadata.name}@{metadata.version}"

        def fetch() -> AbstractContextManager[Path]:
            return self._cache.opened(key, remote, self._download, label)

        return StoredAdapter(metadata, self._cache.path(key), fetch)

    def _download(self, sha256: str, out: BinaryIO) -> None:
        with _store_errors(self.location):
            try:
                body = self._s3.get_object(Bucket=self._bucket, Key=self._blob(sha256))["Body"]
            except Exception as e:
                if _code(e) in _MISSING:
                    raise DataLoss(f"adapter file {sha256} is missing from the store") from e
                raise
            for chunk in body.iter_chunks(_CHUNK):
                out.write(chunk)

    def get(self, ref: AdapterRef) -> StoredAdapter:
        """The referenced version, or the newest one (read from the store on every call); NotFound if absent."""
        validate_ref(ref)
        with _store_errors(self.location):
            for _ in range(2):  # a version deleted between the listing and the read (a replace): list once more
                candidates = [ref.version] if ref.version is not None else self._version_numbers(ref.name)[::-1]
                for version in candidates:
                    if (stored := self._read(ref.name, version)) is not None:
                        return stored
                if ref.version is not None:
                    break
        raise NotFound(f"adapter {ref} not found")

    def versions(self, name: str) -> builtins.list[StoredAdapter]:
        validate_name(name, "name")
        with _store_errors(self.location):
            found = [s for v in self._version_numbers(name) if (s := self._read(name, v)) is not None]
        if not found:
            raise NotFound(f"adapter {name!r} not found")
        return found

    def list(self, page_size: int, page_token: str = "") -> tuple[builtins.list[StoredAdapter], str]:
        """A page of the latest version of each name, by name, and the next page's token ("" at the end)."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be in 1..{MAX_PAGE_SIZE}, got {page_size!r}")
        after = decode_page_token(page_token)
        base = f"{self._prefix}versions/"
        page: builtins.list[StoredAdapter] = []
        start = f"{base}{after}/~" if after is not None else ""  # "~" sorts after every version key of `after`
        with _store_errors(self.location):
            names = [p[len(base):].rstrip("/") for p in self._keys(base, delimiter="/", start_after=start)]
        for name in names:
            try:
                latest = self.get(AdapterRef(validate_name(name), None))
            except (NotFound, InvalidArgument):
                continue
            except DataLoss as e:  # a listing goes on past a corrupt manifest; serving that name fails
                log.warning("%s", e)
                continue
            if len(page) == page_size:
                return page, encode_page_token(page[-1].metadata.name)
            page.append(latest)
        return page, ""
