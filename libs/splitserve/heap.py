"""How a worker process's C heap gives memory back (glibc's malloc; elsewhere every call is a no-op).

Two habits of glibc's allocator keep a serving process's resident set well above what it uses:
- Every thread that allocates while another holds the main heap's lock gets an arena of its own
  (up to 8 per core), and an arena returns memory only from its top. A worker's gRPC threads
  receive KV blocks, build messages and parse requests, so each ends up holding megabytes it has
  freed: on the default model's decode worker, 32 streams and a 1K-token prefix grew the peak RSS
  by 47 MiB more with the default arenas than with one.
- Freed memory in the middle of a heap stays resident until `malloc_trim` hands its pages back.
  Loading a model frees its file copies and fused parts between the blocks it keeps: 14 MiB.

`limit_arenas` (before the threads start) and `trim` (after a load, and when the engine goes idle)
address both. One arena costs nothing measurable here: the engine's hot loop is one thread, its
kernels' OpenMP threads do not allocate, and the gRPC threads take turns on the GIL anyway.
SPLITSERVE_MALLOC_ARENAS sets the arena count (0: glibc's default), to compare or to rule it out.

`freeze_objects` is about Python's own collector, the other thing a long-lived process pays for
what it built at startup: see there.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

from splitserve.config import env

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


@functools.cache
def _libc():
    """glibc's handle, or None where malloc is another allocator (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallopt"):
        return None
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def limit_arenas() -> int:
    """Caps glibc's arenas at SPLITSERVE_MALLOC_ARENAS (default 1; 0 leaves glibc's default). Only
    arenas made afterwards obey it: call it before the process starts its threads. Returns the cap
    set (0 when none was, or the allocator is not glibc's)."""
    arenas = env.MALLOC_ARENAS.read()
    libc = _libc()
    if not arenas or libc is None:
        return 0
    if libc.mallopt(M_ARENA_MAX, arenas) != 1:
        logger.warning("mallopt(M_ARENA_MAX, %d) failed: the C heap keeps glibc's default arenas", arenas)
        return 0
    return arenas


def trim() -> bool:
    """Hands the heap's free pages back to the system (malloc_trim(0)); True when some went."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def freeze_objects() -> int:
    """Collects once, then moves every Python object alive to the collector's permanent generation
    (gc.freeze), which no later collection walks; returns how many there are. Call it once a process
    has built what it keeps (a worker: after its engine). A worker's modules, classes and model hold
    ~180K tracked objects, and each full collection walked them all with the GIL held: 60 ms in
    which no step, gRPC call or heartbeat of the process ran. What is frozen is never collected, so
    call it after startup's garbage is gone (the collection first), not on a path that repeats."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
