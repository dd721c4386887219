"""`splitserve up`'s own config, and its flags: up's own, plus every flag of every role, generated
from the role configs (the same fields the roles' own flags come from).

How `up` names a role's field (FIELD is the role's own flag name, without dashes):
- `--ROLE-FIELD` sets FIELD of one role, for every field of every role: --gateway-overlap-weight,
  --gateway-served-model-name, --kvstore-capacity-gb, --prefill-cpus, --decode-max-num-seqs
  (ROLE: gateway, kvstore, prefill, decode; with --colocated the colocated workers take the
  --prefill-* values).
- `--FIELD` with no role sets an engine field (--model, --dtype, --block-size, --kv-cache-memory-gb
  ...), --torch-threads or --pin-threads for every worker at once: prefill and decode must agree on the
  model and the block size. A --prefill-FIELD or --decode-FIELD beats it for that role.
- --redis-url and --internal-tls-{ca,cert,key}-file are the stack's (UpConfig): every role gets them.
- The gateway's everyday flags keep their short names: --host, --grpc-port (its port), --http-port,
  --api-key, --tls-cert-file, --tls-key-file (the same flags as --gateway-host ...).
For each field of each role, the value is the first of: --ROLE-FIELD, --FIELD, what `up` decides
(loopback addresses, free ports, the metrics ports, threads per worker, the stack's Redis and TLS),
the field's default. `up --help` shows every flag with its default.

Metrics ports (--metrics-port BASE): the kvstore serves /metrics on BASE, prefill-i (or colocated-i)
on BASE+10+i, decode-i on BASE+20+i (at most 10 workers per role); the gateway serves its own on its
HTTP port (--http-port); with --autoscale the launcher's own (its decisions) on BASE+30, and the
scrape config lists every worker up to --autoscale-ROLE-max-workers. So one Prometheus config
(`up --print-scrape-config`) survives restarts.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from splitserve.config.autoscale import AutoscaleConfig
from splitserve.config.cpus import parse_cpu_list
from splitserve.config.flags import FlatField, add_config_args, add_flag, config_from_args, flag_name, flat_fields, from_flat
from splitserve.config.gateway import GatewayConfig
from splitserve.config.kvstore import KVStoreConfig
from splitserve.config.parts import OwnershipConfig, TLSConfig, check_port
from splitserve.config.worker import WorkerConfig
from splitserve.logs import LEVELS
from splitserve.rpc import format_address

ROLE_CONFIGS: dict[str, type] = {"gateway": GatewayConfig, "kvstore": KVStoreConfig,
                                 "prefill": WorkerConfig, "decode": WorkerConfig}
WORKER_ROLES = ("prefill", "decode", "colocated")
# role-less flags for every worker: the engine's fields, and the threads per worker and their pinning
SHARED_WORKER_FIELDS = tuple(ff.name for ff in flat_fields(WorkerConfig) if ff.path[0] == "engine") + ("torch_threads", "pin_threads")
GATEWAY_ALIASES = {"host": "--host", "port": "--grpc-port", "http_port": "--http-port", "api_key": "--api-key",
                   "tls_cert_file": "--tls-cert-file", "tls_key_file": "--tls-key-file"}
METRICS_OFFSETS = {"kvstore": 0, "prefill": 10, "colocated": 10, "decode": 20}  # from --metrics-port BASE
METRICS_SLOTS = 10  # workers per role with a fixed metrics port (the offsets are 10 apart)
AUTOSCALER_METRICS_OFFSET = 30  # the launcher's own endpoint (--autoscale) after the decode workers'


@dataclass(frozen=True)
class UpConfig:
    prefill_workers: int = 1
    """Prefill workers to start (with --colocated: colocated workers)."""
    decode_workers: int = 1
    """Decode workers to start (none with --colocated)."""
    colocated: bool = False
    """The baseline to compare with: --prefill-workers workers that each prefill and decode in one
    engine (no kvstore), behind the same gateway."""
    redis_url: str = ""
    """Redis of every role's block ownership; empty: `up` starts an embedded one."""
    internal_tls: TLSConfig = field(default_factory=TLSConfig, metadata={"flag_prefix": "internal_"})
    """Mutual TLS between the roles, for every role (the certificate's SANs must include 127.0.0.1)."""
    tls_ca_file: str = ""
    """The CA of --tls-cert-file, for up's own health checks of the gateway (default: the
    certificate itself)."""
    metrics_port: int = 0
    """Base port of the roles' Prometheus endpoints: kvstore BASE, prefill-i BASE+10+i, decode-i
    BASE+20+i; the gateway's is its HTTP port (0: free ports; -1: no endpoints but the gateway's)."""
    print_scrape_config: bool = False
    """Print a Prometheus scrape config for the ports this command would use (needs --metrics-port
    BASE and a fixed --http-port) and exit."""
    prometheus_config: str = ""
    """Once the stack is up, write a Prometheus config to this path: a scrape job for every role's
    /metrics as started (restarts keep the ports) and, in a source checkout, rule_files naming
    deploy/prometheus/rules.yml (docs/deploy.md)."""
    startup_timeout_s: float = 300.0
    """Seconds each process gets to answer its health check at start-up."""
    restart: bool = True
    """Restart a worker or the kvstore that died, on the same ports, after 1 s doubling up to 30 s;
    --no-restart: stop everything when any process exits."""
    log_format: str | None = field(default=None, metadata={"choices": ("text", "json")})
    """Every role's log lines: key=value text or one JSON object per line (default:
    $SPLITSERVE_LOG_FORMAT, else text)."""
    log_level: str = field(default="INFO", metadata={"choices": LEVELS})
    """Level of every role's log lines."""
    autoscale: bool = False
    """Start and drain workers by their roles' load (docs/architecture.md, "Autoscaling"), within
    --autoscale-ROLE-min-workers/--autoscale-ROLE-max-workers; the launcher serves its decisions on a
    metrics endpoint of its own (BASE+30 with --metrics-port BASE)."""
    autoscaling: AutoscaleConfig = field(default_factory=AutoscaleConfig, metadata={"flag_prefix": "autoscale_"})
    """The autoscaler's bounds, thresholds and timing (config/autoscale.py)."""

    def __post_init__(self) -> None:
        OwnershipConfig(redis_url=self.redis_url)  # the roles' rule for a Redis URL
        if self.prefill_workers < 1 or self.decode_workers < 1:
            raise ValueError("--prefill-workers and --decode-workers must be at least 1")
        check_port("metrics_port", self.metrics_port, lowest=-1)
        if self.metrics_port > 0:
            if max(self.prefill_workers, self.decode_workers) > METRICS_SLOTS:
                raise ValueError(f"--metrics-port BASE fixes the ports of at most {METRICS_SLOTS} workers per role")
            check_port("metrics_port + 30", self.metrics_port + AUTOSCALER_METRICS_OFFSET)
        if self.prometheus_config and not Path(self.prometheus_config).resolve().parent.is_dir():
            raise ValueError(f"--prometheus-config: no folder {Path(self.prometheus_config).resolve().parent} "
                             "to write the config in")
        if self.autoscale:
            self._check_autoscale()
        if not self.startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")

    def _check_autoscale(self) -> None:
        """Each role starts within its autoscale bounds, and every worker it may add has a fixed port."""
        for role, count in self.roles():
            lo, hi = self.autoscaling.bounds(role)
            if not lo <= count <= hi:
                raise ValueError(f"--autoscale: {count} {role} workers to start, outside "
                                 f"[--autoscale-*-min-workers {lo}, --autoscale-*-max-workers {hi}]")
            if self.metrics_port > 0 and hi > METRICS_SLOTS:
                raise ValueError(f"--metrics-port BASE fixes the ports of at most {METRICS_SLOTS} workers per role: "
                                 f"--autoscale-*-max-workers is {hi}")

    def roles(self) -> list[tuple[str, int]]:
        """(worker role, count) in start order."""
        if self.colocated:
            return [("colocated", self.prefill_workers)]
        return [("prefill", self.prefill_workers), ("decode", self.decode_workers)]

    def metrics_port_of(self, role: str, index: int) -> int | None:
        """The fixed metrics port of a role's index-th process; None: a free one; -1: none."""
        if self.metrics_port == 0:
            return None
        if self.metrics_port < 0:
            return -1
        return self.metrics_port + METRICS_OFFSETS[role] + index


