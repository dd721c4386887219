"""The config of a worker process (prefill, decode or colocated): its server, engine, TLS, metrics
and ownership parts, and what only a worker has (the kvstore it uses, threads, cores)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitserve.config.cpus import parse_cpu_list
from splitserve.config.engine import EngineConfig
from splitserve.config.flags import composed
from splitserve.config.parts import InternalServerConfig, MetricsConfig, OwnershipConfig, TLSConfig, TracingConfig
from splitserve.rpc import mtls_credentials

PIN_THREADS = ("auto", "off")  # WorkerConfig.pin_threads

WORKER_PORT = 50061  # the default gRPC port of a worker (compose's prefill; `up` picks free ones)
WORKER_MAX_MESSAGE_BYTES = 64 << 20  # a prefill's exported blocks travel in one response


@composed
@dataclass(frozen=True)
class WorkerConfig:
    server: InternalServerConfig = field(default_factory=lambda: InternalServerConfig(
        port=WORKER_PORT, max_message_bytes=WORKER_MAX_MESSAGE_BYTES))
    """The gRPC server: host, port, advertise_address, max_message_bytes."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The engine: model, dtype, KV cache, scheduler limits (shared with `LLM(...)`)."""
    tls: TLSConfig = field(default_factory=TLSConfig)
    """Mutual TLS with the other roles."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """The Prometheus endpoint."""
    ownership: OwnershipConfig = field(default_factory=OwnershipConfig)
    """Redis records of the blocks in this worker's prefix cache."""
    tracing: TracingConfig = field(default_factory=TracingConfig)
    """Trace spans (off unless otlp_endpoint is set)."""
    kvstore: str = ""
    """Address of the kvstore the blocks go through ("" = none: decode recomputes prompts)."""
    kv_lease_ttl_s: float = 60.0
    """How long the kvstore pins a request's blocks for the decode worker."""
    kv_fetch_buffer_mb: float = 32.0
    """A decode worker's most MiB of fetched KV blocks not yet written into its cache, across its
    requests, from a kvstore on another host (same-host payloads are read straight into their
    pages): a prompt with more is fetched in parts, and requests wait for room."""
    max_pending: int = 256
    """Most requests held at once; beyond it new ones are refused with RESOURCE_EXHAUSTED."""
    grpc_threads: int = 64
    """gRPC handler threads (each open stream holds one)."""
    torch_threads: int = 0
    """CPU threads for the model (0 = one per core of `cpus`, else torch's default: all cores).
    Workers sharing cores should run with a short OpenMP spin (GOMP_SPINCOUNT=10000, as `splitserve
    up` sets), or libgomp's default spin keeps idle threads busy on them for milliseconds."""
    cpus: str = ""
    """Cores this worker runs on, in the cpu-list format of taskset ('0', '2-3', '0,4-7'; '' = all).
    Pinning prefill and decode workers to different cores keeps a long prefill from delaying the
    running decodes' next tokens."""
    pin_threads: str = field(default="auto", metadata={"choices": PIN_THREADS})
    """auto: when the model's threads are as many as the cores this worker may run on (`cpus`, else
    the process's), thread i of the engine's thread team stays on the i-th core; off: the scheduler
    places them (two threads of the team laid on one core then take turns at every barrier, while
    another core idles, until the scheduler moves one: milliseconds)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM (or a Drain call) the worker stops taking work and lets its running requests
    finish for at most this many seconds; a decode worker then ends the streams still running with
    UNAVAILABLE, which the gateway resumes on another decode worker; then the process exits 0."""
    registration_ttl_s: float = 3.0
    """TTL of this worker's registration in Redis (role, advertised address, model, capacity), which
    gateways follow to discover it; renewed every third of it (0: do not register)."""

    def __post_init__(self) -> None:
        if self.cpus:
            parse_cpu_list(self.cpus)  # a bad list fails here, naming the cores
        for name in ("max_pending", "grpc_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("drain_timeout_s", "registration_ttl_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {getattr(self, name)}")
        if not 1 / 1024 <= self.kv_fetch_buffer_mb < math.inf:  # below a KiB: surely a mistake
            raise ValueError(f"kv_fetch_buffer_mb must be a finite number of MiB >= 1/1024, "
                             f"got {self.kv_fetch_buffer_mb}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.pin_threads not in PIN_THREADS:
            raise ValueError(f"pin_threads must be one of {', '.join(PIN_THREADS)}, got {self.pin_threads!r}")

    def channel_credentials(self):
        """Credentials for this worker's own calls (to the kvstore): mutual TLS, or None."""
        return mtls_credentials(self.tls.tls_ca_file, self.tls.tls_cert_file, self.tls.tls_key_file)[1]

    def engine_config(self) -> EngineConfig:
        return self.engine
