"""`splitserve up --autoscale`: the planner that starts and drains workers by their roles' own load.

Every `interval_s` the launcher's loop calls Autoscaler.step(): it reads each worker role's signals
(config/autoscale.py: decode KV-cache usage and ITL p50, prefill queue depth and TTFT p50/p99, from
the workers' GetLoad and the /metrics histograms; never CPU), asks that role's RolePlanner for a
decision, and applies it:
- up: a new worker of the role, started like the others (a free gRPC port, its own metrics port,
  the stack's Redis and kvstore). It registers itself in Redis, so the gateway routes to it once it
  serves (discovery), with no restart. While it loads, the role decides nothing more.
- down: SIGTERM to the role's newest worker: the graceful drain (splitserve.drain). Its exit 0 is
  the end of a retirement, not a crash: the launcher removes it instead of restarting it.
Each up/down (and each time a role wants more workers than its maximum) is one log line naming the
role, the action, every signal's value and thresholds, and increments
`splitserve_autoscaler_decisions_total{role,action}` on the launcher's own /metrics endpoint.

RolePlanner.decide is a pure function of the signal series it is fed (the unit tests drive it with
synthetic ones): scale up when any signal is over its high threshold; down only when every signal
stayed under its low threshold for `stabilization_s`; never outside [min, max] workers, never two
decisions within `cooldown_s`.
"""
from __future__ import annotations

import logging
import ssl
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.config.autoscale import AutoscaleConfig
from splitserve.metrics import MetricsServer  # (importing splitserve.metrics turns off *_created series)

if TYPE_CHECKING:
    from splitserve.launch.up import Child, Launcher

logger = logging.getLogger("splitserve.autoscale")

ITL_HISTOGRAM = "splitserve_inter_token_latency_seconds"
TTFT_HISTOGRAM = "splitserve_time_to_first_token_seconds"


@dataclass(frozen=True)
class Signals:
    """One role's signals at one time; None: not measured (no worker answered, no latency observed
    in the window), which counts as idle and never scales up."""
    kv_usage: float | None = None  # mean KV-cache usage of the role's serving workers, 0..1
    itl_p50_s: float | None = None
    queue_depth: float | None = None  # requests waiting per serving worker
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None


@dataclass(frozen=True)
class Decision:
    role: str
    action: str  # "up", "down", or "at_max" (over a threshold with the role at its maximum)
    workers: int  # the role's workers when decided
    reason: str  # the signal(s) that decided it
    signals: str  # every signal of the role with its thresholds


SIGNALS_OF = {"decode": ("kv_usage", "itl_p50_s"), "prefill": ("queue_depth", "ttft_p50_s", "ttft_p99_s")}
SIGNALS_OF["colocated"] = SIGNALS_OF["decode"] + SIGNALS_OF["prefill"]


def thresholds(config: AutoscaleConfig, signal: str) -> tuple[float, float]:
    """(high, low) of one signal: over high scales up, under low counts as idle."""
    frac = config.latency_low_fraction
    return {"kv_usage": (config.decode_kv_usage_high, config.decode_kv_usage_low),
            "itl_p50_s": (config.decode_itl_p50_target_s, config.decode_itl_p50_target_s * frac),
            "queue_depth": (config.prefill_queue_high, config.prefill_queue_low),
            "ttft_p50_s": (config.prefill_ttft_p50_target_s, config.prefill_ttft_p50_target_s * frac),
            "ttft_p99_s": (config.prefill_ttft_p99_target_s, config.prefill_ttft_p99_target_s * frac)}[signal]


