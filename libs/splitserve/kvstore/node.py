"""What one kvstore process holds besides its gRPC server: the BlockStore, the shared-memory area
and its arenas, the ownership registry and reporter (Redis), and the metrics with their endpoint.

Metrics (Prometheus, GET /metrics on metrics_port; role "kvstore", model_name "": one store may hold
blocks of several models, each block's header names its own, so no single model label fits): the
transfer series of splitserve.kvstore.service, and kv_cache_usage_perc = used_bytes /
capacity_bytes, read on each scrape.
"""
from __future__ import annotations

import logging
import time

from splitserve.config.kvstore import KVStoreConfig
from splitserve.kvstore import shm
from splitserve.kvstore.arena import ArenaManager
from splitserve.kvstore.block_store import BlockStore
from splitserve.kvstore.service import KVStoreService
from splitserve.metrics import Metrics, MetricsServer
from splitserve.ownership.registry import OwnershipRegistry, OwnershipReporter

log = logging.getLogger("splitserve.kvstore")


class KVStoreNode:
    """The store and what reports on it. Built before the gRPC server binds; `attach` once the
    owner id (the advertised address) is known; `start` and `close` around serving."""

    def __init__(self, config: KVStoreConfig):
        self.config = config
        self.store = BlockStore(config.capacity_bytes, config.lease_ttl_s, on_evict=self._evicted)
        self.area: shm.ShmArea | None = None
        self.arenas: ArenaManager | None = None  # in area's directory; None: streams only
        if config.shm_dir and config.arena_bytes > 0:
            try:
                self.area = shm.ShmArea(config.shm_dir)
            except OSError as e:
                log.warning("no shared-memory path (gRPC streams only): %s", e)
            else:
                self.arenas = ArenaManager(self.area.path, config.arena_bytes, config.shm_slot_ttl_s)
        self.registry = OwnershipRegistry(config.redis_url, config.ownership_ttl_s) if config.redis_url else None
        self.reporter: OwnershipReporter | None = None  # made by attach
        self.service: KVStoreService | None = None  # made by attach
        self.metrics = Metrics("kvstore")
        for direction in ("put", "get"):
            self.metrics.touch("kv_transfer_bytes", "kv_transfer_seconds", "kv_transfer_failures", direction=direction)
        self.metrics.on_collect(self._refresh_metrics)
        self.metrics_server: MetricsServer | None = None

    def bind_metrics(self, default_host: str) -> None:
        """Binds the /metrics port now (unless metrics_port is -1), so a taken port fails the
        start-up like a taken gRPC port. OSError."""
        if self.config.metrics_port >= 0:
            self.metrics_server = MetricsServer(self.metrics, self.config.metrics_host or default_host,
                                                self.config.metrics_port)

    def attach(self, owner_id: str) -> KVStoreService:
        """The service over this store, reporting ownership as `owner_id` when Redis is configured."""
        if self.registry is not None:
            cfg = self.config
            self.reporter = OwnershipReporter(self.registry, owner_id, self.store.hashes,
                                              refresh_s=cfg.ownership_ttl_s / 3, retry_s=cfg.ownership_retry_s)
        self.service = KVStoreService(self.config, self.store, self.reporter, self.metrics, self.arenas)
        return self.service

    @property
    def metrics_url(self) -> str:
        """http://HOST:PORT/metrics, or "" when the endpoint is off."""
        return self.metrics_server.url if self.metrics_server is not None else ""

    def _refresh_metrics(self) -> None:
        s = self.store.stats()
        self.metrics.set_load(kv_cache_usage=s.used_bytes / s.capacity_bytes)

    def _evicted(self, hashes: list[bytes]) -> None:
        if self.reporter is not None:
            self.reporter.remove(hashes)

    def start(self) -> None:
        """Starts the ownership reporter and the metrics endpoint (the gRPC server starts between)."""
        if self.reporter is not None:
            self.reporter.start()

    def start_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.start()

    def drain(self, timeout_s: float) -> bool:
        """SIGTERM: new puts are refused while blocks under lease stay readable (a decode worker is
        still to fetch them); returns once no lease is left (released or expired), or False after
        timeout_s."""
        self.service.draining = True
        deadline = time.monotonic() + timeout_s
        leases = self.store.stats().num_leases
        log.info("kvstore draining: %d lease(s) open, drain_timeout_s=%g", leases, timeout_s)
        while leases and time.monotonic() < deadline:
            time.sleep(0.05)
            leases = self.store.stats().num_leases  # (stats() drops the expired ones)
        (log.warning if leases else log.info)("kvstore drained: %d lease(s) still open", leases)
        return not leases

    def close(self) -> None:
        """Stops reporting and frees the shared memory; the gRPC server must be stopped first."""
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.reporter is not None:
            self.reporter.stop()
        if self.registry is not None:
            self.registry.close()
        if self.area is not None:
            self.arenas.close()
            self.area.close()
