"""KV blocks in host memory under a byte budget, with LRU eviction and leases.

Invariants (all under one lock; the gRPC server calls in from many threads):
- used_bytes = sum over resident blocks of len(header) + len(payload) <= capacity_bytes.
- A block is stored whole and verified (header parses, hash matches, size and checksum match) or
  not at all; get() re-verifies the checksum (unless its caller checks: a same-host reader) and
  drops a block whose bytes changed in memory.
- A payload is bytes held in this process, or a StoredPayload (an arena slot in the kvstore's
  shared-memory directory, for blocks that arrived through it). The store owns a StoredPayload once
  put() stored it and discards it when the block leaves; a put that does not store it leaves it to
  the caller.
- LRU order is the order of last use, where a use is a put (new or already present) or a
  successful get. Pinning and unpinning do not change the order.
- A block is pinned while at least one unexpired lease holds it; pinned blocks are never
  evicted. Eviction takes the least recently used unpinned blocks, and only when the new block
  then fits: a put that cannot fit evicts nothing and raises StoreFullError. evict_where() evicts
  the same way among blocks of one kind (the arena frees slots of one payload size with it).
- Leases expire lazily: every public call first drops leases whose deadline (on `clock`, in
  seconds) has passed.
"""
from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol, Union

from splitserve.transfer.block import BlockHeader, KVBlockError, check_payload, payload_checksum

log = logging.getLogger(__name__)


class StoreFullError(Exception):
    """The block cannot fit: the rest of the store is pinned by leases, or the block exceeds the
    whole capacity. The gRPC shell maps it to RESOURCE_EXHAUSTED."""


class PutResult(NamedTuple):
    stored: bool  # the block was added by this put
    already_present: bool  # the store held it already (lease, if any, still applied)
    evicted: list[bytes]  # hashes evicted to make room, oldest use first


@dataclass(frozen=True)
class StoreStats:
    num_blocks: int
    used_bytes: int  # headers + payloads of resident blocks
    capacity_bytes: int
    num_leases: int  # unexpired leases
    num_pinned_blocks: int
    num_evictions: int  # blocks evicted for room since start (corrupt drops not included)
    bytes_in: int  # header + payload bytes of blocks newly stored
    bytes_out: int  # header + payload bytes returned by get()
    num_corrupt: int  # blocks dropped by get() because their checksum no longer matched


class StoredPayload(Protocol):
    """A payload kept outside this process's heap (an arena slot, splitserve.kvstore.arena). The store
    owns it once put() stored it and discards it when the block leaves; a put that does not store it
    leaves it to the caller."""

    def __len__(self) -> int: ...

    def checksum(self) -> int:
        """payload_checksum of its bytes; OSError when they cannot be read."""

    def read(self) -> bytes:
        """A copy of its bytes."""

    def discard(self) -> None:
        """Gives its storage back (idempotent)."""


Payload = Union[bytes, StoredPayload]
_BUFFERS = (bytes, bytearray, memoryview)


def _checksum(payload: Payload) -> int | None:
    """The payload's checksum, or None when a stored payload cannot be read."""
    if isinstance(payload, _BUFFERS):
        return payload_checksum(payload)
    try:
        return payload.checksum()
    except OSError:
        return None


@dataclass
class _Entry:
    header: bytes
    payload: Payload
    checksum: int  # checksum of payload, from the header
    leases: set[str] = field(default_factory=set)  # ids of the unexpired leases pinning it

    @property
    def nbytes(self) -> int:
        return len(self.header) + len(self.payload)


@dataclass
class _Lease:
    expires_at: float  # on the store's clock, seconds
    hashes: set[bytes] = field(default_factory=set)


