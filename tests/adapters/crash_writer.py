"""Crash harness for test_store.py: a writer process that stores one adapter version, and `run_and_kill`,
which starts it and SIGKILLs it at a chosen point of the write.

    python crash_writer.py STORE_ROOT SOURCE_DIR NAME SHA256 SIZE_BYTES

SOURCE_DIR holds adapter_config.json and adapter_model.safetensors; SHA256 (of the weights) and SIZE_BYTES
(of both files) are passed in so the writer starts copying at once instead of hashing first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quiver.adapters.metadata import AdapterMetadata, sha256_file, utc_now
from quiver.adapters.store import LocalAdapterStore

SOURCE_FILES = ("adapter_config.json", "adapter_model.safetensors")


def metadata_factory(name: str, sha256: str, size_bytes: int, **overrides: object) -> Callable[[int], AdapterMetadata]:
    """make_metadata for LocalAdapterStore.put: a rank-4 LoRA on q_proj/v_proj with the given digest and size."""

    def make(version: int) -> AdapterMetadata:
        fields: dict[str, object] = {
            "name": name,
            "version": version,
            "kind": "lora",
            "peft_type": "LORA",
            "base_fingerprint": "sha256:" + "0" * 64,
            "base_architecture": "LlamaForCausalLM",
            "size_bytes": size_bytes,
            "num_parameters": 1024,
            "rank": 4,
            "num_virtual_tokens": None,
            "target_modules": ("q_proj", "v_proj"),
            "sha256": sha256,
            "created_at": utc_now(),
        }
        return AdapterMetadata(**{**fields, **overrides})  # type: ignore[arg-type]

    return make


def write_big_source(directory: Path, mebibytes: int) -> tuple[str, int]:
    """Write a large adapter source into `directory`; return its weights' sha256 and its files' total size."""
    (directory / SOURCE_FILES[0]).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    block = os.urandom(1 << 20)
    with open(directory / SOURCE_FILES[1], "wb") as f:
        for i in range(mebibytes):
            f.write(block[i:] + block[:i])
    return sha256_file(directory / SOURCE_FILES[1]), sum((directory / n).stat().st_size for n in SOURCE_FILES)


@dataclass(frozen=True)
class KillPoint:
    """When to SIGKILL the writer."""

    when: Callable[[int | None, float], bool]
    """Given the bytes staged so far (None: staging still empty) and seconds since the writer started."""
    inside_write: bool
    """Whether the kill is sure to land while the write is in progress (else any outcome is possible)."""


def staged_at_least(n: int) -> Callable[[int | None, float], bool]:
    return lambda staged, _: staged is not None and staged >= n


def staged_bytes(staging: Path) -> int | None:
    """Bytes written so far into the store's staging area, or None while it is empty."""
    total, entries = 0, 0
    for directory in staging.iterdir():
        entries += 1
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # renamed into place meanwhile
            total += sum(f.stat().st_size for f in directory.iterdir())
    return total if entries else None


def run_and_kill(
    root: Path, source_dir: Path, name: str, sha256: str, size_bytes: int, when: Callable[[int | None, float], bool]
) -> None:
    """Run this script as a writer and SIGKILL it once `when` holds (or let it finish if it never does)."""
    command = [sys.executable, __file__, str(root), str(source_dir), name, sha256, str(size_bytes)]
    proc = subprocess.Popen(command)
    start = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - start < 60:
            if when(staged_bytes(root / ".staging"), time.monotonic() - start):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            time.sleep(0.0005)
        assert proc.returncode == 0, "the writer failed or hung"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main(argv: list[str]) -> int:
    root, source_dir, name, sha256, size_bytes = argv
    store = LocalAdapterStore(Path(root))
    files = {file_name: Path(source_dir) / file_name for file_name in SOURCE_FILES}
    store.put(name, files, metadata_factory(name, sha256, int(size_bytes)), "new_version")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
