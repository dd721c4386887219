"""Block ownership in Redis: which processes hold which KV block (a routing hint, never the truth).

Keys (hashes are the chained block hashes of splitserve.engine.hashing, hex-encoded):
    ss:blk:<hash hex>   SET of owner ids holding that block; PEXPIRE ttl_s, refreshed on each record
    ss:own:<owner id>   SET of the block hash hexes that owner recorded; lets clear_owner find them
Owner ids name a role and its advertised address: "prefill:127.0.0.1:50061",
"kvstore:127.0.0.1:50070", "decode:10.0.0.7:50062".

The TTL is per block key, not per (block, owner): an owner that records a block keeps every other
owner's entry for that block alive too. Entries can therefore outlive the block by up to ttl_s;
readers treat ownership as a hint and recompute or fetch elsewhere when it is wrong.

`OwnershipReporter` keeps one process's entries in step with what it holds (refreshing TTLs,
rebuilding after a Redis outage); every role that holds blocks uses one.

Only single-key commands are used, in non-transactional pipelines, so the same calls work on
Redis Cluster (where a pipeline is split per node).
"""
from __future__ import annotations

import logging
import threading
import time

from splitserve.ownership import resp
from splitserve.ownership.resp import redact_url  # noqa: F401 (the roles import it from here)

log = logging.getLogger(__name__)

BLOCK_KEY_PREFIX = "ss:blk:"
OWNER_KEY_PREFIX = "ss:own:"


class OwnershipUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error; callers fall back (route by load only)."""


def block_key(block_hash: bytes) -> str:
    """The Redis key of a block's owner set; ValueError unless the hash is non-empty bytes."""
    if not isinstance(block_hash, (bytes, bytearray)) or not block_hash:
        raise ValueError(f"block hash must be non-empty bytes, got {type(block_hash).__name__} {block_hash!r:.40}")
    return BLOCK_KEY_PREFIX + bytes(block_hash).hex()


def queue_owner_reads(pipe, hashes: list[bytes]) -> None:
    """Queues one SMEMBERS per block hash on `pipe` (a resp.Pipeline: the registry's owner read; the
    gateway's async reader gets the same replies from one script, reader.OWNERS_SCRIPT); owner_sets
    parses the replies."""
    for h in hashes:
        pipe.smembers(block_key(h))


def owner_sets(replies: list) -> list[set[str]]:
    """The owner ids per block from the replies of queue_owner_reads' commands (or of the reader's
    script), in order."""
    return [{m.decode() for m in members} for members in replies]


