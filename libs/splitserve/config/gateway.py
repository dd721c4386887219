"""The gateway's config (its server and internal-TLS parts, the workers it routes to, its HTTP API)
and its routing policy's weights."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitserve.config.flags import composed
from splitserve.config.parts import ServerConfig, TLSConfig, TracingConfig

GATEWAY_PORT = 50051  # the default gRPC port clients call (`up --grpc-port`)


@dataclass(frozen=True)
class RouterConfig:
    overlap_weight: float = 1.0
    """w: cost of one prompt block a worker must compute (prefill) or import (decode), in blocks."""
    busy_queued_tokens: int = 8192
    """A prefill worker with more queued tokens than this is skipped unless all are (0: never busy)."""
    decode_seq_weight: float = 1.0
    """Cost of one running or waiting sequence on a decode worker, in blocks."""
    decode_kv_usage_weight: float = 16.0
    """Cost of a full KV cache (usage 1.0) on a decode worker, in blocks; scaled by the usage."""
    decode_busy_kv_usage: float = 0.95
    """A decode worker at or above this KV-cache usage is skipped unless all are (1.0: never busy)."""

    def __post_init__(self) -> None:
        for name in ("overlap_weight", "decode_seq_weight", "decode_kv_usage_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.busy_queued_tokens, int) or self.busy_queued_tokens < 0:
            raise ValueError(f"busy_queued_tokens must be an int >= 0, got {self.busy_queued_tokens!r}")
        if not 0.0 < self.decode_busy_kv_usage <= 1.0:
            raise ValueError(f"decode_busy_kv_usage must be in (0, 1], got {self.decode_busy_kv_usage!r}")


@composed
@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=lambda: ServerConfig(port=GATEWAY_PORT))
    """The gRPC server clients call: host (the HTTP server binds it too), port, max_message_bytes."""
    prefill: str = "127.0.0.1:50061"
    """Prefill workers, comma-separated HOST:PORT (empty: only those registered in Redis)."""
    decode: str = "127.0.0.1:50062"
    """Decode workers, comma-separated HOST:PORT (empty: only those registered in Redis)."""
    redis_url: str = ""
    """Redis holding block ownership (redis://HOST:PORT/DB); empty: route by load only."""
    tokenizer: str = ""
    """Tokenizer path (GGUF file or HF folder); empty: the model_path the workers report."""
    served_model_name: str = ""
    """Name accepted in GenerateRequest.model besides the workers' model_id; empty: model_id only."""
    http_port: int = 8000
    """Port of the HTTP server on `host`: the OpenAI-compatible API under /v1, /health and /metrics
    (0: any free port; -1: no HTTP server)."""
    tls_cert_file: str = ""
    """PEM certificate (chain) of the gateway: with tls_key_file, gRPC and HTTP are served over TLS."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""
    internal_tls: TLSConfig = field(default_factory=TLSConfig, metadata={"flag_prefix": "internal_"})
    """Mutual TLS to the workers (flags --internal-tls-ca-file, --internal-tls-cert-file,
    --internal-tls-key-file): the CA that signed every role's certificate and the gateway's client
    certificate and key."""
    api_key: str = ""
    """Require `Authorization: Bearer KEY` on the HTTP API and `authorization: Bearer KEY` metadata on
    gRPC Generate (/health, /metrics and the gRPC health service stay open); default
    $SPLITSERVE_API_KEY; empty: no key."""
    log_prompts: bool = False
    """Log each request's prompt (text and token ids); prompts are left out of the logs by default."""
    load_poll_interval_s: float = 0.5
    """Seconds between two GetLoad polls of every worker."""
    load_timeout_s: float = 1.0
    """A worker that does not answer GetLoad within this many seconds is unhealthy."""
    startup_timeout_s: float = 0.0
    """Seconds to wait for a prefill and a decode worker at startup (0: wait for ever)."""
    request_timeout_s: float = 600.0
    """Longest a request may run, in seconds (a shorter client deadline wins)."""
    max_retries: int = 2
    """Retries per role after a worker fails: prefill on another worker, decode resumed on another."""
    max_inflight_requests: int = 1024
    """Requests in progress beyond which new ones get RESOURCE_EXHAUSTED at once."""
    discovery_interval_s: float = 1.0
    """Seconds between two scans of the worker registrations in redis_url: workers that register
    are routed to besides the --prefill/--decode ones, and those whose lease lapsed are dropped
    (0: no discovery, the flags' workers only)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM the gateway turns NOT_SERVING (/health answers 503 "draining"), refuses new requests
    (gRPC UNAVAILABLE, HTTP 503) and lets the open ones (streams too) finish for at most this many
    seconds; then it stops (those still running are cancelled) and exits 0."""
    redis_timeout_s: float = 0.5
    """Socket timeout of the ownership lookup; after a failure Redis is skipped for 2 s."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """Routing policy weights and thresholds."""
    tracing: TracingConfig = field(default_factory=TracingConfig)
    """Trace spans (off unless otlp_endpoint is set)."""

    def __post_init__(self) -> None:
        if not self.discovers and not (self.prefill_addresses and self.decode_addresses):
            raise ValueError("prefill and decode must each name at least one HOST:PORT, unless workers are "
                             "discovered (redis_url set and discovery_interval_s > 0)")
        if not 0 <= self.drain_timeout_s < math.inf:
            raise ValueError(f"drain_timeout_s must be a finite number of seconds >= 0, got {self.drain_timeout_s}")
        if not 0 <= self.discovery_interval_s < math.inf:
            raise ValueError(f"discovery_interval_s must be a finite number >= 0, got {self.discovery_interval_s}")
        for name in ("load_poll_interval_s", "load_timeout_s", "request_timeout_s", "redis_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535] (or -1 for none), got {self.http_port}")
        if self.startup_timeout_s < 0 or self.max_retries < 0 or self.max_inflight_requests < 1:
            raise ValueError("startup_timeout_s and max_retries must be >= 0, max_inflight_requests >= 1")

    @property
    def discovers(self) -> bool:
        """Whether the gateway follows worker registrations in Redis."""
        return bool(self.redis_url) and self.discovery_interval_s > 0

    @property
    def prefill_addresses(self) -> list[str]:
        return [a.strip() for a in self.prefill.split(",") if a.strip()]

    @property
    def decode_addresses(self) -> list[str]:
        return [a.strip() for a in self.decode.split(",") if a.strip()]
