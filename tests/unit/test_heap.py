"""splitserve.heap: a worker's glibc arenas are capped before its threads start (one by default,
SPLITSERVE_MALLOC_ARENAS to change it), and the heap's free pages can be handed back."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from splitserve import heap

# In a fresh interpreter: cap the arenas as a worker does (or not), let four threads allocate, then
# count glibc's thread arenas: each is a 64 MiB reservation, an rw-p head followed by a ---p rest.
PROBE = r"""
import sys, threading
from splitserve import heap
cap = heap.limit_arenas() if sys.argv[1] == "cap" else 0
bufs = []
start, end = threading.Barrier(4), threading.Barrier(4)
def work():  # all four alive at once: a thread that ended hands its arena to the next one
    start.wait()
    for _ in range(50):
        bufs.append(bytearray(100_000))  # under the mmap threshold: from the thread's arena
    end.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
regions = []
with open("/proc/self/maps") as f:
    for line in f:
        parts = line.split()
        if len(parts) == 5:  # anonymous
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            regions.append((lo, hi, parts[1]))
arenas = sum(1 for a, b in zip(regions, regions[1:])
             if a[2] == "rw-p" and b[2] == "---p" and a[1] == b[0] and b[1] - a[0] == 64 << 20)
print(cap, arenas)
"""


def _probe(mode: str, **env_vars) -> tuple[int, int]:
    env = {**os.environ, **env_vars}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cap, arenas = map(int, out.stdout.split())
    return cap, arenas


@pytest.mark.skipif(heap._libc() is None, reason="the C library is not glibc (its malloc has no arenas)")
def test_a_capped_process_makes_no_thread_arenas():
    assert _probe("free") [1] >= 2  # glibc's default: an arena per thread (up to 8 per core)
    assert _probe("cap") == (1, 0)  # the worker's default: the main heap only
    cap, arenas = _probe("cap", SPLITSERVE_MALLOC_ARENAS="0")  # glibc's default kept
    assert cap == 0 and arenas >= 2
    assert _probe("cap", SPLITSERVE_MALLOC_ARENAS="3") == (3, 2)  # the main heap and two more


def test_a_bad_arena_count_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("SPLITSERVE_MALLOC_ARENAS", "-1")
    with pytest.raises(ValueError, match="SPLITSERVE_MALLOC_ARENAS"):
        heap.limit_arenas()
    monkeypatch.setenv("SPLITSERVE_MALLOC_ARENAS", "one")
    with pytest.raises(ValueError, match="SPLITSERVE_MALLOC_ARENAS"):
        heap.limit_arenas()


@pytest.mark.skipif(heap._libc() is None, reason="the C library is not glibc")
def test_trim_hands_freed_heap_pages_back():
    probe = r"""
from splitserve import heap
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
keep, drop = [], []
for i in range(4000):  # 16 KB chunks, every other one kept: the freed ones are holes, not the heap's top
    (keep if i % 2 else drop).append(bytearray(16_000))
before = rss()
del drop
after_free = rss()
heap.trim()
print(before - after_free, after_free - rss())
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    freed_by_free, freed_by_trim = map(int, out.stdout.split())
    assert freed_by_free < 4000  # KiB: free() alone leaves the holes resident
    assert freed_by_trim > 16000  # most of the 2000 x 16 KB holes
