"""The gateway's view of worker registrations in Redis (splitserve.ownership.membership).

Every `interval_s` the gateway scans the registrations and brings its WorkerPool in step: a new
registration adds the worker (routed to from its first good load poll, so within about a scan
and a poll of its start), a draining one stops getting new work at once, and one that is gone
(deregistered after a drain, or its lease lapsed: killed, hung, cut off) is removed with its
routing state, and its block-ownership entries are deleted, since nobody can fetch from a process
that is gone. A worker whose lease lapsed while it still answers its load polls is kept until a
poll fails: on a starved machine a renewal can come late, and a worker the gateway can reach is
not gone (a killed or hung one fails its next poll, within a poll interval plus load_timeout_s).
Workers named by the gateway's flags stay whatever Redis says (the union is routed).

A scan that fails (Redis down) changes nothing: the workers already known keep being routed to,
and their load polls still find out which are alive.
"""
from __future__ import annotations

import asyncio
import logging

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.asyncio.retry import Retry

from splitserve.gateway.router import DECODE, PREFILL
from splitserve.gateway.workers import WorkerPool
from splitserve.ownership.membership import WorkerRecord, scan_records
from splitserve.ownership.registry import BLOCK_KEY_PREFIX, OWNER_KEY_PREFIX, redact_url

log = logging.getLogger(__name__)


def routed_roles(record: WorkerRecord) -> tuple[str, ...]:
    """The gateway roles a registered worker serves (a colocated worker answers both)."""
    return (PREFILL, DECODE) if record.role == "colocated" else (record.role,)


class Discovery:
    """Follows registrations into `pool` (see the module docstring); start() and close() on the
    gateway's event loop."""

    def __init__(self, redis_url: str, pool: WorkerPool, interval_s: float, timeout_s: float = 0.5) -> None:
        self.url = redact_url(redis_url)
        self._client = aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               retry=Retry(NoBackoff(), 0))
        self._pool = pool
        self._interval_s = interval_s
        self._known: dict[tuple[str, str], WorkerRecord] = {}  # (gateway role, address) -> its registration
        self._task: asyncio.Task | None = None
        self._failing = False

    @property
    def known(self) -> dict[tuple[str, str], WorkerRecord]:
        return dict(self._known)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gateway-discovery")

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
                if self._failing:
                    log.info("worker discovery: redis answers again: url=%s", self.url)
                self._failing = False
            except (redis.RedisError, OSError) as exc:
                if not self._failing:
                    log.warning("worker discovery paused, redis unavailable (known workers kept): url=%s error=%s",
                                self.url, exc)
                self._failing = True
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop discovery for good
                log.exception("worker discovery failed")
            await asyncio.sleep(self._interval_s)

    async def sync(self) -> None:
        """One scan: adds, marks draining and removes workers (raises redis.RedisError)."""
        seen = {(role, r.address): r for r in await scan_records(self._client) for role in routed_roles(r)}
        for (role, address), record in seen.items():
            if (role, address) not in self._known and self._pool.add(role, address):
                log.info("worker discovered: role=%s address=%s model_id=%s blocks=%d max_num_seqs=%d", role,
                         address, record.model_id, record.num_total_blocks, record.max_num_seqs)
            if record.draining:
                self._pool.set_draining(role, address)
        gone = {key: r for key, r in self._known.items() if key not in seen}
        for key in [key for key in gone if self._answers(*key)]:
            seen[key] = gone.pop(key)  # lease lapsed but alive: looked at again at the next scan
        self._known = seen
        for (role, address), record in gone.items():
            removed = self._pool.remove(role, address)
            log.info("worker gone (deregistered or lease lapsed): role=%s address=%s%s", role, address,
                     "" if removed else " (kept: named by the gateway's flags)")
        for owner in {f"{r.role}:{r.address}" for r in gone.values()}:
            blocks = await self.forget_owner(owner)
            log.info("ownership entries dropped: owner=%s blocks=%d", owner, blocks)

    def _answers(self, role: str, address: str) -> bool:
        """Whether the worker answered its last load poll (and no call to it failed since)."""
        router = self._pool.router
        return router is not None and router.has_worker(role, address) and router.worker(role, address).healthy

    async def forget_owner(self, owner: str) -> int:
        """Deletes `owner`'s block-ownership entries (two round trips); returns how many blocks it had."""
        own_key = OWNER_KEY_PREFIX + owner
        members = await self._client.smembers(own_key)
        pipe = self._client.pipeline(transaction=False)
        for hex_hash in members:
            pipe.srem(BLOCK_KEY_PREFIX + hex_hash.decode(), owner)
        pipe.delete(own_key)
        await pipe.execute()
        return len(members)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._client.aclose()
