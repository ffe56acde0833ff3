"""Which store backend a `--store` location names, chosen once at start-up and logged: a directory
(LocalAdapterStore) or `s3://bucket/prefix` (S3AdapterStore over boto3, with its local cache)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quiver.adapters.s3_store import S3AdapterStore, parse_s3_url
from quiver.adapters.store import AdapterStore, LocalAdapterStore, default_store_dir
from quiver.adapters.version_cache import VersionCache
from quiver.common.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 8 * 2**30
STORE_ENV = "QUIVER_STORE_DIR"  # the default --store: a directory or s3://bucket/prefix


@dataclass(frozen=True)
class StoreOptions:
    """Where adapters are stored, and how a remote store is reached and cached."""

    location: str | None = None
    """A directory, or `s3://bucket/prefix`; None: $QUIVER_STORE_DIR (either form) or ~/.local/share/quiver/adapters."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint; None: boto3's own ($AWS_ENDPOINT_URL, else AWS)."""
    cache_dir: str | None = None
    """Local cache of a remote store's adapters; None: under $QUIVER_CACHE_DIR or ~/.cache/quiver."""
    cache_bytes: int = DEFAULT_CACHE_BYTES
    """Bytes the local cache may hold (least recently used versions are evicted beyond)."""


def _local(options: StoreOptions) -> AdapterStore:
    return LocalAdapterStore(Path(options.location).expanduser() if options.location else default_store_dir())


def _s3(options: StoreOptions) -> AdapterStore:
    import boto3  # a dependency of Quiver's: imported only for an S3 store
    from botocore.config import Config

    assert options.location is not None
    bucket, prefix = parse_s3_url(options.location)
    # Checksums only where an operation needs them (Quiver sends SHA-256 itself): some S3-compatible servers refuse
    # the CRC32 headers newer boto3 adds everywhere by default.
    config = Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    retries={"mode": "standard"})
    client = boto3.client("s3", endpoint_url=options.s3_endpoint_url, config=config)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as e:  # fail at start-up, not at the first request
        raise FailedPrecondition(f"adapter store {options.location}: the bucket cannot be reached: {e}") from e
    return S3AdapterStore(client, bucket, prefix, VersionCache(_cache_dir(options), options.cache_bytes))


def _cache_dir(options: StoreOptions) -> Path:
    if options.cache_dir:
        return Path(options.cache_dir).expanduser()
    root = Path(os.environ.get("QUIVER_CACHE_DIR") or Path.home() / ".cache" / "quiver").expanduser()
    assert options.location is not None
    return root / "adapter-store" / hashlib.sha256(options.location.encode()).hexdigest()[:16]


# Location scheme -> backend ("" for a plain directory).
BACKENDS: dict[str, Callable[[StoreOptions], AdapterStore]] = {"": _local, "s3": _s3}


def open_store(options: StoreOptions) -> AdapterStore:
    location = options.location or os.environ.get(STORE_ENV) or ""
    options = StoreOptions(location or None, options.s3_endpoint_url, options.cache_dir, options.cache_bytes)
    scheme = location.split("://", 1)[0] if "://" in location else ""
    backend = BACKENDS.get(scheme)
    if backend is None:
        raise InvalidArgument("store", f"unknown store scheme {scheme!r}: a directory or s3://bucket/prefix")
    store = backend(options)
    log.info("adapter store backend: %s", type(store).__name__)
    return store
