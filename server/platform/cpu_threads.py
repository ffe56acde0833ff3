"""CPU threads: the engine's thread is the process's only multi-threaded torch thread.

torch's OpenMP runtime on Linux (libgomp) counts the threads of every thread team in the process, and once they
outnumber the CPUs it stops spin-waiting at the end of a parallel region and parks its threads in the kernel
instead. One team left behind by another thread (the main thread loading the model, a gRPC handler checking
an adapter, the adapter loader) is enough: from then on each of the engine's many small parallel regions pays
two wake-ups, and two threads run slower than one (measured in bench/README.md, "Threads").

So the engine thread claims its threads for itself: every other thread that starts torch work afterwards runs
it on one thread and never forms a team. torch has no per-thread setting, but OpenMP's thread count is a
per-thread value: torch.set_num_threads(1) sets the process default, then the engine thread raises its own
count again through the OpenMP runtime. The base linears go through oneDNN (server/platform/cpu_linear.py), which
follows that count. MKL, which runs the LoRA terms' batched matmuls, keeps a count per thread, and
torch.set_num_threads(1) had set the engine thread's to one; the engine thread raises it again through
`MKL_Set_Num_Threads_Local`, which torch's x86 builds export (docs/engine.md, "On a CPU", has what it
saves). Without MKL there is nothing to raise.

The default count is read when this module is imported, so it must be imported before a process changes
torch's threads: importing quiver.server.platform (as the engine does) takes care of that.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

# torch's own choice (physical cores, or OMP_NUM_THREADS), read before anything here changes it.
_TORCH_DEFAULT_THREADS = torch.get_num_threads()
_OPENMP_NAMES = ("libgomp", "libiomp", "libomp")  # file-name prefixes of the runtimes torch links


def default_threads() -> int:
    """torch's default CPU thread count for this process (what `--threads 0` means)."""
    return _TORCH_DEFAULT_THREADS


def reserve_for_engine() -> None:
    """Run torch on one thread here and on threads that start torch work later; call before the process's
    first torch work.

    The model then loads on one thread, which leaves no OpenMP team behind on this thread for the engine's
    to compete with (a team lives as long as its thread).
    """
    torch.set_num_threads(1)


def claim_for_this_thread(threads: int) -> int:
    """Give the calling thread `threads` torch CPU threads (0: torch's default), and make one thread the
    default for threads that start torch work later (threads that already ran torch keep their count).

    Returns the calling thread's thread count. Where the OpenMP runtime cannot be reached or does not take
    the count, falls back to torch.set_num_threads: the count then applies to every thread.
    """
    wanted = threads or default_threads()
    openmp = openmp_runtime()
    if openmp is None or wanted == 1:
        torch.set_num_threads(wanted)
        return torch.get_num_threads()
    torch.get_num_threads()  # torch sets a thread's count from the process default on first use: use it now
    torch.set_num_threads(1)  # the process default, for threads that start torch work later
    openmp.omp_set_num_threads(ctypes.c_int(wanted))
    count = torch.get_num_threads()
    if count != wanted:  # not the runtime torch uses after all
        log.warning("could not set the engine thread's own OpenMP threads; using %d for every thread", wanted)
        torch.set_num_threads(wanted)
        return torch.get_num_threads()
    # The C entry, by value: the lowercase `mkl_set_num_threads_local` exported beside it takes a pointer.
    mkl_set_local = _mkl_function("MKL_Set_Num_Threads_Local")
    if mkl_set_local is not None:
        mkl_set_local(ctypes.c_int(count))
    log.info("engine thread: %d torch threads (MKL: %s); threads that start torch work later: 1", count,
             mkl_threads())
    return count


def mkl_threads() -> int | None:
    """The calling thread's MKL thread count; None without MKL."""
    get = _mkl_function("MKL_Get_Max_Threads")
    if get is None:
        return None
    get.restype = ctypes.c_int
    count: int = get()
    return count


def _mkl_function(name: str) -> Any | None:
    """`name` from the torch library that links MKL (x86 builds), if it is loaded and exports it."""
    library = _already_loaded(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    return getattr(library, name, None) if library is not None else None


def openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime already loaded in this process, preferring a copy shipped inside torch; None where
    that cannot be found without loading a library (no /proc, no RTLD_NOLOAD)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)  # also the prefix of wheels' "torch.libs" folder
    candidates = sorted(
        (p for p in paths if os.path.basename(p).startswith(_OPENMP_NAMES)), key=lambda p: not p.startswith(torch_dir)
    )
    for path in candidates:
        library = _already_loaded(path)
        if library is not None and hasattr(library, "omp_set_num_threads"):
            return library
    return None


def _already_loaded(path: str) -> ctypes.CDLL | None:
    """A handle on the library at `path` if the process has loaded it; never loads one (None without
    RTLD_NOLOAD)."""
    noload = getattr(os, "RTLD_NOLOAD", None)
    if noload is None:
        return None
    try:
        return ctypes.CDLL(path, mode=noload | os.RTLD_LAZY)
    except OSError:
        return None