class RolePlanner:
    """One role's decisions from its signal series (state: since when it is idle, its last decision)."""

    def __init__(self, role: str, config: AutoscaleConfig) -> None:
        self.role = role
        self.config = config
        self.min_workers, self.max_workers = config.bounds(role)
        self.idle_since: float | None = None  # all signals under their low thresholds since then
        self.last_decision_s = -float("inf")
        self._at_max = False  # an at_max decision was logged for the current overload

    def describe(self, signals: Signals) -> str:
        parts = []
        for name in SIGNALS_OF[self.role]:
            value, (high, low) = getattr(signals, name), thresholds(self.config, name)
            parts.append(f"{name}={'none' if value is None else f'{value:.3g}'} (up>{high:g} idle<{low:g})")
        return " ".join(parts)

    def decide(self, now: float, signals: Signals, workers: int, changing: bool = False) -> Decision | None:
        """The decision for the role at time `now` (seconds, monotonic), or None: hold. `workers`:
        the role's workers (starting ones included); `changing`: one is starting or draining, so
        the current signals do not show the pool the last decision made yet."""
        over = [name for name in SIGNALS_OF[self.role] if getattr(signals, name) is not None
                and getattr(signals, name) > thresholds(self.config, name)[0]]
        idle = all(getattr(signals, name) is None or getattr(signals, name) < thresholds(self.config, name)[1]
                   for name in SIGNALS_OF[self.role])
        self.idle_since = (self.idle_since if self.idle_since is not None else now) if idle and not over else None
        if not over:
            self._at_max = False
        if changing or now - self.last_decision_s < self.config.cooldown_s:
            return None
        if over and workers >= self.max_workers:
            if self._at_max:
                return None
            self._at_max = True
            return self._decided(now, "at_max", workers, signals, over, at_max=True)
        if over:
            return self._decided(now, "up", workers, signals, over)
        if (self.idle_since is not None and now - self.idle_since >= self.config.stabilization_s
                and workers > self.min_workers):
            return self._decided(now, "down", workers, signals, [f"idle for {now - self.idle_since:.0f}s"])
        return None

    def _decided(self, now: float, action: str, workers: int, signals: Signals, why: list[str],
                 at_max: bool = False) -> Decision:
        if not at_max:  # at_max changes nothing: the cooldown does not start
            self.last_decision_s = now
            self.idle_since = None  # a further drain needs a whole window of the new pool
        return Decision(self.role, action, workers, ",".join(why), self.describe(signals))


# ------------------------------------------------------------------------------ reading signals
def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of histogram observations given as cumulative (upper bound, count) pairs sorted
    by bound, +Inf last, interpolated linearly inside a bucket (as Prometheus' histogram_quantile);
    None without observations. In the +Inf bucket: the highest finite bound."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def scrape_buckets(url: str, histogram: str, timeout_s: float = 2.0,
                   context: ssl.SSLContext | None = None) -> dict[float, float]:
    """Upper bound -> cumulative count of one histogram at a /metrics URL, summed over its label
    sets. Raises OSError when the endpoint does not answer."""
    with urllib.request.urlopen(url, timeout=timeout_s, context=context) as resp:
        text = resp.read().decode()
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != histogram:
            continue
        for sample in family.samples:
            if sample.name == histogram + "_bucket":
                le = float(sample.labels["le"])
                out[le] = out.get(le, 0.0) + sample.value
    return out


