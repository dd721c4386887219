"""Starts `splitserve up` as a real process tree for end-to-end tests and parses its endpoints.

`Stack.pid(name)` finds a role's process as it is now (a restarted worker has a new pid) by its
command line among the launcher's children in /proc (Linux), for the fault-injection tests.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from splitserve.launch.up import free_port
from splitserve.rpc import channel
from splitserve.v1 import decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

# the two-prefill-worker stack the end-to-end tests share (tests/conftest.py: two_prefill_stack):
# role flags given through `up` that tests/e2e/test_up_flags.py checks reach the roles
OVERLAP_WEIGHT = 50.0  # the gateway's default is 1.0
SPECULATIVE = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
SERVED_NAME = "tiny-llm"
FETCH_BUFFER_MB = 1.5  # two float32 blocks of the default model: longer prompts are fetched in parts

_LINE = re.compile(r"^\s+(\S+)\s+(\S+:\d+)")
_PID = re.compile(r"\(.*\bpid (\d+)\)")


def _children(ppid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the live processes whose parent is `ppid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == ppid and fields[0] != "Z":
            out.append((int(entry), argv))
    return out


@dataclass
class Stack:
    proc: subprocess.Popen
    gateway: str
    roles: dict[str, str] = field(default_factory=dict)  # "prefill-0" -> address
    redis_url: str = ""
    http_base: str = ""  # http://HOST:PORT/v1 of the OpenAI-compatible API
    metrics: dict[str, str] = field(default_factory=dict)  # "gateway", "kvstore", "prefill-0" -> /metrics URL
    pids: dict[str, int] = field(default_factory=dict)  # "prefill-0", "redis" -> pid printed at start-up
    log: list[str] = field(default_factory=list)

    def port(self, name: str) -> int:
        """The port a role listens on ("redis": the Redis port of redis_url)."""
        address = self.redis_url.split("//", 1)[1].split("/", 1)[0] if name == "redis" else self.roles[name]
        return int(address.rsplit(":", 1)[1])

    def pid(self, name: str) -> int | None:
        """The pid of the launcher's child serving `name` ("decode-0", "kvstore", "redis", ...) now,
        found by the `--port PORT` on its command line; None while it is down (between restarts)."""
        port = str(self.port(name))
        for pid, argv in _children(self.proc.pid):
            if any(a == "--port" and b == port for a, b in zip(argv, argv[1:])):
                return pid
            if name == "redis" and argv and argv[0].endswith(f":{port}"):  # redis-server retitles itself
                return pid
        return None

    def child_pids(self) -> list[int]:
        """Pids of every live process the launcher started (workers, kvstore, gateway, Redis)."""
        return [pid for pid, _ in _children(self.proc.pid)]

    def prefill_load(self, name: str = "prefill-0") -> prefill_pb2.LoadResponse:
        return prefill_pb2_grpc.PrefillStub(channel(self.roles[name])).GetLoad(prefill_pb2.LoadRequest(), timeout=10)

    def decode_load(self, name: str = "decode-0") -> prefill_pb2.LoadResponse:
        return decode_pb2_grpc.DecodeStub(channel(self.roles[name])).GetLoad(prefill_pb2.LoadRequest(), timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_stack(*args: str, timeout_s: float = 400.0) -> Stack:
    port = free_port()
    cmd = [sys.executable, "-m", "splitserve.launch.cli", "up", "--grpc-port", str(port), "--http-port", str(free_port()),
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stack = Stack(proc, gateway=f"127.0.0.1:{port}")
    ready = threading.Event()

    def pump():  # keeps reading so the pipe never fills; parses the endpoint block
        in_block = False
        for line in proc.stdout:
            stack.log.append(line.rstrip())
            if line.startswith("splitserve is up:"):
                in_block = True
                continue
            if in_block:
                m = _LINE.match(line)
                words = line.split()
                if words[:2] == ["gateway", "(HTTP)"]:
                    stack.http_base = words[2]
                elif len(words) == 3 and words[1] == "metrics":
                    stack.metrics[words[0]] = words[2]
                elif line.strip().startswith("redis"):
                    stack.redis_url = line.split()[1]
                    if _PID.search(line):
                        stack.pids["redis"] = int(_PID.search(line).group(1))
                elif m and not line.strip().startswith("gateway"):
                    stack.roles[m.group(1)] = m.group(2)
                    if _PID.search(line):
                        stack.pids[m.group(1)] = int(_PID.search(line).group(1))
                if line.startswith("try:"):
                    ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            stack.stop()
            raise RuntimeError("splitserve up did not come up:\n" + "\n".join(stack.log[-40:]))
    return stack


def start_long_stream(gateway: str, prompt: str, min_tokens: int = 4):
    """Opens a greedy 300-token stream on the gateway and returns it (still open) once at least
    `min_tokens` tokens arrived: the request is then running on a decode worker."""
    from splitserve.client import stream_generate

    stream = stream_generate(gateway, prompt=prompt, timeout_s=120,
                             sampling={"max_tokens": 300, "temperature": 0.0, "ignore_eos": True})
    got = 0
    for msg in stream:
        got += len(msg.token_ids)
        if got >= min_tokens:
            return stream
    raise AssertionError(f"the stream ended after {got} tokens, before {min_tokens}")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def metrics_base() -> int:
    """A base port whose kvstore, prefill-0/1 and decode-0 offsets are free now."""
    for base in range(31000, 60000, 97):
        if all(_free(base + off) for off in (0, 10, 11, 20)):
            return base
    raise RuntimeError("no free metrics base port between 31000 and 60000")


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.2):
    """condition()'s first truthy value; AssertionError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
