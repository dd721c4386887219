"""The kvstore's private shared-memory directory (tmpfs, /dev/shm by default): where the block
arenas live (splitserve.kvstore.arena), and how a client proves it sees the same directory.

Why: on one host a gRPC stream copies every byte through HTTP/2 framing, the loopback TCP stack
and protobuf, and tops out near 1 GB/s on a small machine. Through the directory a put is one copy
(the client's write into a slot of an arena file; the store checks the slot in place and keeps it as
the block's storage) and a get is one copy (the client's read of the slot). Across hosts (or
containers without a shared /dev/shm) the client cannot see the directory and the gRPC streams are
used; nothing else changes (same checks, same leases).

The store owns one directory (mode 0700, so only processes of the same user can use it):
    <base>/splitserve-kv-<pid>-<random>/
        probe                a random token; a client that reads the token Info returned shares the dir
        host                 the store's host name (orphan removal skips other hosts' directories)
        arena-<slot_size>    the slots of blocks whose payload is slot_size bytes (arena.py)
Files are created with O_EXCL and mode 0600. Arena names received over gRPC must match
`_ARENA_NAME` (no directory part), so a reply can never name a path outside the directory. The
directory is removed when the store stops, and directories of store processes that no longer exist
are removed (arenas included) when a store starts.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket

from splitserve.owned_dirs import owned_prefix, remove_dead_owners

log = logging.getLogger(__name__)

DIR_PREFIX = "splitserve-kv-"
PROBE_NAME = "probe"
HOST_NAME = "host"
_ARENA_NAME = re.compile(r"^arena-[1-9][0-9]{0,15}$")


class ShmNameError(ValueError):
    """A file name received over gRPC that is not one of ours."""


def arena_name(slot_size: int) -> str:
    """The file name of the arena of `slot_size`-byte payloads."""
    return f"arena-{slot_size}"


def check_arena_name(name: str) -> str:
    """`name` when it is an arena file name; ShmNameError otherwise."""
    if not _ARENA_NAME.match(name):
        raise ShmNameError(f"arena must look like 'arena-<slot size>', got {name[:80]!r}")
    return name


def write_file(path: str, data: bytes) -> None:
    """Creates `path` (O_EXCL, mode 0600) holding `data`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done:])
    finally:
        os.close(fd)


class ShmArea:
    """The store's private directory under `base`; see the module docstring."""

    def __init__(self, base: str):
        self.base = os.path.abspath(base)
        if not os.path.isdir(self.base):
            raise OSError(f"shared-memory directory {self.base} does not exist")
        remove_orphans(self.base)
        self.path = os.path.join(self.base, f"{owned_prefix(DIR_PREFIX)}{secrets.token_hex(4)}")
        os.mkdir(self.path, 0o700)
        self.token = secrets.token_bytes(16)
        write_file(os.path.join(self.path, PROBE_NAME), self.token)
        write_file(os.path.join(self.path, HOST_NAME), socket.gethostname().encode())

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_orphans(base: str) -> list[str]:
    """Removes directories of kvstore processes that no longer run (killed before they could clean
    up), with their arenas; returns their paths. Only our own directories (by name and owner) of
    this host are touched."""
    return remove_dead_owners(base, DIR_PREFIX, keep=_other_host)


def _other_host(path: str) -> bool:
    """Whether the directory is another host's (or container's) store sharing this directory: its
    pid says nothing here. Without a host file (created before it was written, or damaged) it is
    judged by pid alone."""
    try:
        with open(os.path.join(path, HOST_NAME), "rb") as f:
            return f.read().decode(errors="replace") != socket.gethostname()
    except OSError:
        return False