LOOPBACK = "127.0.0.1"  # where internal roles listen unless --ROLE-host says otherwise


def local_host(host: str) -> str:
    """Where a process on this machine reaches a server bound to `host`."""
    return LOOPBACK if host in ("0.0.0.0", "::", "") else host




def _dest(role: str, name: str) -> str:
    return f"{role}.{name}"  # dots never clash with up's own dests (plain field names)


def add_up_args(parser: argparse.ArgumentParser) -> None:
    """Up's own flags (UpConfig), the role-less worker flags and every role's --ROLE-FIELD flags."""
    parser.usage = "%(prog)s [FLAG ...]   (up's own flags, --FIELD for every worker, --ROLE-FIELD for one role)"
    add_config_args(parser, UpConfig)
    workers = parser.add_argument_group("every worker (a --prefill-/--decode- flag beats these)")
    by_name = {ff.name: ff for ff in flat_fields(WorkerConfig)}
    for name in SHARED_WORKER_FIELDS:
        ff = by_name[name]
        add_flag(workers, ff, [flag_name(ff)], _dest("workers", name), None, ff.default)
    for role, cls in ROLE_CONFIGS.items():
        group = parser.add_argument_group(f"{role} (--{role}-FIELD: `splitserve {role}`'s --FIELD)")
        for ff in flat_fields(cls):
            names = [flag_name(ff, role + "-")]
            if role == "gateway" and ff.name in GATEWAY_ALIASES:
                names.insert(0, GATEWAY_ALIASES[ff.name])
            add_flag(group, ff, names, _dest(role, ff.name), None, _help_default(role, ff))