class OwnershipRegistry:
    """Records and reads block ownership; every method is at most one pipelined round trip
    (clear_owner: two). Thread-safe (the client sends one round trip at a time).

    Raises OwnershipUnavailable on any Redis error; ValueError on bad arguments.
    """

    def __init__(self, redis_url: str, ttl_s: float = 600.0, socket_timeout_s: float = 0.5):
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_ms = max(int(ttl_s * 1000), 1)  # PEXPIRE takes milliseconds
        self.url = redact_url(redis_url)
        # No retries: a caller on the hot path prefers a fast OwnershipUnavailable to a slow answer.
        self._client = resp.Client(redis_url, socket_timeout_s)
        self._lock = threading.Lock()
        self.round_trips = 0  # pipelines and commands sent to Redis by this instance

    def _run(self, what: str, pipe: resp.Pipeline) -> list:
        with self._lock:
            self.round_trips += 1
        try:
            return pipe.execute()
        except resp.RedisError as e:
            raise OwnershipUnavailable(f"Redis at {self.url} unavailable ({what}): {e}") from e

    @staticmethod
    def _check_owner(owner: str) -> None:
        if not isinstance(owner, str) or not owner:
            raise ValueError(f"owner id must be a non-empty string, got {owner!r}")

    def record(self, owner: str, hashes: list[bytes]) -> None:
        """Marks `owner` as holding each block and refreshes the blocks' TTL (one round trip)."""
        self._check_owner(owner)
        keys = [block_key(h) for h in hashes]
        if not keys:
            return
        own_key = OWNER_KEY_PREFIX + owner
        pipe = self._client.pipeline()
        for key in keys:
            pipe.sadd(key, owner)
            pipe.pexpire(key, self.ttl_ms)
        pipe.sadd(own_key, *(k[len(BLOCK_KEY_PREFIX):] for k in keys))
        pipe.pexpire(own_key, self.ttl_ms)
        self._run("record", pipe)

    def remove(self, owner: str, hashes: list[bytes]) -> None:
        """Drops `owner` from each block (evicted or freed); empty sets vanish (one round trip)."""
        self._check_owner(owner)
        keys = [block_key(h) for h in hashes]
        if not keys:
            return
        pipe = self._client.pipeline()
        for key in keys:
            pipe.srem(key, owner)
        pipe.srem(OWNER_KEY_PREFIX + owner, *(k[len(BLOCK_KEY_PREFIX):] for k in keys))
        self._run("remove", pipe)

    def owners(self, hashes: list[bytes]) -> list[set[str]]:
        """The owner ids of each block, in input order (empty set: nobody); one round trip."""
        if not hashes:
            return []
        pipe = self._client.pipeline()
        queue_owner_reads(pipe, hashes)
        return owner_sets(self._run("owners", pipe))

    def clear_owner(self, owner: str) -> int:
        """Removes every block ownership `owner` recorded (a restarted process holds nothing).

        Two round trips (read the owner's set, then remove); returns the number of blocks it had.
        """
        self._check_owner(owner)
        own_key = OWNER_KEY_PREFIX + owner
        pipe = self._client.pipeline()
        pipe.smembers(own_key)
        (members,) = self._run("clear_owner", pipe)
        pipe = self._client.pipeline()
        for hex_hash in members:
            pipe.srem(BLOCK_KEY_PREFIX + hex_hash.decode(), owner)
        pipe.delete(own_key)
        self._run("clear_owner", pipe)
        return len(members)

    def has_owner(self, owner: str) -> bool:
        """Whether Redis holds `owner`'s entries (its ss:own key); one round trip. False after a
        flush, a restart of a Redis without persistence, or a failover to an empty replica."""
        self._check_owner(owner)
        pipe = self._client.pipeline()
        pipe.exists(OWNER_KEY_PREFIX + owner)
        (count,) = self._run("has_owner", pipe)
        return bool(count)

    def ping(self) -> bool:
        """True when Redis answers PING; never raises."""
        with self._lock:
            self.round_trips += 1
        try:
            return self._client.ping()
        except resp.RedisError:
            return False

    def close(self) -> None:
        self._client.close()


