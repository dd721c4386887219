"""The command line as a new user meets it, through real processes: a bad --model, ports already in
use, Ctrl-C in `splitserve demo`, and what a SIGKILLed `splitserve up` leaves in the temp dirs."""
from __future__ import annotations

import os
import pty
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from services_fixture import _children
from splitserve.kvstore import shm
from splitserve import owned_dirs
from splitserve.launch import preflight
from splitserve.launch.up import free_port
from splitserve.ownership import redis_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")

CLI = [sys.executable, "-m", "splitserve.launch.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
STARTED = ("embedded redis started", "started kvstore", "started prefill", "started decode", "started gateway",
           "engine ready")  # log lines of a start that got past the checks


def _run(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout_s, env=ENV)


def _refused(result: subprocess.CompletedProcess, *names: str) -> None:
    """The command failed with one error line naming each of `names`, and started nothing."""
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Traceback" not in out and "splitserve is up" not in out, out
    assert not any(s in out for s in STARTED), out
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], out
    assert all(n in lines[0] for n in names), out


# ---------------------------------------------------------------------------------------- a bad --model
@pytest.mark.parametrize("kind", ["missing", "folder", "not-gguf"])
def test_up_refuses_a_bad_model_before_starting_anything(tmp_path, kind):
    model = {"missing": tmp_path / "absent.gguf", "folder": tmp_path, "not-gguf": tmp_path / "weights.bin"}[kind]
    if kind == "not-gguf":
        model.write_text("not a model\n")
    start = time.monotonic()
    result = _run("up", "--model", str(model), "--grpc-port", str(free_port()), "--http-port", "0")
    _refused(result, str(model))
    assert time.monotonic() - start < 30, "the check must not wait for a model load"


def test_a_worker_role_refuses_a_bad_model(tmp_path):
    model = tmp_path / "weights.bin"
    model.write_text("not a model\n")
    result = _run("prefill", "--model", str(model), "--port", "0")
    _refused(result, str(model))
    assert result.stderr.startswith("splitserve prefill: error: --model: ")


@pytest.mark.parametrize("variable,value", [("SPLITSERVE_MALLOC_ARENAS", "one"), ("SPLITSERVE_MALLOC_ARENAS", "-2"),
                                            ("SPLITSERVE_CPU_ATTENTION_COPY", "avx1024"),
                                            ("SPLITSERVE_CPU_INT8", "fastest")])
@pytest.mark.parametrize("command", [["up", "--http-port", "0"], ["decode", "--port", "0"]])
def test_a_bad_splitserve_variable_is_refused_before_anything_starts(variable, value, command):
    """A worker used to exit with a traceback while `up` waited for it; every command now reads
    every SPLITSERVE_* variable first."""
    start = time.monotonic()
    result = subprocess.run([*CLI, *command], capture_output=True, text=True, timeout=60,
                            env={**ENV, variable: value})
    _refused(result, variable, repr(value))
    assert time.monotonic() - start < 30, "the check must not wait for a model load"


# ---------------------------------------------------------------------------------------- ports in use
def test_up_refuses_ports_in_use_without_loading_a_model():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        _refused(_run("up", "--grpc-port", str(port), "--http-port", "0"), f"--grpc-port {port}")
        _refused(_run("up", "--grpc-port", str(free_port()), "--http-port", str(port)), f"--http-port {port}")


def test_a_health_answer_from_another_process_is_not_taken_for_the_gateway():
    """The race a start can lose: the port was free at the check, then another server took it before
    the gateway child bound it. The health check alone succeeds (that server answers); up's readiness
    check also wants its child to hold the port, and names it."""
    from splitserve.rpc import add_health_and_reflection, create_server, wait_until_serving

    other, port = create_server("127.0.0.1", 0, max_workers=2)
    add_health_and_reflection(other, [])
    other.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # never binds
    try:
        wait_until_serving(f"127.0.0.1:{port}", timeout_s=10)
        with pytest.raises(RuntimeError, match=rf"^port {port} answers, but not from the gateway this run started"):
            preflight.check_serves(child, "gateway", [port])
        preflight.check_serves(_Self(), "gateway", [port])  # the process that does hold it passes
    finally:
        child.kill()
        child.wait()
        other.stop(0)


class _Self:
    """This process, as check_serves sees a child (it holds the test server's socket)."""
    pid = os.getpid()

    def poll(self) -> None:
        return None


# ---------------------------------------------------------------------------------------- Ctrl-C in demo
# Runs the command with SIGINT at its default action, as in a terminal: a test run started in the
# background of a shell without job control inherits SIGINT ignored, and so would the demo.
DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.argv[1], sys.argv[1:])"]