class HistogramWindow:
    """The observations of one histogram over the last `window_s`, across endpoints that come and
    go: each endpoint's counts are differenced against its own oldest snapshot in the window (a
    restarted endpoint, whose counts went down, counts from zero)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._history: dict[str, deque] = {}  # url -> (time, {bound: count}) oldest first

    def add(self, now: float, snapshots: dict[str, dict[float, float]]) -> None:
        for url in list(self._history):
            if url not in snapshots:
                del self._history[url]  # gone (drained): its observations leave with it
        for url, counts in snapshots.items():
            history = self._history.setdefault(url, deque())
            if history and any(counts.get(b, 0.0) < c for b, c in history[-1][1].items()):
                history.clear()  # restarted
                history.append((now - self.window_s, {}))
            history.append((now, counts))
            while len(history) > 2 and history[1][0] <= now - self.window_s:
                history.popleft()  # keep one snapshot at or before the window's start as the base

    def quantile(self, q: float) -> float | None:
        delta: dict[float, float] = {}
        for history in self._history.values():
            if len(history) < 2:
                continue
            (_, base), (_, last) = history[0], history[-1]
            for bound, count in last.items():
                delta[bound] = delta.get(bound, 0.0) + count - base.get(bound, 0.0)
        return quantile(q, sorted(delta.items()))


class DecisionMetrics:
    """The launcher's own /metrics (served with splitserve.metrics.MetricsServer)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter("splitserve_autoscaler_decisions", "Autoscaler decisions, by role and action "
                                 "(up, down, at_max).", ("role", "action"), registry=self.registry)
        self.workers = Gauge("splitserve_autoscaler_workers", "Workers of a role the autoscaler counts "
                             "(starting ones included, draining ones not).", ("role",), registry=self.registry)
        self.signal = Gauge("splitserve_autoscaler_signal", "The last value of each role's signals (absent "
                            "while not measured).", ("role", "signal"), registry=self.registry)

    def set_signal(self, role: str, name: str, value: float | None) -> None:
        if value is not None:
            self.signal.labels(role, name).set(value)
            return
        try:
            self.signal.remove(role, name)  # not measured now: no stale value
        except KeyError:
            pass

    def render(self) -> bytes:
        return generate_latest(self.registry)


def role_of(child: Child) -> str:
    return child.name.rsplit("-", 1)[0]  # prefill-0, decode-12, colocated-1


