"""What must hold before `splitserve up` (or one worker role) starts anything, checked up front so
that a mistake fails at once with one line naming it, not minutes later in a child's log:

- the model (--model) is a file or folder the loader can read: the loader's own resolution and
  rules (splitserve.model.paths), without importing torch;
- every fixed port (the gateway's gRPC and HTTP ports, fixed metrics ports) is free: each is bound
  once and released, so a second `up` on the same ports stops before it loads a model;
- once the gateway answers its health check, the answer came from the gateway this run started:
  the child is alive and holds the listening socket (a health check alone also succeeds against
  another process that serves the port);
- temporary directories of killed processes are removed. Each one splitserve makes is named
  `<prefix><owner pid>-<random>` (owned_dirs.py); a start removes those whose owner no longer
  runs: the embedded Redis's directory under the temp dir, the kvstore's
  shared-memory directory (splitserve.kvstore.shm).

Errors are PreflightError (a ValueError: the command line prints its message as one line and exits
with status 2).
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

WORKER_ROLES = ("prefill", "decode", "colocated")  # the roles that load a model


class PreflightError(ValueError):
    """A start that cannot work; the message names the flag, the file or the port."""


# ---------------------------------------------------------------------------------------- model
def check_model(model: str | None) -> Path:
    """The resolved model path (None: the default model); PreflightError naming the file when the
    loader would refuse it (missing, a folder that is no checkpoint, a file that is not GGUF)."""
    from splitserve.model.paths import check_model_path

    try:
        return check_model_path(model)
    except (FileNotFoundError, ValueError) as exc:
        raise PreflightError(f"--model: {exc}") from None


def check_role_args(role: str, argv: list[str]) -> None:
    """`splitserve ROLE ARGV...`: for a worker role, the --model check before its module (and torch)
    is imported. Everything else is left to the role's own parser (it also prints --help)."""
    if role not in WORKER_ROLES or any(a in ("-h", "--help") for a in argv):
        return
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model", default="")
    known, _ = parser.parse_known_args(argv)
    check_model(known.model or None)  # "" is the worker config's "the default model"


# ---------------------------------------------------------------------------------------- ports
def check_ports_free(host: str, ports: Mapping[str, int]) -> None:
    """PreflightError naming the flag and port when a fixed port (flag -> port; 0: picked later,
    not checked) is given twice or cannot be bound on `host` now."""
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if not port:
            continue
        if port in seen:
            raise PreflightError(f"{flag} {port}: the same port as {seen[port]}")
        seen[port] = flag
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # as the servers bind (SO_REUSEADDR): a port in TIME_WAIT is free to them, a listener is not
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise PreflightError(f"{flag} {port}: port {port} on {host} is in use ({exc.strerror or exc}); "
                                     f"is another splitserve running? Stop it or choose another port") from None


def check_up(args: argparse.Namespace, metrics_ports: Mapping[str, int] | None = None) -> None:
    """Everything `splitserve up` checks before it starts Redis, the kvstore or a worker: the model,
    the fixed ports (plus `metrics_ports`, flag -> port), and leftovers of a killed run removed."""
    check_model(args.model or None)
    check_ports_free(args.host, {"--grpc-port": args.grpc_port, "--http-port": args.http_port,
                                 **(metrics_ports or {})})
    remove_leftovers()


def check_serves(proc: subprocess.Popen, name: str, ports: Iterable[int]) -> None:
    """After `name` answered on `ports`: RuntimeError unless it is still running and holds a
    listening socket on each of them (else the answer came from another process on the port)."""
    if proc.poll() is not None:
        raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
    own = _socket_inodes(proc.pid)
    if own is None:  # no /proc (not Linux): the liveness check is all there is
        return
    for port in ports:
        if not own & _listening_inodes(port):
            raise RuntimeError(f"port {port} answers, but not from the {name} this run started (pid {proc.pid}): "
                               f"another process serves it")


def _listening_inodes(port: int) -> set[int]:
    """Socket inodes of every TCP listener on `port` in this network namespace (/proc/net/tcp*)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int] | None:
    """Inodes of the sockets process `pid` has open; None where /proc cannot say (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()  # gone (poll() races its exit) or not ours: it holds nothing we can see
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


# ---------------------------------------------------------------------------------------- leftovers
def remove_leftovers(shm_dir: str | None = None) -> list[str]:
    """Removes what killed runs left: embedded Redis directories under the temp dir and kvstore
    shared-memory directories under `shm_dir` (default: the kvstore's default)."""
    from splitserve.config.kvstore import KVStoreConfig
    from splitserve.kvstore import shm
    from splitserve.ownership.redis_server import remove_leftovers as remove_redis_leftovers

    return remove_redis_leftovers() + shm.remove_orphans(shm_dir or KVStoreConfig().shm_dir)
