"""The kvstore's same-host data path: block payloads travel as files in a shared-memory directory
(tmpfs, /dev/shm by default), gRPC carries only headers and file names.

Why: on one host a gRPC stream copies every byte through HTTP/2 framing, the loopback TCP stack
and protobuf, and tops out near 1 GB/s on a small machine. Here a put is one copy (the client's
write into tmpfs; the store checks the file through a read-only mapping and keeps it as the
block's storage), and a get is none on the store's side (a hard link) and a mapping on the
client's. Across hosts (or containers without a shared /dev/shm) the client cannot see the
directory and the gRPC streams are used; nothing else changes (same checks, same leases).

The store owns one private directory (mode 0700, so only processes of the same user can use it):
    <base>/splitserve-kv-<pid>-<random>/
        probe            a random token; a client that reads the token Info returned shares the dir
        host             the store's host name (orphan removal skips other hosts' directories)
        put-<id>         one block written by a client (PutFile); renamed to blk-<id> when stored,
                         deleted otherwise
        blk-<id>         a stored block's payload; deleted when the block leaves the store
        get-<id>         a hard link to a blk-<id> for one GetFile; the client deletes it after
                         mapping it (the data lives until the last link and mapping are gone)
Files are created with O_EXCL and mode 0600. File names received over gRPC must match
`_NAME` (no directory part), so a request can never name a path outside the directory. put- and
get- files a crashed peer left behind are swept after `file_ttl_s`; the directory is removed when
the store stops, and directories of store processes that no longer exist are removed at start-up.
"""
from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import shutil
import socket
import threading
import time

log = logging.getLogger(__name__)

DIR_PREFIX = "splitserve-kv-"
PROBE_NAME = "probe"
HOST_NAME = "host"
_NAME = re.compile(r"^(put|get)-[0-9a-f]{32}$")  # what clients may name; blk- files are the store's


class ShmNameError(ValueError):
    """A file name received over gRPC that is not one of ours."""


def new_file_name(kind: str) -> str:
    """A fresh name for a put or get file."""
    return f"{kind}-{secrets.token_hex(16)}"


def check_name(name: str, kind: str = "") -> str:
    """`name` when it is a put-/get- file name (of `kind`, when given); ShmNameError otherwise."""
    if not _NAME.match(name) or (kind and not name.startswith(kind + "-")):
        raise ShmNameError(f"file_name must look like '{kind or 'put'}-<32 hex digits>', got {name[:80]!r}")
    return name


def map_file(path: str, size: int) -> "mmap.mmap | bytes":
    """A read-only mapping of a file that must hold exactly `size` bytes (b"" when size is 0);
    ValueError naming the sizes when it does not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ValueError(f"the file holds {actual} bytes, the block's header says {size}")
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else b""
    finally:
        os.close(fd)


def write_file(path: str, data: bytes | memoryview) -> None:
    """Creates `path` (O_EXCL, mode 0600) holding `data`. On any error the partial file is removed
    and the OSError raised."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        done = 0
        while done < view.nbytes:  # one write on tmpfs; a short one is finished here
            done += os.write(fd, view[done:])
    except BaseException:
        os.close(fd)
        remove_quietly(path)
        raise
    os.close(fd)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e)


class ShmArea:
    """The store's private directory under `base`; see the module docstring."""

    def __init__(self, base: str, file_ttl_s: float = 60.0):
        self.base = os.path.abspath(base)
        if not os.path.isdir(self.base):
            raise OSError(f"shared-memory directory {self.base} does not exist")
        remove_orphans(self.base)
        self.path = os.path.join(self.base, f"{DIR_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(self.path, 0o700)
        self.token = secrets.token_bytes(16)
        write_file(os.path.join(self.path, PROBE_NAME), self.token)
        write_file(os.path.join(self.path, HOST_NAME), socket.gethostname().encode())
        self.file_ttl_s = file_ttl_s
        self._last_sweep = time.monotonic()
        self._sweep_lock = threading.Lock()

    def file_path(self, name: str, kind: str = "") -> str:
        """Absolute path of a put/get file (of `kind`, when given); ShmNameError for anything else."""
        return os.path.join(self.path, check_name(name, kind))

    def block_path(self, put_name: str) -> str:
        """Where a stored block's file lives: put-<id> becomes blk-<id>."""
        return os.path.join(self.path, "blk-" + check_name(put_name, "put")[4:])

    def link_for_get(self, block_path: str) -> str:
        """A new get-<id> hard link to a stored block's file; returns its name. OSError when the
        block's file is gone (evicted meanwhile)."""
        name = new_file_name("get")
        os.link(block_path, os.path.join(self.path, name))
        return name

    def sweep(self, force: bool = False) -> int:
        """Deletes put/get files older than file_ttl_s (a client that crashed between the two halves
        of a transfer); runs at most every file_ttl_s / 4 unless forced. Returns how many it removed."""
        now = time.monotonic()
        if not force and now - self._last_sweep < self.file_ttl_s / 4:
            return 0
        if not self._sweep_lock.acquire(blocking=False):
            return 0
        try:
            self._last_sweep = now
            cutoff, removed = time.time() - self.file_ttl_s, 0
            with os.scandir(self.path) as entries:
                for entry in entries:
                    if _NAME.match(entry.name):
                        try:
                            if entry.stat().st_mtime < cutoff:
                                os.unlink(entry.path)
                                removed += 1
                        except FileNotFoundError:
                            pass
            if removed:
                log.warning("removed %d stale shared-memory transfer file(s) from %s", removed, self.path)
            return removed
        finally:
            self._sweep_lock.release()

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_orphans(base: str) -> None:
    """Removes directories of kvstore processes that no longer run (killed before they could clean
    up). Only our own directories (by name and owner) are touched."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(DIR_PREFIX):
            continue
        try:
            pid = int(entry.name[len(DIR_PREFIX):].split("-", 1)[0])
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or not entry.is_dir(follow_symlinks=False):
                continue
        except (ValueError, OSError):
            continue
        try:
            with open(os.path.join(entry.path, HOST_NAME), "rb") as f:
                if f.read().decode(errors="replace") != socket.gethostname():
                    continue  # another host's (or container's) store sharing this directory
        except OSError:
            pass  # created before its host file was written, or damaged: judged by pid alone
        if not _pid_alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("removed the shared-memory directory of a kvstore that is gone: %s", entry.path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
