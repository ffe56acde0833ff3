"""The C allocator: how much freed memory a long-running server keeps.

glibc's malloc gives each thread that allocates concurrently an arena of its own, up to 8 per core, and an arena
keeps memory that was freed for later reuse rather than return it to the system. A server's threads (the engine,
the event loop, gRPC's pollers, the adapter loader, worker threads) each allocate tensors of ever-changing shapes,
so RSS ratchets up under load and stays there (bench/README.md, "Soak"). Fewer arenas share their free lists:
`--malloc-arenas` (2 by default) is set once at start-up, before the model loads and threads start. And glibc gives
freed pages inside a heap back to the system only when asked (`malloc_trim`): `--malloc-trim-seconds` asks every
so often, from a thread of its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def _glibc() -> Any | None:
    """The C library, when it is glibc (whose malloc has these knobs); None elsewhere."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    return libc


def limit_malloc_arenas(count: int) -> bool:
    """At most `count` malloc arenas (0: the allocator's default); whether the limit is in force. Only glibc has
    this knob: elsewhere it says so and changes nothing."""
    if count <= 0:
        log.info("malloc arenas: the allocator's default")
        return False
    libc = _glibc()
    if libc is None:
        log.info("malloc arenas: not glibc's malloc, --malloc-arenas %d has no effect", count)
        return False
    if libc.mallopt(M_ARENA_MAX, count) != 1:
        raise RuntimeError(f"glibc refused mallopt(M_ARENA_MAX, {count})")
    log.info("malloc arenas: at most %d (glibc)", count)
    return True


class MallocTrimmer:
    """Every `seconds`, `malloc_trim(0)`: freed memory inside glibc's heaps goes back to the system (a scan of the
    free lists, milliseconds). `start` returns None where the allocator is not glibc or `seconds` is 0."""

    def __init__(self, libc: Any, seconds: float) -> None:
        self._libc = libc
        self._seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="quiver-malloc-trim", daemon=True)

    @classmethod
    def start(cls, seconds: float) -> MallocTrimmer | None:
        libc = _glibc() if seconds > 0 else None
        if libc is None:
            log.info("malloc trim: off" if seconds <= 0 else "malloc trim: not glibc's malloc, off")
            return None
        trimmer = cls(libc, seconds)
        trimmer._thread.start()
        log.info("malloc trim: every %g s (glibc)", seconds)
        return trimmer

    def _run(self) -> None:
        while not self._stop.wait(self._seconds):
            self._libc.malloc_trim(0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