def verify_block(block_hash: bytes, header_bytes: bytes, payload: Payload,
                 header: BlockHeader | None = None) -> BlockHeader:
    """The parsed header (`header`: header_bytes already parsed by the caller); KVBlockError naming
    the first problem (header, hash, size, checksum)."""
    if header is None:
        header = BlockHeader.from_bytes(header_bytes)
    if header.block_hash != block_hash:
        raise KVBlockError(f"KV block block_hash mismatch: header says {header.block_hash.hex()[:16]}..., "
                           f"sent as {block_hash.hex()[:16]}...")
    where = f" (block {block_hash.hex()[:16]}...)"
    if not isinstance(payload, _BUFFERS):
        if len(payload) != header.payload_size:
            raise KVBlockError(f"KV block payload size mismatch: received {len(payload)} bytes, header says "
                               f"{header.payload_size} (truncated or padded in transit){where}")
        try:
            checksum = payload.checksum()
        except OSError as e:
            raise KVBlockError(f"KV block payload unreadable: {e}{where}") from None
        if checksum != header.checksum:
            raise KVBlockError(f"KV block checksum mismatch: payload xxh3 {checksum:#018x}, "
                               f"header says {header.checksum:#018x}{where}")
    else:
        check_payload(header, payload, where=where)
    return header


