"""Hosts on one machine made of Linux network namespaces, for the multi-host tests.

Each host is a network namespace with one end of a veth pair (`eth0`, address SUBNET.N/24) whose
other end is a port of a bridge in the root namespace (SUBNET.1): hosts reach each other, and the
test process reaches every host, only through their interfaces, never through a shared loopback.
What namespaces do not separate: the file system, /dev/shm included (a kvstore's shared-memory
arena would still be readable from another "host", so the tests turn it off) and the CPUs.

Every name carries a prefix (interface names: at most 15 characters), so `Network` first removes
what a crashed earlier run with the same prefix left (processes, namespaces, veths, bridge) and
`close()` removes all of it again. Creating them needs root (CAP_NET_ADMIN) and `ip` (iproute2):
`unavailable()` says why not.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

IFNAMSIZ = 15  # longest Linux interface name


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why hosts cannot be made here (not root, no `ip`, no `ip netns`), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces, veth pairs and a bridge need root (CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = _ip("netns", "list", check=False)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


def netns_pids(netns: str) -> list[int]:
    """Pids of every process whose network namespace is `netns` (none once it is gone)."""
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def kill_netns(netns: str, timeout_s: float = 10.0) -> list[int]:
    """SIGKILLs every process in `netns` until none is left; the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout_s
    while pids := netns_pids(netns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in network namespace {netns} survive SIGKILL")
        time.sleep(0.05)
    return sorted(set(killed))


def remove_leftovers(prefix: str) -> list[str]:
    """Removes the namespaces (with their processes) and interfaces named `prefix-*`; what was removed."""
    gone = []
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix + "-"):
            kill_netns(name)
            _ip("netns", "delete", name, check=False)
            gone.append(f"netns {name}")
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]  # "7: ssmh-kv@if2: <...>"
        if name.startswith(prefix + "-"):
            _ip("link", "delete", name, check=False)  # a veth's peer goes with it
            gone.append(f"link {name}")
    return gone


@dataclass
class Host:
    """One namespace: `ip` is its address, `veth` the root end of its link."""

    name: str
    netns: str
    ip: str
    veth: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Starts argv inside this host (`ip netns exec` execs it: the pid is the program's),
        stdout and stderr appended to `log`."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        return netns_pids(self.netns)

    def kill(self) -> list[int]:
        """The whole host dies at once: SIGKILL to every process in it, then reaped."""
        killed = kill_netns(self.netns)
        for proc in self.procs:
            proc.wait(10)
        return killed

    def link_bytes(self) -> tuple[int, int]:
        """(received, sent) bytes of this host's eth0 so far, read at the root end of its veth
        (whose tx is the host's rx) in /proc/net/dev, which shows this process's namespace (unlike
        /sys, which shows the namespace of whoever mounted it)."""
        for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
            name, _, counters = line.partition(":")
            if name.strip() == self.veth:
                values = counters.split()  # rx: bytes packets errs drop fifo frame compressed multicast, tx: ...
                return int(values[8]), int(values[0])
        raise RuntimeError(f"no interface {self.veth} in /proc/net/dev: is host {self.name} gone?")


class Network:
    """A bridge SUBNET.1/24 in the root namespace and hosts SUBNET.2, .3, ... on it.

        net = Network("ssmh", "10.77.0")
        try:
            net.open()                       # removes a crashed run's leftovers first
            kv = net.add_host("kv")          # namespace ssmh-kv, address 10.77.0.2
            kv.popen([...], log_path)
        finally:
            net.close()
    """

    def __init__(self, prefix: str, subnet: str = "10.77.0"):
        if len(prefix) > IFNAMSIZ - 4:
            raise ValueError(f"prefix {prefix!r} leaves no room for host names in {IFNAMSIZ}-character interfaces")
        self.prefix, self.subnet = prefix, subnet
        self.bridge = f"{prefix}-br"
        self.hosts: dict[str, Host] = {}

    def open(self) -> None:
        remove_leftovers(self.prefix)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        netns = f"{self.prefix}-{name}"
        if len(netns) > IFNAMSIZ:
            raise ValueError(f"host name {name!r}: {netns!r} is longer than {IFNAMSIZ} characters")
        host = Host(name, netns, f"{self.subnet}.{len(self.hosts) + 2}", veth=netns)
        self.hosts[name] = host
        _ip("netns", "add", netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", host.veth, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Kills every host's processes, then removes namespaces, veths and the bridge."""
        for host in self.hosts.values():
            kill_netns(host.netns)
            for proc in host.procs:
                if proc.poll() is None:
                    proc.wait(10)
        remove_leftovers(self.prefix)
