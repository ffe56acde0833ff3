"""CPU threads: the engine's thread is the process's only multi-threaded torch thread.

torch's OpenMP runtime on Linux (libgomp) counts the threads of every thread team in the process, and once they
outnumber the CPUs it stops spin-waiting at the end of a parallel region and parks its threads in the kernel
instead. One team left behind by another thread (the main thread loading the model, a gRPC handler checking
an adapter, the adapter loader) is enough: from then on each of the engine's many small parallel regions pays
two wake-ups. On the 2-core VM a batch-8 linear of the default model took 2-3x longer on two threads than on
one in that state, and as expected when the engine's team was the only one (bench/README.md, "Threads").

So the engine thread claims its threads for itself: every other thread that starts torch work afterwards runs
it on one thread and never forms a team. torch has no per-thread setting, but OpenMP's thread count is a
per-thread value: torch.set_num_threads(1) sets the process default, then the engine thread raises its own
count again through the OpenMP runtime. MKL's count stays at one on the engine thread: its matmuls there are
the LoRA terms' small batched ones, which ran fastest on one thread, while the base linears go through oneDNN
(server/cpu_linear.py), which follows OpenMP's count.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)

# The OpenMP runtimes torch may link; only one already loaded by torch is used (never a second copy).
_OPENMP_LIBRARIES = ("libgomp.so.1", "libiomp5.so", "libomp.so")


def cpu_count() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def reserve_for_engine() -> None:
    """Run torch on one thread here and on threads started later; call before any torch work of the process.

    The model then loads on one thread, which leaves no OpenMP team behind on this thread for the engine's
    to compete with (a team lives as long as its thread).
    """
    torch.set_num_threads(1)


def claim_for_this_thread(threads: int) -> int:
    """Give the calling thread `threads` torch CPU threads (0: one per CPU) and every other thread one.

    Returns the calling thread's thread count. Where the OpenMP runtime cannot be reached, falls back to
    torch.set_num_threads (the count then applies to every thread).
    """
    wanted = threads or cpu_count()
    openmp = _loaded_library(_OPENMP_LIBRARIES, "omp_set_num_threads")
    if openmp is None or wanted == 1:
        torch.set_num_threads(wanted)
        return torch.get_num_threads()
    torch.get_num_threads()  # torch sets a thread's count from the process default on first use: use it now
    torch.set_num_threads(1)  # the process default, for threads that start torch work later
    openmp.omp_set_num_threads(ctypes.c_int(wanted))
    count = torch.get_num_threads()
    log.info("engine thread: %d torch threads; other threads: 1", count)
    return count


def _loaded_library(names: tuple[str, ...], symbol: str) -> ctypes.CDLL | None:
    """The first of `names` that is already loaded in this process and exports `symbol`."""
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 0)
    if not mode & getattr(os, "RTLD_NOLOAD", 0):
        return None  # no way to look without loading: do not risk a second runtime
    for name in names:
        try:
            library = ctypes.CDLL(name, mode=mode)
        except OSError:
            continue
        if hasattr(library, symbol):
            return library
    return None