class _Demo:
    """`splitserve demo` with a terminal as standard input (so it prompts), its stderr collected."""

    def __init__(self) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([*DEFAULT_SIGINT, *CLI, "demo", "--dtype", "float32", "--kv-cache-memory-gb",
                                      "0.05"], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        os.close(slave)
        self.err = b""
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while chunk := self.proc.stderr.read1(4096):
            with self._lock:
                self.err += chunk

    def wait_for(self, text: bytes, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.err:
            assert self.proc.poll() is None, f"demo exited ({self.proc.returncode}): {self.err.decode()}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout_s:.0f} s: {self.err.decode()}"
            time.sleep(0.05)

    def interrupt(self) -> tuple[int, str]:
        """SIGINT (what Ctrl-C sends); the exit status and everything it wrote to stderr."""
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)
        time.sleep(0.1)  # the pump reads the rest of the pipe
        return code, self.err.decode()


@pytest.mark.parametrize("when", ["loading", "at the prompt"])
def test_ctrl_c_in_demo_exits_quietly(when):
    demo = _Demo()
    demo.wait_for(b"loading " if when == "loading" else b"> ")
    code, err = demo.interrupt()
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    if when == "loading":
        assert "Type a message" not in err, "the signal came after loading: the test did not test loading"
    else:
        assert err.endswith("> \n"), err  # the prompt, then the newline of the interrupted line


# ---------------------------------------------------------------------------------------- SIGKILL of up
def _state(pid: int) -> str | None:
    """The process's state letter (Z: zombie), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _owner(path: str) -> int | None:
    """The owner pid in the name of one of our temp directories (None: not one of ours)."""
    name = os.path.basename(path)
    return owned_dirs.owner_pid(name, redis_server.DIR_PREFIX) or owned_dirs.owner_pid(name, shm.DIR_PREFIX)


def test_second_up_on_a_running_stacks_ports_fails(http_stack):
    """A second `up` on the first one's gateway ports stops at once, naming the port; it never
    reaches the first one's gateway and says it is up."""
    grpc_port = http_stack.gateway.rsplit(":", 1)[1]
    http_port = http_stack.http_base.rsplit(":", 1)[1].split("/")[0]
    _refused(_run("up", "--grpc-port", grpc_port, "--http-port", "0"), f"--grpc-port {grpc_port}")
    _refused(_run("up", "--grpc-port", str(free_port()), "--http-port", http_port), f"--http-port {http_port}")


def test_sigkilled_up_leaves_nothing_a_start_does_not_clean():
    """`up` is killed (SIGKILL: none of its own clean-up runs) as soon as the embedded Redis and the
    kvstore have made their temp directories, while the workers still load: the children die with
    it, and what they leave is removed by the next start's clean-up."""

    def snapshot() -> set[str]:
        return {os.path.join(d, n) for d in (tempfile.gettempdir(), "/dev/shm") for n in os.listdir(d)}

    def ours() -> set[str]:
        run_pids.update(pid for pid, _ in _children(up.pid))
        return {p for p in snapshot() - before if _owner(p) in run_pids}

    before = snapshot()
    up = subprocess.Popen([*CLI, "up", "--grpc-port", str(free_port()), "--http-port", "0", "--dtype", "float32",
                           "--kv-cache-memory-gb", "0.05", "--kvstore-capacity-gb", "0.1"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    run_pids = {up.pid}
    try:
        deadline = time.monotonic() + 120
        while not ({redis_server.DIR_PREFIX, shm.DIR_PREFIX} <= {_prefix(p) for p in ours()}):
            assert up.poll() is None and time.monotonic() < deadline, "up did not start Redis and the kvstore"
            time.sleep(0.05)
    finally:
        up.send_signal(signal.SIGKILL)
        up.wait()
    made = {p for p in snapshot() - before if _owner(p) in run_pids}
    deadline = time.monotonic() + 120  # each child stops on the SIGTERM its lifeline sends
    while any(_state(pid) not in (None, "Z") for pid in run_pids - {up.pid}):
        assert time.monotonic() < deadline, "the children outlived the killed up"
        time.sleep(0.05)

    # The embedded Redis's directory stays (its owner could not remove it) until a start removes it
    # (all of them are still there, unless another test's embedded Redis started meanwhile).
    left = {p for p in made if os.path.exists(p)}
    removed = preflight.remove_leftovers()  # what `splitserve up` (and every embedded Redis) runs first
    assert left <= set(removed)
    assert not [p for p in made if os.path.exists(p)], "the first run's temp files survived a start's clean-up"
    # nothing else new either that names a process of the first run (other tests may run meanwhile)
    pids = {str(pid) for pid in run_pids}
    assert not [p for p in snapshot() - before if pids & set(re.split(r"[-_.]", os.path.basename(p)))]


def _prefix(path: str) -> str | None:
    name = os.path.basename(path)
    return next((pre for pre in (redis_server.DIR_PREFIX, shm.DIR_PREFIX) if name.startswith(pre)), None)