class Autoscaler:
    """Reads the signals, decides, and starts or drains the launcher's workers (from its loop)."""

    def __init__(self, launcher: Launcher, config: AutoscaleConfig) -> None:
        self.launcher = launcher
        self.config = config
        self.roles = [role for role, _ in launcher.up.roles()]
        self.planners = {role: RolePlanner(role, config) for role in self.roles}
        self.itl = HistogramWindow(config.latency_window_s)
        self.ttft = HistogramWindow(config.latency_window_s)
        self.metrics = DecisionMetrics()
        self.server = None  # its MetricsServer, once serve() ran
        self._next_s = 0.0

    def serve(self, host: str, port: int) -> str:
        """Starts the launcher's /metrics endpoint; returns its URL."""
        self.server = MetricsServer(self.metrics, host, port).start()
        return self.server.url

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    def workers(self, role: str) -> list[Child]:
        """The role's workers that are not being drained by the autoscaler."""
        return [c for c in self.launcher.children if role_of(c) == role and not c.extra.get("retiring")]

    def step(self, now: float | None = None) -> list[Decision]:
        """One round, at most every interval_s: signals, decisions, actions."""
        now = time.monotonic() if now is None else now
        if now < self._next_s:
            return []
        self._next_s = now + self.config.interval_s
        decided = []
        for role, signals in self.read_signals(now).items():
            workers = self.workers(role)
            changing = any(not c.extra.get("ready") for c in workers) or len(workers) < len(
                [c for c in self.launcher.children if role_of(c) == role])  # one starts, or one drains
            self.metrics.workers.labels(role).set(len(workers))
            for name in SIGNALS_OF[role]:
                self.metrics.set_signal(role, name, getattr(signals, name))
            decision = self.planners[role].decide(now, signals, len(workers), changing)
            if decision is not None:
                self.apply(decision)
                decided.append(decision)
        return decided

    # ------------------------------------------------------------------------------ signals
    def read_signals(self, now: float) -> dict[str, Signals]:
        loads = {role: [load for c in self.workers(role) if (load := self._load(c)) is not None] for role in self.roles}
        gateway = next((c for c in self.launcher.children if c.name == "gateway"), None)
        gateway_url = {gateway.metrics_url: gateway} if gateway is not None and gateway.metrics_url else {}
        self.ttft.add(now, self._scrape(gateway_url, TTFT_HISTOGRAM))
        if "decode" in self.roles:  # the decode workers' own ITL; colocated ones report none: the gateway's
            decoders = {c.metrics_url: c for c in self.workers("decode") if c.extra.get("ready") and c.metrics_url}
            self.itl.add(now, self._scrape(decoders, ITL_HISTOGRAM))
        else:
            self.itl.add(now, self._scrape(gateway_url, ITL_HISTOGRAM))
        out = {}
        for role in self.roles:
            got = loads[role]
            out[role] = Signals(
                kv_usage=sum(x.kv_cache_usage for x in got) / len(got) if got else None,
                queue_depth=sum(x.num_waiting for x in got) / len(got) if got else None,
                itl_p50_s=self.itl.quantile(0.5), ttft_p50_s=self.ttft.quantile(0.5),
                ttft_p99_s=self.ttft.quantile(0.99))
        return out

    def _load(self, child: Child):
        """The worker's GetLoad, or None (not serving yet, draining, or no answer); the first answer
        marks it ready."""
        from splitserve.rpc import channel
        from splitserve.v1 import decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

        stub_of = decode_pb2_grpc.DecodeStub if role_of(child) == "decode" else prefill_pb2_grpc.PrefillStub
        try:
            with channel(child.address, credentials=self.launcher._credentials(child)) as ch:
                load = stub_of(ch).GetLoad(prefill_pb2.LoadRequest(), timeout=2.0)
        except (grpc.RpcError, OSError, ValueError):  # no answer, or TLS files that cannot be read
            return None
        child.extra["ready"] = True
        return None if load.draining else load

    def _scrape(self, targets: dict[str, Child], histogram: str) -> dict[str, dict[float, float]]:
        out = {}
        for url, child in targets.items():
            try:
                out[url] = scrape_buckets(url, histogram, context=self._ssl(url, child))
            except (OSError, ValueError) as e:
                logger.debug("autoscaler: no %s from %s: %s", histogram, url, e)
        return out

    def _ssl(self, url: str, child: Child) -> ssl.SSLContext | None:
        if not url.startswith("https:"):
            return None
        return ssl.create_default_context(cafile=self.launcher.up.tls_ca_file or child.config.tls_cert_file)

    # ------------------------------------------------------------------------------ actions
    def apply(self, d: Decision) -> None:
        cfg = self.config
        after = d.workers + {"up": 1, "down": -1}.get(d.action, 0)
        logger.warning("autoscale decision: role=%s action=%s workers=%d->%d reason=%s signals: %s "
                       "cooldown_s=%g stabilization_s=%g bounds=[%d,%d]", d.role, d.action, d.workers, after,
                       d.reason, d.signals, cfg.cooldown_s, cfg.stabilization_s, *cfg.bounds(d.role))
        self.metrics.decisions.labels(d.role, d.action).inc()
        if d.action == "up":
            used = {int(c.name.rsplit("-", 1)[1]) for c in self.launcher.children if role_of(c) == d.role}
            index = min(set(range(len(used) + 1)) - used)
            child = self.launcher.start_worker(d.role, index)
            child.extra["ready"] = False
            self.launcher.write_prometheus_config()
        elif d.action == "down":
            ready = [c for c in self.workers(d.role) if c.extra.get("ready") and c.restart_at_s is None]
            if not ready:
                return
            child = max(ready, key=lambda c: int(c.name.rsplit("-", 1)[1]))
            child.extra["retiring"] = True
            child.proc.terminate()  # the graceful drain; its exit 0 removes it (Launcher._watch)
            logger.warning("autoscaler: draining %s pid=%d address=%s", child.name, child.proc.pid, child.address)


def start_autoscaler(launcher: Launcher) -> Autoscaler:
    """The stack's autoscaler, its /metrics served beside the others' (BASE+30 with --metrics-port
    BASE, a free port with 0, none with -1)."""
    from splitserve.config.launch import AUTOSCALER_METRICS_OFFSET, LOOPBACK
    from splitserve.launch.up import free_port

    autoscaler = Autoscaler(launcher, launcher.up.autoscaling)
    base = launcher.up.metrics_port
    if base >= 0:
        autoscaler.serve(LOOPBACK, base + AUTOSCALER_METRICS_OFFSET if base else free_port())
    return autoscaler