# what `up` sets for a role unless its --ROLE-FIELD is given (the help says so instead of the default)
DECIDED_BY_UP = {
    "gateway": {"prefill", "decode", "redis_url", "internal_tls_ca_file", "internal_tls_cert_file",
                "internal_tls_key_file"},
    "kvstore": {"port", "redis_url", "metrics_port", "tls_ca_file", "tls_cert_file", "tls_key_file"},
    "prefill": {"port", "redis_url", "metrics_port", "kvstore", "tls_ca_file", "tls_cert_file", "tls_key_file",
                "torch_threads"},
}
DECIDED_BY_UP["decode"] = DECIDED_BY_UP["prefill"]


def _help_default(role: str, ff: FlatField) -> Any:
    if ff.name in DECIDED_BY_UP[role]:
        return "set by up"
    if role in WORKER_ROLES and ff.name in SHARED_WORKER_FIELDS:
        return f"{flag_name(ff)}, else {ff.default if ff.default != '' else chr(34) * 2}"
    return ff.default


def role_values(args: argparse.Namespace, role: str) -> dict[str, Any]:
    """The flat values `up`'s command line gives one role (colocated: the prefill values): its
    --ROLE-FIELD flags over the role-less worker flags. Fields not given are left out."""
    source = "prefill" if role == "colocated" else role
    out: dict[str, Any] = {}
    if source in WORKER_ROLES:
        for name in SHARED_WORKER_FIELDS:
            value = getattr(args, _dest("workers", name), None)
            if value is not None:
                out[name] = value
    for ff in flat_fields(ROLE_CONFIGS[source]):
        value = getattr(args, _dest(source, ff.name), None)
        if value is not None:
            out[ff.name] = value
    return out


def scrape_config(gateway: str, gateway_scheme: str, targets: dict[str, str]) -> str:
    """A Prometheus `scrape_configs` block (YAML): the gateway's /metrics at `gateway` (HOST:PORT of
    its HTTP server), and `targets` (name -> HOST:PORT), each labelled with its process name."""
    lines = ["scrape_configs:", "  - job_name: splitserve-gateway", f"    scheme: {gateway_scheme}",
             "    static_configs:", f'      - targets: ["{gateway}"]', "        labels: {process: gateway}"]
    if targets:
        lines += ["  - job_name: splitserve", "    static_configs:"]
        for name, address in targets.items():
            lines += [f'      - targets: ["{address}"]', f"        labels: {{process: {name}}}"]
    return "\n".join(lines) + "\n"


