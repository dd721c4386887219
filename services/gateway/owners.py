"""Async reader of block ownership for the gateway's event loop (redis.asyncio).

Reads the keys `splitserve.ownership.OwnershipRegistry` writes (ss:blk:<hash hex> -> SET of owner
ids), in one pipelined round trip per request. Ownership is a routing hint only: when Redis is
unreachable the reader answers "nobody owns anything" (the router then routes by load), logs the
outage once, and skips Redis for `backoff_s` so requests do not each pay a connect timeout.
"""
from __future__ import annotations

import logging
import time

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from splitserve.ownership import BLOCK_KEY_PREFIX, redact_url

log = logging.getLogger(__name__)


class AsyncOwnersReader:
    """owners(hashes) -> list[set[str]]; never raises for Redis errors (see the module docstring).

    `available` is False while Redis is considered down; `round_trips` counts pipelines sent.
    An empty redis_url disables Redis: every answer is empty sets, with no round trip.
    """

    def __init__(self, redis_url: str, timeout_s: float = 0.5, backoff_s: float = 2.0) -> None:
        self.url = redact_url(redis_url) if redis_url else ""
        self._client = None
        if redis_url:
            self._client = aioredis.Redis.from_url(
                redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        self._backoff_s = backoff_s
        self._down_until = 0.0  # time.monotonic() before which Redis is not asked
        self.available = bool(redis_url)
        self.round_trips = 0

    async def owners(self, hashes: list[bytes]) -> list[set[str]]:
        """The owner ids of each block hash, in order (empty sets when unknown or Redis is down)."""
        empty = [set() for _ in hashes]
        if self._client is None or not hashes or time.monotonic() < self._down_until:
            return empty
        pipe = self._client.pipeline(transaction=False)
        for h in hashes:
            pipe.smembers(BLOCK_KEY_PREFIX + bytes(h).hex())
        self.round_trips += 1
        try:
            replies = await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._down_until = time.monotonic() + self._backoff_s
            if self.available:
                log.warning("redis unavailable, routing by load only: url=%s error=%s", self.url, exc)
            self.available = False
            return empty
        if not self.available:
            log.info("redis available again, routing by prefix and load: url=%s", self.url)
            self.available = True
        return [{m.decode() for m in members} for members in replies]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