class OwnershipReporter:
    """Keeps one process's ownership entries in step with what it holds, through Redis outages.

    - start() clears what a previous incarnation of `owner` left behind (a fresh process holds
      nothing) and starts a background thread.
    - record()/remove() go to Redis at once while it is reachable; during an outage they are
      skipped (no per-request timeouts) and the first failure is logged once as a warning.
    - The thread re-records every held block (`snapshot()`) each refresh_s, so resident blocks
      outlive the key TTL, and after an outage it clears and rebuilds the owner's entries every
      retry_s until Redis answers again.
    - Between refreshes it checks every check_s (default: retry_s) that Redis still has the owner's
      entries (one EXISTS): a Redis that went down and came back empty while this process had no
      traffic (nothing failed on the hot path) is noticed within check_s, not after refresh_s
      (minutes), and the entries are rebuilt; an unreachable Redis starts the outage handling.
    - A block already recorded (since the last resync, and not removed since) is not sent again:
      a prefix hit re-records its whole prompt, and the refresh keeps recorded blocks alive, so only
      the blocks new to this process cost a Redis command on the hot path.
    Entries may be stale for up to the registry's TTL (a block evicted during a resync), and a
    block may go unrecorded until the next refresh (one whose record and eviction raced).
    """

    _BATCH = 1024  # hashes per pipelined record during a resync

    def __init__(self, registry: OwnershipRegistry, owner: str, snapshot, refresh_s: float,
                 retry_s: float = 5.0, check_s: float | None = None):
        OwnershipRegistry._check_owner(owner)
        self.registry = registry
        self.owner = owner
        self._snapshot = snapshot  # () -> list[bytes]: the block hashes held right now
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self.check_s = retry_s if check_s is None else check_s
        for name in ("refresh_s", "retry_s", "check_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        self._synced = False  # Redis reflects our holdings; hot-path updates are sent
        self._warned = False  # the current outage has been logged
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when an outage starts or on stop: the thread re-plans
        self._recorded: set[bytes] = set()  # what Redis holds for us, as far as we know (under _lock)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def synced(self) -> bool:
        return self._synced

    def start(self) -> None:
        self._resync()
        self._thread = threading.Thread(target=self._run, name=f"ownership-{self.owner}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def record(self, hashes: list[bytes]) -> None:
        """Records the blocks not recorded already (one round trip when there are any)."""
        with self._lock:
            new = [h for h in dict.fromkeys(hashes) if h not in self._recorded]
        if self._send(self.registry.record, new):
            with self._lock:
                self._recorded.update(new)

    def remove(self, hashes: list[bytes]) -> None:
        with self._lock:
            self._recorded.difference_update(hashes)
        self._send(self.registry.remove, hashes)

    @property
    def num_recorded(self) -> int:
        """Blocks recorded and not removed since the last resync."""
        return len(self._recorded)

    def _send(self, op, hashes: list[bytes]) -> bool:
        """True when Redis took the command."""
        if not hashes or not self._synced:
            return False
        try:
            op(self.owner, hashes)
            return True
        except OwnershipUnavailable as e:
            self._lost(e)
            return False

    def _lost(self, error: Exception) -> None:
        self._synced = False
        with self._lock:
            self._recorded.clear()
        self._wake.set()
        if not self._warned:  # once per outage
            self._warned = True
            log.warning("ownership not reported: redis unavailable owner=%s retry_s=%g error=%s",
                              self.owner, self.retry_s, error)

    def _resync(self) -> None:
        """Re-records every held block; after an outage (or at start) clears the owner's entries
        first. Marks synced on success."""
        was_synced = self._synced
        try:
            if not was_synced:
                self.registry.clear_owner(self.owner)
                # Synced before the snapshot: a block stored after this point is recorded by the
                # hot path, one stored before is in the snapshot.
                self._synced = True
            held = self._snapshot()
            for i in range(0, len(held), self._BATCH):
                self.registry.record(self.owner, held[i:i + self._BATCH])
            with self._lock:
                self._recorded = set(held)
        except OwnershipUnavailable as e:
            self._lost(e)
            return
        if not was_synced:
            self._warned = False
            log.info("ownership synced to redis owner=%s blocks=%d", self.owner, len(held))

    def _check(self) -> None:
        """Rebuilds the owner's entries when Redis lost them while we held blocks (see the class
        docstring); an unreachable Redis starts the outage handling."""
        try:
            if self.registry.has_owner(self.owner) or not self._snapshot():
                return
        except OwnershipUnavailable as e:
            self._lost(e)
            return
        log.warning("ownership entries missing from redis (flushed or restarted empty): owner=%s; rebuilding",
                    self.owner)
        self._synced = False
        self._resync()

    def _run(self) -> None:
        next_refresh = time.monotonic() + self.refresh_s
        while not self._stop.is_set():
            if self._synced:
                timeout = max(0.0, min(self.check_s, next_refresh - time.monotonic()))
            else:
                timeout = self.retry_s
            woke = self._wake.wait(timeout)
            if self._stop.is_set():
                return
            if woke:  # an outage began: wait retry_s, not the rest of refresh_s
                self._wake.clear()
                continue
            try:
                if not self._synced or time.monotonic() >= next_refresh:
                    self._resync()
                    if self._synced:
                        next_refresh = time.monotonic() + self.refresh_s
                else:
                    self._check()
            except Exception:  # e.g. the snapshot timed out: report again later, never stop the thread
                log.exception("ownership report failed owner=%s", self.owner)
