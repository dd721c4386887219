"""The parts every role's config is built from: its gRPC server, mutual TLS between roles, the
Prometheus endpoint and Redis block ownership. One field, one docstring, one default (a role that
needs another default, such as its port, sets it in its own `default_factory`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from splitserve.rpc import DEFAULT_MAX_MESSAGE_BYTES, check_mtls_files


def check_port(name: str, port: int, lowest: int = 0) -> None:
    if not lowest <= port <= 65535:
        extra = " (0: a free one; -1: off)" if lowest == -1 else " (0: a free one)"
        raise ValueError(f"{name} must be in [{lowest}, 65535]{extra}, got {port}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address the gRPC server binds (0.0.0.0: every interface; internal roles stay on loopback
    unless told otherwise)."""
    port: int = 0
    """Port of the gRPC server (0: a free one)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest gRPC message sent or received, in bytes."""

    def __post_init__(self) -> None:
        check_port("port", self.port)
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {self.max_message_bytes}")


@dataclass(frozen=True)
class InternalServerConfig(ServerConfig):
    advertise_address: str = ""
    """host:port other processes reach this one at (its owner id in Redis); empty: host:port."""


@dataclass(frozen=True)
class TLSConfig:
    tls_ca_file: str = ""
    """Mutual TLS between roles: the PEM CA that signed every role's certificate (with tls_cert_file
    and tls_key_file; all three or none). Servers then require client certificates and this
    process's own calls present its certificate."""
    tls_cert_file: str = ""
    """Mutual TLS: this process's PEM certificate (its SANs must name the address others dial)."""
    tls_key_file: str = ""
    """Mutual TLS: the PEM private key of tls_cert_file."""

    def __post_init__(self) -> None:
        check_mtls_files(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)

    @property
    def enabled(self) -> bool:
        return bool(self.tls_ca_file)


@dataclass(frozen=True)
class MetricsConfig:
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint (0: a free one, logged; -1: no endpoint)."""
    metrics_host: str = ""
    """Address the /metrics endpoint binds (empty: the gRPC server's host)."""

    def __post_init__(self) -> None:
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], or -1 for no metrics endpoint, "
                             f"got {self.metrics_port}")


@dataclass(frozen=True)
class OwnershipConfig:
    redis_url: str = ""
    """Redis recording which process holds which KV blocks (redis://HOST:PORT/DB); empty: none."""
    ownership_ttl_s: float = 600.0
    """TTL of this process's ownership entries in Redis, in seconds; entries of blocks still held
    are recorded again every third of it."""

    def __post_init__(self) -> None:
        if self.redis_url:
            from splitserve.ownership.resp import parse_url  # stdlib only: the workers' client

            parse_url(self.redis_url)  # what every role's client takes: a ValueError at every role's start
        if not 0 < self.ownership_ttl_s < math.inf:
            raise ValueError(f"ownership_ttl_s must be a positive number of seconds, got {self.ownership_ttl_s}")


@dataclass(frozen=True)
class TracingConfig:
    otlp_endpoint: str = ""
    """OpenTelemetry collector this process exports trace spans to, over OTLP/gRPC (HOST:PORT, or
    http:// or https:// URL); empty: no tracing, and OpenTelemetry is not even imported."""
    trace_sample_ratio: float = 1.0
    """Share of new traces recorded (0-1); a request that arrives with a traceparent follows its
    caller's decision."""

    def __post_init__(self) -> None:
        if self.otlp_endpoint != self.otlp_endpoint.strip() or " " in self.otlp_endpoint:
            raise ValueError(f"otlp_endpoint must be HOST:PORT or a URL without spaces, got {self.otlp_endpoint!r}")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace_sample_ratio must be in [0, 1], got {self.trace_sample_ratio}")