RULES_FILE = Path(__file__).resolve().parents[3] / "deploy" / "prometheus" / "rules.yml"  # in a source checkout


def prometheus_config(metrics_urls: dict[str, str], rules_file: Path = RULES_FILE) -> str:
    """A whole Prometheus config (YAML) for a running stack: `metrics_urls` (name -> /metrics URL,
    "gateway" among them) as scrape_config() lays them out, and `rules_file` when it exists."""
    gateway = urlsplit(metrics_urls["gateway"])
    targets = {name: urlsplit(url).netloc for name, url in metrics_urls.items() if name != "gateway"}
    head = ["global:", "  scrape_interval: 15s", "  evaluation_interval: 15s"]
    if rules_file.is_file():
        head += ["rule_files:", f"  - {json.dumps(str(rules_file))}"]
    return "\n".join(head) + "\n" + scrape_config(gateway.netloc, gateway.scheme, targets)


def check_settings(args: argparse.Namespace) -> UpConfig:
    """Every role's settings from up's command line, checked before anything starts: ValueError
    names the flag or the field that is wrong."""
    up = config_from_args(UpConfig, args)
    if up.colocated and role_values(args, "decode").get("cpus"):
        raise ValueError("--decode-cpus: with --colocated there are no decode workers (pin the colocated "
                         "workers with --prefill-cpus)")
    for role, cls in ROLE_CONFIGS.items():
        given = role_values(args, role)
        if given.get("cpus"):
            try:
                parse_cpu_list(given["cpus"])
            except ValueError as exc:
                raise ValueError(f"--{role}-cpus: {exc}") from None
        try:
            config = from_flat(cls, given)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{role} settings: {exc}") from None
        if role == "gateway" and config.http_port < 0:
            raise ValueError(f"--http-port must be in [0, 65535] (0: a free one), got {config.http_port}")
    return up


def fixed_metrics_ports(args: argparse.Namespace) -> dict[str, tuple[str, int]]:
    """Child name -> (host, port) of every fixed metrics endpoint but the gateway's (--metrics-port
    BASE, or a --ROLE-metrics-port)."""
    up = config_from_args(UpConfig, args)
    out = {}
    for role, count in ([] if up.colocated else [("kvstore", 1)]) + up.roles():
        if up.autoscale and role != "kvstore":  # every worker the autoscaler may start
            count = up.autoscaling.bounds(role)[1]
        config = from_flat(ROLE_CONFIGS["prefill" if role == "colocated" else role], role_values(args, role))
        for i in range(count):
            base = role_values(args, role).get("metrics_port")
            port = base + i if base and base > 0 else up.metrics_port_of(role, i)
            if port is not None and port > 0:
                out[role if role == "kvstore" else f"{role}-{i}"] = (config.metrics_host or config.host, port)
    if up.autoscale and up.metrics_port > 0:
        out["autoscaler"] = (LOOPBACK, up.metrics_port + AUTOSCALER_METRICS_OFFSET)
    return out


def scrape_config_of(args: argparse.Namespace) -> str:
    """The Prometheus scrape config for the ports `up` with these flags uses (fixed ports only)."""
    up = config_from_args(UpConfig, args)
    gateway = from_flat(GatewayConfig, role_values(args, "gateway"))
    if up.metrics_port <= 0 or gateway.http_port <= 0:
        raise ValueError("--print-scrape-config needs fixed ports: --metrics-port BASE (> 0) and --http-port "
                         "(not 0); free ports change at every start")
    targets = {name: format_address(local_host(host), port) for name, (host, port) in fixed_metrics_ports(args).items()}
    scheme = "https" if gateway.tls_cert_file else "http"
    return scrape_config(format_address(local_host(gateway.host), gateway.http_port), scheme, targets)
