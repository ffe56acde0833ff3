"""The C allocator's arenas: how much freed memory a long-running server keeps.

glibc's malloc gives each thread that allocates concurrently an arena of its own, up to 8 per core, and an arena
keeps memory that was freed for later reuse rather than return it to the system. A server's threads (the engine,
the event loop, gRPC's pollers, the adapter loader, worker threads) each allocate tensors of ever-changing shapes,
so RSS ratchets up under load and stays there (bench/README.md, "Soak"). Fewer arenas share their free lists:
`--malloc-arenas` (2 by default) is set once at start-up, before the model loads and threads start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)


def limit_malloc_arenas(count: int) -> bool:
    """At most `count` malloc arenas (0: the allocator's default); whether the limit is in force. Only glibc has
    this knob: elsewhere it says so and changes nothing."""
    if count <= 0:
        log.info("malloc arenas: the allocator's default")
        return False
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        log.info("malloc arenas: not glibc's malloc, --malloc-arenas %d has no effect", count)
        return False
    if libc.mallopt(M_ARENA_MAX, count) != 1:
        raise RuntimeError(f"glibc refused mallopt(M_ARENA_MAX, {count})")
    log.info("malloc arenas: at most %d (glibc)", count)
    return True