class BlockStore:
    """Owns the resident blocks, their LRU order and the leases; nothing else touches them.

    on_evict(hashes) is called after blocks leave the store (evicted for room, or dropped as
    corrupt), outside the lock; its exceptions are logged, never raised to the caller.
    """

    def __init__(
        self,
        capacity_bytes: int,
        default_lease_ttl_s: float = 60.0,
        on_evict: Callable[[list[bytes]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be >= 1, got {capacity_bytes}")
        if not default_lease_ttl_s > 0:
            raise ValueError(f"default_lease_ttl_s must be > 0, got {default_lease_ttl_s}")
        self.capacity_bytes = capacity_bytes
        self.default_lease_ttl_s = default_lease_ttl_s
        self.on_evict = on_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._blocks: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self._leases: dict[str, _Lease] = {}
        self._expiry_heap: list[tuple[float, str]] = []  # (expires_at, lease id); stale rows skipped
        self._used_bytes = 0
        self._pinned_bytes = 0  # bytes of blocks with at least one lease
        self._num_pinned = 0
        self._num_evictions = 0
        self._num_corrupt = 0
        self._bytes_in = 0
        self._bytes_out = 0

    # ------------------------------------------------------------------------------ public API

    def put(self, block_hash: bytes, header_bytes: bytes, payload: Payload,
            lease_id: str | None = None, lease_ttl_s: float | None = None,
            header: BlockHeader | None = None) -> PutResult:
        """Verifies and stores one block, pinned under `lease_id` when given.

        lease_ttl_s None takes the default. Raises KVBlockError (bad block, nothing stored),
        StoreFullError (no room, nothing evicted), ValueError (bad lease arguments).
        """
        header = verify_block(block_hash, header_bytes, payload, header)  # outside the lock
        if lease_ttl_s is None:
            lease_ttl_s = self.default_lease_ttl_s
        if lease_id is not None and (not lease_id or not lease_ttl_s > 0):
            raise ValueError(f"lease needs a non-empty id and lease_ttl_s > 0, got {lease_id!r}, {lease_ttl_s}")
        nbytes = len(header_bytes) + len(payload)
        with self._lock:
            now = self._clock()
            self._expire_leases(now)
            entry = self._blocks.get(block_hash)
            if entry is not None:
                self._blocks.move_to_end(block_hash)
                if lease_id is not None:
                    self._pin(lease_id, block_hash, now + lease_ttl_s)
                return PutResult(stored=False, already_present=True, evicted=[])
            if nbytes > self.capacity_bytes:
                raise StoreFullError(f"block {block_hash.hex()[:16]}... of {nbytes} bytes exceeds the "
                                     f"store's whole capacity of {self.capacity_bytes} bytes")
            evictable = self._used_bytes - self._pinned_bytes
            free = self.capacity_bytes - self._used_bytes
            if free + evictable < nbytes:
                raise StoreFullError(
                    f"no room for block {block_hash.hex()[:16]}... ({nbytes} bytes): {free} bytes free, "
                    f"{self._pinned_bytes} of {self._used_bytes} used bytes pinned by "
                    f"{len(self._leases)} lease(s)")
            evicted = self._evict_for(nbytes)
            self._blocks[block_hash] = _Entry(header_bytes, payload, header.checksum)
            self._used_bytes += nbytes
            self._bytes_in += nbytes
            if lease_id is not None:
                self._pin(lease_id, block_hash, now + lease_ttl_s)
        self._notify_evicted(evicted)
        return PutResult(stored=True, already_present=False, evicted=evicted)

    def get(self, block_hash: bytes, verify: bool = True, lease_id: str | None = None,
            lease_ttl_s: float | None = None) -> "tuple[bytes, Payload] | None":
        """(header bytes, payload) of a resident, intact block, or None. Counts as a use; pinned
        under `lease_id` (for lease_ttl_s, None: the default) when given, before it is returned.

        With verify, a block whose payload no longer matches its checksum is dropped (on_evict is
        told) and reported as missing; without, the caller checks (a same-host reader does).
        """
        if lease_id is not None and (not lease_id or (lease_ttl_s is not None and not lease_ttl_s > 0)):
            raise ValueError(f"lease needs a non-empty id and lease_ttl_s > 0, got {lease_id!r}, {lease_ttl_s}")
        ttl = self.default_lease_ttl_s if lease_ttl_s is None else lease_ttl_s
        with self._lock:
            now = self._clock()
            self._expire_leases(now)
            entry = self._blocks.get(block_hash)
            if entry is not None and not verify:
                return self._use(block_hash, entry, lease_id, now + ttl)
        if entry is None:
            return None
        intact = _checksum(entry.payload) == entry.checksum  # outside the lock: payloads are immutable
        with self._lock:
            if self._blocks.get(block_hash) is not entry:  # evicted or replaced meanwhile
                return None
            if intact:
                return self._use(block_hash, entry, lease_id, self._clock() + ttl)
            self._remove(block_hash)
            self._num_corrupt += 1
        log.error("kv block corrupted in memory, dropped block=%s", block_hash.hex()[:16])
        self._notify_evicted([block_hash])
        return None

    def make_room(self, nbytes: int) -> list[bytes]:
        """Evicts least recently used unpinned blocks, as a put of `nbytes` would, until nbytes fit
        (or nothing unpinned is left). The arena does this before it allocates new shared memory,
        so that slots of blocks a put would evict anyway are reused. Returns their hashes."""
        with self._lock:
            self._expire_leases(self._clock())
            evicted = self._evict_for(nbytes)
        self._notify_evicted(evicted)
        return evicted

    def evict_where(self, wanted: Callable[[Payload], bool], count: int) -> list[bytes]:
        """Evicts up to `count` unpinned blocks whose payload is `wanted`, least recently used first
        (the arena frees slots of one size this way). Returns their hashes; on_evict is told."""
        with self._lock:
            self._expire_leases(self._clock())
            evicted: list[bytes] = []
            for block_hash, entry in self._blocks.items():  # least recently used first
                if len(evicted) >= count:
                    break
                if not entry.leases and wanted(entry.payload):
                    evicted.append(block_hash)
            for block_hash in evicted:
                self._remove(block_hash)
            self._num_evictions += len(evicted)
        self._notify_evicted(evicted)
        return evicted

    def contains(self, hashes: list[bytes]) -> list[bool]:
        """Whether each block is resident (not a use: LRU order is unchanged)."""
        with self._lock:
            self._expire_leases(self._clock())
            return [h in self._blocks for h in hashes]

    def release(self, lease_id: str) -> int:
        """Drops a lease; returns how many resident blocks it held (0 if unknown or expired)."""
        with self._lock:
            self._expire_leases(self._clock())
            return self._release(lease_id)

    def hashes(self) -> list[bytes]:
        """Every resident block hash, least recently used first."""
        with self._lock:
            return list(self._blocks)

    def stats(self) -> StoreStats:
        with self._lock:
            self._expire_leases(self._clock())
            return StoreStats(
                num_blocks=len(self._blocks), used_bytes=self._used_bytes,
                capacity_bytes=self.capacity_bytes, num_leases=len(self._leases),
                num_pinned_blocks=self._num_pinned, num_evictions=self._num_evictions,
                bytes_in=self._bytes_in, bytes_out=self._bytes_out, num_corrupt=self._num_corrupt,
            )

    # ------------------------------------------------------------------ internals (lock held)

    def _use(self, block_hash: bytes, entry: _Entry, lease_id: str | None, expires_at: float):
        self._blocks.move_to_end(block_hash)
        self._bytes_out += entry.nbytes
        if lease_id is not None:
            self._pin(lease_id, block_hash, expires_at)
        return entry.header, entry.payload

    def _pin(self, lease_id: str, block_hash: bytes, expires_at: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            lease = self._leases[lease_id] = _Lease(expires_at)
            heapq.heappush(self._expiry_heap, (expires_at, lease_id))
        elif expires_at > lease.expires_at:  # a later put under the same lease extends it
            lease.expires_at = expires_at
            heapq.heappush(self._expiry_heap, (expires_at, lease_id))
        lease.hashes.add(block_hash)
        entry = self._blocks[block_hash]
        if not entry.leases:
            self._pinned_bytes += entry.nbytes
            self._num_pinned += 1
        entry.leases.add(lease_id)

    def _release(self, lease_id: str) -> int:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return 0
        for block_hash in lease.hashes:
            entry = self._blocks[block_hash]  # a lease only lists resident blocks
            entry.leases.discard(lease_id)
            if not entry.leases:
                self._pinned_bytes -= entry.nbytes
                self._num_pinned -= 1
        return len(lease.hashes)

    def _expire_leases(self, now: float) -> None:
        while self._expiry_heap and self._expiry_heap[0][0] <= now:
            expires_at, lease_id = heapq.heappop(self._expiry_heap)
            lease = self._leases.get(lease_id)
            # A stale row: the lease was released, or extended (a newer row is in the heap).
            if lease is not None and lease.expires_at == expires_at:
                log.info("kv lease expired lease=%s blocks=%d", lease_id, len(lease.hashes))
                self._release(lease_id)

    def _evict_for(self, nbytes: int) -> list[bytes]:
        """Evicts unpinned blocks, least recently used first, until nbytes fit (put() checked that
        they can; make_room() takes what there is). Returns the evicted hashes."""
        need = nbytes - (self.capacity_bytes - self._used_bytes)
        evicted: list[bytes] = []
        for block_hash, entry in self._blocks.items():  # least recently used first
            if need <= 0:
                break
            if not entry.leases:
                evicted.append(block_hash)
                need -= entry.nbytes
        for block_hash in evicted:
            self._remove(block_hash)
        self._num_evictions += len(evicted)
        return evicted

    def _remove(self, block_hash: bytes) -> None:
        entry = self._blocks.pop(block_hash)
        if not isinstance(entry.payload, _BUFFERS):
            entry.payload.discard()
        self._used_bytes -= entry.nbytes
        if entry.leases:  # only a corrupt block is removed while pinned
            self._pinned_bytes -= entry.nbytes
            self._num_pinned -= 1
            for lease_id in entry.leases:
                self._leases[lease_id].hashes.discard(block_hash)

    def _notify_evicted(self, hashes: list[bytes]) -> None:
        if hashes and self.on_evict is not None:
            try:
                self.on_evict(hashes)
            except Exception:  # the store's state is already consistent; never fail the caller
                log.exception("on_evict callback failed blocks=%d", len(hashes))
