"""Core lists (the Linux cpu-list format) and pinning a process to cores."""
from __future__ import annotations

import os


def parse_cpu_list(spec: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8] (the Linux cpu-list format of taskset and cgroups); every core
    must be one this process may run on. ValueError names what is wrong."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"cpu list {spec!r}: {part!r} is not a core number or a range like 0-3") from None
        if first < 0 or last < first:
            raise ValueError(f"cpu list {spec!r}: {part!r} is not a range of core numbers")
        cpus.update(range(first, last + 1))
    allowed = available_cpus()
    outside = sorted(cpus - set(allowed))
    if outside:
        raise ValueError(f"cpu list {spec!r}: core(s) {outside} are not available to this process "
                         f"(available: {format_cpu_list(allowed)})")
    return sorted(cpus)


def available_cpus() -> list[int]:
    """The cores this process may run on (all of os.cpu_count() where affinity is not supported)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def format_cpu_list(cpus) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def pin_process(cpus: list[int]) -> None:
    """Confines every thread of this process (and the threads it starts later) to `cpus`.
    Call it before the model loads, so torch's thread pool starts on those cores."""
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("pinning to cores needs Linux (os.sched_setaffinity)")
    os.sched_setaffinity(0, cpus)
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    for tid in tasks:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread ended meanwhile
            pass


def team_cores(pin_threads: str, threads: int, cores: list[int]) -> list[int] | None:
    """The cores a worker's thread team is pinned to, thread i on the i-th (WorkerConfig.pin_threads),
    or None to leave its threads to the scheduler: `auto` pins a team of one thread per core it may
    run on (`cores`), whatever else runs there; a smaller team is left alone, as other workers may
    count on the cores it does not use."""
    if pin_threads == "off" or threads < 1:
        return None
    if pin_threads != "auto":
        raise ValueError(f"pin_threads must be auto or off, got {pin_threads!r}")
    return list(cores) if threads == len(cores) else None
