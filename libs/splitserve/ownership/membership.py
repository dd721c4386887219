"""Worker discovery through Redis: each worker keeps a registration under a lease; gateways scan them.

Key (one per worker and role):
    ss:wrk:<role>:<advertised address>   JSON of a WorkerRecord; PX ttl, rewritten every third of it
A worker killed with -9 stops renewing, so its key is gone within one TTL; one that drains rewrites
its record with state "draining" at once, and deletes it when it exits. Records are written whole
(SET ... PX) rather than only re-armed, so a Redis that restarted empty has every live worker again
within a third of a TTL. Colocated workers register with role "colocated" (they answer both).

Only SET, DEL, SCAN and MGET are used: single-key commands, as in registry.py.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, replace

from splitserve.ownership import resp
from splitserve.ownership.registry import redact_url

log = logging.getLogger(__name__)

WORKER_KEY_PREFIX = "ss:wrk:"
ROLES = ("prefill", "decode", "colocated")
SERVING, DRAINING = "serving", "draining"


@dataclass(frozen=True)
class WorkerRecord:
    """What a worker says of itself in its registration."""

    role: str  # "prefill" | "decode" | "colocated"
    address: str  # advertised host:port: what gateways dial, and the worker's Redis owner id after "role:"
    model_id: str
    num_total_blocks: int  # KV cache capacity, in blocks
    max_num_seqs: int  # most sequences in one step
    state: str = SERVING  # SERVING | DRAINING

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker role must be one of {ROLES}, got {self.role!r}")
        if self.state not in (SERVING, DRAINING):
            raise ValueError(f"worker state must be {SERVING!r} or {DRAINING!r}, got {self.state!r}")
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"worker address must be HOST:PORT, got {self.address!r}")

    @property
    def key(self) -> str:
        return f"{WORKER_KEY_PREFIX}{self.role}:{self.address}"

    @property
    def draining(self) -> bool:
        return self.state == DRAINING

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> WorkerRecord:
        """The record of a registration's value; ValueError naming what is wrong."""
        try:
            fields = json.loads(raw)
            return cls(**{name: fields[name] for name in cls.__dataclass_fields__ if name in fields})
        except (TypeError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"bad worker registration {raw[:80]!r}: {exc}") from None


class WorkerRegistration:
    """A worker's registration, renewed every ttl_s / 3 by a daemon thread until stop().

    Redis errors are logged once per outage and retried at the next renewal: discovery is how
    gateways find the worker, never a reason for it to stop serving.
    """

    def __init__(self, redis_url: str, record: WorkerRecord, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"registration ttl_s must be > 0, got {ttl_s}")
        self.url = redact_url(redis_url)
        self.ttl_ms = max(int(ttl_s * 1000), 1)
        # fails fast (no retries): a renewal that hangs would let the lease lapse anyway
        self._client = resp.Client(redis_url, timeout_s=0.5)
        self._record = record
        self._lock = threading.Lock()  # the record and the write that carries it
        self._stop = threading.Event()
        self._failing = False
        self._thread: threading.Thread | None = None

    @property
    def record(self) -> WorkerRecord:
        return self._record

    def start(self) -> WorkerRegistration:
        self._write()
        self._thread = threading.Thread(target=self._run, name=f"registration-{self._record.role}", daemon=True)
        self._thread.start()
        log.info("worker registered: key=%s ttl_s=%g redis=%s", self._record.key, self.ttl_ms / 1000, self.url)
        return self

    def set_draining(self) -> None:
        """Rewrites the record as draining now (gateways stop sending it work at their next scan)."""
        with self._lock:
            self._record = replace(self._record, state=DRAINING)
        self._write()

    def _write(self) -> None:
        with self._lock:
            try:
                self._client.set(self._record.key, self._record.encode(), px=self.ttl_ms)
            except resp.RedisError as exc:
                if not self._failing:
                    log.warning("worker registration not renewed: key=%s redis=%s error=%s", self._record.key,
                                self.url, exc)
                self._failing = True
                return
            if self._failing:
                log.info("worker registration renewed again: key=%s", self._record.key)
            self._failing = False

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            self._write()

    def stop(self, deregister: bool = True) -> None:
        """Stops renewing; with deregister, deletes the key (gateways drop the worker at their next scan)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if deregister:
            try:
                self._client.delete(self._record.key)
            except resp.RedisError as exc:  # the lease runs out instead
                log.warning("worker not deregistered (its lease expires instead): key=%s error=%s",
                            self._record.key, exc)
        self._client.close()


async def scan_records(client) -> list[WorkerRecord]:
    """Every live registration (a redis.asyncio client); a malformed one is logged and skipped.
    Raises redis.RedisError when Redis does not answer."""
    keys = [key async for key in client.scan_iter(match=WORKER_KEY_PREFIX + "*", count=1000)]
    if not keys:
        return []
    records = []
    for key, raw in zip(keys, await client.mget(keys)):
        if raw is None:  # expired between the scan and the read
            continue
        try:
            records.append(WorkerRecord.decode(raw))
        except ValueError as exc:
            log.warning("worker registration skipped: key=%s %s", key, exc)
    return records
