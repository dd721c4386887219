"""Temporary directories named for the process that owns them (`<prefix><pid>-<random>`), so a later
start can tell what a killed run left behind (its owner is gone) and remove it. The embedded Redis
and the kvstore's shared-memory area name their directories this way; preflight removes leftovers."""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

log = logging.getLogger("splitserve.launch")


def owned_prefix(prefix: str) -> str:
    """The name prefix of a temporary directory this process owns: `<prefix><pid>-` (mkdtemp adds
    the random part); `remove_dead_owners` reads the pid back."""
    return f"{prefix}{os.getpid()}-"


def owner_pid(name: str, prefix: str) -> int | None:
    """The owner pid in a name made with owned_prefix(prefix); None for any other name."""
    if not name.startswith(prefix):
        return None
    pid = name[len(prefix):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (a zombie counts: its parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def remove_dead_owners(base: str, prefix: str, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Removes the directories under `base` named by owned_prefix(prefix) whose owner no longer
    runs, unless keep(path) says otherwise; returns their paths. Touches only this user's real
    directories (no symlinks); a pid in use again keeps its directory (removed once that ends)."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    removed = []
    for entry in entries:
        pid = owner_pid(entry.name, prefix)
        if pid is None or pid == os.getpid():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if pid_alive(pid) or (keep is not None and keep(entry.path)):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
        log.info("removed what a process that is gone left behind: path=%s pid=%d", entry.path, pid)
    return removed
