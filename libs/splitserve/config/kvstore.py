"""The kvstore's config."""
from __future__ import annotations

import math
from dataclasses import dataclass

from splitserve import rpc

_GIB = 1 << 30
CHUNK_OVERHEAD = 64 << 10  # room for header, hash and framing beside a chunk's data, bytes


@dataclass(frozen=True)
class KVStoreConfig:
    host: str = "127.0.0.1"
    """Address to bind the gRPC server to (0.0.0.0 for all interfaces)."""
    port: int = 50070
    """gRPC port; 0 picks a free one."""
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
    redis_url: str = ""
    """Redis holding block ownership (redis://host:port/db); empty: no ownership reporting."""
    ownership_ttl_s: float = 600.0
    """TTL of ownership entries in Redis, in seconds; held blocks are re-recorded every third of it."""
    ownership_retry_s: float = 5.0
    """While Redis is unreachable, seconds between attempts to rebuild this store's ownership."""
    advertise_address: str = ""
    """host:port other processes reach this store at (its owner id in Redis); empty: host:port."""
    tls_ca_file: str = ""
    """Mutual TLS between roles: the PEM CA that signed every role's certificate (with tls_cert_file
    and tls_key_file; all three or none). The gRPC server then requires client certificates and
    this process's own calls present its certificate."""
    tls_cert_file: str = ""
    """Mutual TLS: this process's PEM certificate (its SANs must name the address others dial)."""
    tls_key_file: str = ""
    """Mutual TLS: the PEM private key of tls_cert_file."""
    max_message_bytes: int = 16 << 20
    """Largest gRPC message sent or received, in bytes."""
    max_workers: int = 16
    """gRPC server threads (concurrent RPCs)."""
    shutdown_grace_s: float = 5.0
    """On SIGTERM/SIGINT, seconds in-flight RPCs get to finish."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint (0 picks a free one, logged; -1 turns it off)."""
    metrics_host: str = ""
    """Address the /metrics endpoint binds ("" = the same as host)."""

    def __post_init__(self) -> None:
        rpc.check_mtls_files(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], or -1 for no metrics endpoint, "
                             f"got {self.metrics_port}")
        if not self.capacity_bytes >= 1:
            raise ValueError(f"capacity_gb must be > 0, got {self.capacity_gb}")
        for name in ("lease_ttl_s", "max_lease_ttl_s", "ownership_ttl_s", "ownership_retry_s", "shm_slot_ttl_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if math.isnan(self.shm_arena_gb) or math.isinf(self.shm_arena_gb):
            raise ValueError(f"shm_arena_gb must be a number of GiB, got {self.shm_arena_gb}")
        if self.lease_ttl_s > self.max_lease_ttl_s:
            raise ValueError(f"lease_ttl_s ({self.lease_ttl_s}) must be <= max_lease_ttl_s ({self.max_lease_ttl_s})")
        if self.chunk_bytes < 1 or self.chunk_bytes + CHUNK_OVERHEAD > self.max_message_bytes:
            raise ValueError(f"chunk_bytes must be in [1, max_message_bytes - {CHUNK_OVERHEAD}], "
                             f"got {self.chunk_bytes} with max_message_bytes {self.max_message_bytes}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")

    @property
    def capacity_bytes(self) -> int:
        return int(self.capacity_gb * _GIB)

    @property
    def arena_bytes(self) -> int:
        """Most tmpfs bytes the arenas may allocate."""
        return self.capacity_bytes if self.shm_arena_gb < 0 else int(self.shm_arena_gb * _GIB)
