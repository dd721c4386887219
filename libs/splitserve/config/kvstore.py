"""The kvstore's config: its server, ownership, TLS and metrics parts, and the block store's budget,
leases and shared-memory arenas."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitserve.config.flags import composed
from splitserve.config.parts import InternalServerConfig, MetricsConfig, OwnershipConfig, TLSConfig, TracingConfig

_GIB = 1 << 30
CHUNK_OVERHEAD = 64 << 10  # room for header, hash and framing beside a chunk's data, bytes
KVSTORE_PORT = 50070  # the default gRPC port (compose's kvstore; `up` picks a free one)
KVSTORE_MAX_MESSAGE_BYTES = 16 << 20


@composed
@dataclass(frozen=True)
class KVStoreConfig:
    server: InternalServerConfig = field(default_factory=lambda: InternalServerConfig(
        port=KVSTORE_PORT, max_message_bytes=KVSTORE_MAX_MESSAGE_BYTES))
    """The gRPC server: host, port, advertise_address, max_message_bytes."""
    capacity_gb: float = 2.0
    """Host-memory budget for blocks in GiB (headers + payloads); LRU eviction beyond it."""
    lease_ttl_s: float = 60.0
    """Lease lifetime when a Put names a lease without lease_ttl_s, in seconds."""
    max_lease_ttl_s: float = 600.0
    """Longest lease a client may ask for, in seconds; longer requests are cut to this."""
    chunk_bytes: int = 1 << 20
    """Payload bytes per BlockChunk sent by Get."""
    shm_dir: str = "/dev/shm"
    """Shared-memory directory for same-host transfers (clients on this host move payloads through
    arena files there instead of gRPC streams); empty: gRPC streams only."""
    shm_slot_ttl_s: float = 60.0
    """Seconds a client has to commit the arena slots it reserved (those of a client that died come
    back after it), and that a same-host get pins the blocks it hands out while the client copies."""
    shm_arena_gb: float = -1.0
    """Most shared memory (tmpfs) the arenas may allocate, in GiB (allocated in 64 MiB steps as
    needed, kept until the store stops); negative: capacity_gb. Past it (or when tmpfs is full),
    same-host clients stream."""
    ownership: OwnershipConfig = field(default_factory=OwnershipConfig)
    """Redis records of the blocks this store holds."""
    ownership_retry_s: float = 5.0
    """While Redis is unreachable, seconds between attempts to rebuild this store's ownership."""
    tls: TLSConfig = field(default_factory=TLSConfig)
    """Mutual TLS with the other roles."""
    max_workers: int = 16
    """gRPC server threads (concurrent RPCs)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM/SIGINT the store turns NOT_SERVING and refuses new puts (UNAVAILABLE) but keeps
    serving reads while leases pin blocks: until the last lease is released or expires, at most this
    many seconds; then it stops (0: at once)."""
    shutdown_grace_s: float = 5.0
    """After the drain, seconds in-flight RPCs get to finish."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """The Prometheus endpoint."""
    tracing: TracingConfig = field(default_factory=TracingConfig)
    """Trace spans (off unless otlp_endpoint is set)."""

    def __post_init__(self) -> None:
        if not self.capacity_bytes >= 1:
            raise ValueError(f"capacity_gb must be > 0, got {self.capacity_gb}")
        for name in ("lease_ttl_s", "max_lease_ttl_s", "ownership_retry_s", "shm_slot_ttl_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if not 0 <= self.drain_timeout_s < math.inf:
            raise ValueError(f"drain_timeout_s must be a finite number of seconds >= 0, got {self.drain_timeout_s}")
        if math.isnan(self.shm_arena_gb) or math.isinf(self.shm_arena_gb):
            raise ValueError(f"shm_arena_gb must be a number of GiB, got {self.shm_arena_gb}")
        if self.lease_ttl_s > self.max_lease_ttl_s:
            raise ValueError(f"lease_ttl_s ({self.lease_ttl_s}) must be <= max_lease_ttl_s ({self.max_lease_ttl_s})")
        max_message_bytes = self.server.max_message_bytes
        if self.chunk_bytes < 1 or self.chunk_bytes + CHUNK_OVERHEAD > max_message_bytes:
            raise ValueError(f"chunk_bytes must be in [1, max_message_bytes - {CHUNK_OVERHEAD}], "
                             f"got {self.chunk_bytes} with max_message_bytes {max_message_bytes}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")

    @property
    def capacity_bytes(self) -> int:
        return int(self.capacity_gb * _GIB)

    @property
    def arena_bytes(self) -> int:
        """Most tmpfs bytes the arenas may allocate."""
        return self.capacity_bytes if self.shm_arena_gb < 0 else int(self.shm_arena_gb * _GIB)
