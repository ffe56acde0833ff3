"""--malloc-arenas and --malloc-trim-seconds: glibc's knobs, used where glibc is the allocator and nowhere else."""

from __future__ import annotations

import platform

import pytest

from quiver.server.config import ServerConfig
from quiver.server.platform.allocator import MallocTrimmer, limit_malloc_arenas


def test_the_limit_is_set_on_glibc_and_zero_leaves_the_default(caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="quiver.server.platform.allocator")
    assert limit_malloc_arenas(0) is False
    glibc = platform.libc_ver()[0] == "glibc"
    assert limit_malloc_arenas(2) is glibc
    assert ("at most 2 (glibc)" if glibc else "no effect") in caplog.text  # chosen once at start-up, and logged


def test_a_negative_count_is_refused():
    with pytest.raises(ValueError, match="--malloc-arenas"):
        ServerConfig(malloc_arenas=-1)


def test_the_trimmer_gives_freed_heap_memory_back(caplog: pytest.LogCaptureFixture):
    import ctypes
    import time

    caplog.set_level("INFO", logger="quiver.server.platform.allocator")
    assert MallocTrimmer.start(0) is None
    if platform.libc_ver()[0] != "glibc":
        assert MallocTrimmer.start(0.05) is None
        return

    def rss_kib() -> int:
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(1600)]  # 100 MiB in heap chunks, under the mmap threshold
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    kept = blocks.pop(-1)  # keeps the freed chunks below it from being the heap's top: only a trim returns them
    before_free = rss_kib()
    for block in blocks:
        libc.free(block)
    freed = rss_kib()
    trimmer = MallocTrimmer.start(0.05)
    assert trimmer is not None and "every 0.05 s (glibc)" in caplog.text
    try:
        time.sleep(0.5)
        trimmed = rss_kib()
    finally:
        trimmer.stop()
        libc.free(kept)
    assert freed > before_free - 20 * 1024  # glibc kept most of the freed 100 MiB ...
    assert trimmed < freed - 50 * 1024  # ... and the trimmer gave it back
