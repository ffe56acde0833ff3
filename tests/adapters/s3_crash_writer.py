"""Crash harness for test_s3_store.py: a writer process that stores one adapter on S3, and `run_and_kill`, which
starts it and SIGKILLs it once a file has been uploaded but before the manifest is written.

    python s3_crash_writer.py ENDPOINT BUCKET PREFIX SOURCE_DIR NAME SHA256 SIZE_BYTES
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quiver.adapters.s3_store import S3AdapterStore
from quiver.adapters.version_cache import VersionCache

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.adapters.crash_writer import SOURCE_FILES, metadata_factory
from tests.s3_server import client


def _objects(endpoint: str, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def run_and_kill(endpoint: str, bucket: str, prefix: str, source: Path, name: str, sha256: str, size: int) -> int:
    """Run the writer; SIGKILL it as soon as a blob is in the bucket; returns the blobs it left."""
    command = [sys.executable, __file__, endpoint, bucket, prefix, str(source), name, sha256, str(size)]
    proc = subprocess.Popen(command)
    try:
        start = time.monotonic()
        while proc.poll() is None and time.monotonic() - start < 60:
            if _objects(endpoint, bucket, f"{prefix}blobs/"):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.002)
        assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
        assert not _objects(endpoint, bucket, f"{prefix}versions/")
        return len(_objects(endpoint, bucket, f"{prefix}blobs/"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    endpoint, bucket, prefix, source, name, sha256, size = argv
    with tempfile.TemporaryDirectory() as cache:
        store = S3AdapterStore(client(endpoint), bucket, prefix, VersionCache(Path(cache), 2**30))
        files = {file_name: Path(source) / file_name for file_name in SOURCE_FILES}
        store.put(name, files, metadata_factory(name, sha256, int(size)), "create")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
