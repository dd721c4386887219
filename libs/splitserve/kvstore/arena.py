"""Block storage in the store's shared-memory directory: one arena file per payload size, divided
into fixed-size slots that clients write into and read from directly.

Who owns what:
- ArenaManager (the store process) owns every arena file, which slots have tmpfs pages, the free
  slots and the reservations, under one lock. Nothing else changes a slot's state.
- A stored slot belongs to the BlockStore entry whose payload is its ArenaPayload; the slot goes back
  to the free list when that payload is discarded (evicted, dropped as corrupt, or not stored).
- A client owns the bytes of a slot only between ReserveSlots and the CommitSlots naming it, and
  reads a stored slot only while a lease pins its block (GetSlots pins each block it names).

Slot states: free (in the allocated region, on the free heap), reserved (under one reservation id,
until committed or until the reservation expires), held (an ArenaPayload owns it). Slot i's payload
is the `slot_size` bytes at offset i * stride.

No SIGBUS, no surprise ENOSPC: the arena file is sparse (ftruncate to its largest size) and the
store allocates its tmpfs pages with posix_fallocate, in steps of at most CHUNK_BYTES, before a slot
there is handed out; a full tmpfs is an OSError here, and the client is granted fewer (or no) slots
and streams the rest. Clients write and read slots with pwrite/pread (never through a mapping), so
even a slot whose pages were missing would be an ENOSPC, not a signal. Pages stay allocated once
used (freed slots are reused, lowest first, which keeps the allocated region compact); all arenas
together allocate at most `limit_bytes`.

Reservations expire after `ttl_s`: the slots of a client that died between reserving and committing
come back, and a late commit naming them is refused (its id is unknown). A client stops using a
reservation well before its expiry, so a slot is never written by two clients (see client.py).
"""
from __future__ import annotations

import heapq
import logging
import mmap
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from splitserve.transfer.block import payload_checksum
from splitserve.kvstore import shm

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # tmpfs bytes allocated per growth step of an arena (at most 1/16 of the limit)
SLOT_ALIGN = 64  # slot starts are cache-line aligned; page-multiple payloads stay page aligned
MAX_ARENAS = 8  # distinct payload sizes with an arena; blocks of further sizes stream
_FREE, _RESERVED, _HELD = 0, 1, 2


class SlotError(ValueError):
    """A commit named a slot that is not reserved under its reservation (expired, foreign, reused)."""


class Arena:
    """One arena file and its slot bookkeeping; changed only by ArenaManager under its lock."""

    def __init__(self, directory: str, slot_size: int, max_slots: int):
        self.name = shm.arena_name(slot_size)
        self.slot_size = slot_size  # payload bytes of every block in this arena
        self.stride = -(-slot_size // SLOT_ALIGN) * SLOT_ALIGN  # bytes from one slot's start to the next
        self.max_slots = max_slots
        self.num_allocated = 0  # slots [0, num_allocated) have tmpfs pages (posix_fallocate)
        self.free: list[int] = []  # min-heap of free slots below num_allocated
        self.state = bytearray(max_slots)  # _FREE / _RESERVED / _HELD per slot
        path = os.path.join(directory, self.name)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(self.fd, max_slots * self.stride)  # sparse: no pages yet
            self.view = mmap.mmap(self.fd, max_slots * self.stride, access=mmap.ACCESS_READ)  # checks in place
        except BaseException:
            os.close(self.fd)
            os.unlink(path)
            raise

    def offset(self, slot: int) -> int:
        return slot * self.stride


class ArenaPayload:
    """A stored block's payload: one held slot. Its bytes do not change while the block is stored
    (the store verified them; clients write only reserved slots)."""

    __slots__ = ("manager", "arena", "slot", "size", "_held")

    def __init__(self, manager: "ArenaManager", arena: Arena, slot: int) -> None:
        self.manager = manager
        self.arena = arena
        self.slot = slot
        self.size = arena.slot_size
        self._held = True  # until discard(); guarded by the manager's lock

    def __len__(self) -> int:
        return self.size

    @property
    def offset(self) -> int:
        return self.arena.offset(self.slot)

    def checksum(self) -> int:
        """payload_checksum of the slot's bytes, read in place (no copy)."""
        start = self.offset
        with memoryview(self.arena.view) as whole, whole[start:start + self.size] as view:
            return payload_checksum(view)

    def read(self) -> bytes:
        """A copy of the payload (the gRPC stream path)."""
        start = self.offset
        return self.arena.view[start:start + self.size]

    def discard(self) -> None:
        """Returns the slot to the free list (idempotent)."""
        self.manager._free_held(self)


class Reservation(NamedTuple):
    id: str
    arena: Arena
    slots: list[int]  # granted slots, possibly fewer than asked
    ttl_s: float


@dataclass
class _Reserved:
    arena: Arena
    expires_at: float  # on the manager's clock, seconds
    slots: set[int] = field(default_factory=set)  # not yet committed


class ArenaManager:
    """The store's arenas (one per payload size, made on first use), their free slots and the
    reservations; see the module docstring."""

    def __init__(self, directory: str, limit_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic, chunk_bytes: int = CHUNK_BYTES):
        self.directory = directory
        self.limit_bytes = limit_bytes  # tmpfs bytes all arenas together may allocate
        self.ttl_s = ttl_s
        self.chunk_bytes = min(chunk_bytes, max(1, limit_bytes // 16))  # a small budget grows in smaller steps
        self._clock = clock
        self._lock = threading.Lock()
        self._arenas: dict[int, Arena] = {}  # slot_size -> arena
        self._reservations: dict[str, _Reserved] = {}
        self._allocated_bytes = 0
        self._closed = False

    @property
    def allocated_bytes(self) -> int:
        """tmpfs bytes allocated by all arenas (they stay allocated until the store stops)."""
        return self._allocated_bytes

    def num_free(self, slot_size: int) -> int:
        """Free allocated slots of the arena of `slot_size` (0 when there is none)."""
        with self._lock:
            arena = self._arenas.get(slot_size)
            return len(arena.free) if arena is not None else 0

    def num_reserved(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return sum(len(r.slots) for r in self._reservations.values())

    def reserve(self, slot_size: int, count: int, make_room: Callable[[int], object] | None = None,
                evict_slots: Callable[[Arena, int], object] | None = None) -> Reservation | None:
        """Reserves up to `count` slots for payloads of `slot_size` bytes. Sources, in order: free
        slots; slots freed by make_room(nbytes) (the store evicts the blocks a put of that many bytes
        would evict anyway: reusing their slots beats allocating memory); newly allocated slots; slots
        freed by evict_slots(arena, n) (blocks of this arena evicted when its slots, not the byte
        budget, run short). The callbacks run without the lock held (they discard payloads). None
        when no slot could be had (tmpfs full, limit_bytes reached, too many payload sizes): the
        client streams."""
        if slot_size < 1 or count < 1:
            raise ValueError(f"slot_size and count must be >= 1, got {slot_size}, {count}")
        with self._lock:
            arena = self._arena(slot_size)
            if arena is None:
                return None
            slots = self._take_free(arena, count, grow=False)
        if len(slots) < count and make_room is not None:
            make_room((count - len(slots)) * slot_size)
            with self._lock:
                slots += self._take_free(arena, count - len(slots), grow=False)
        with self._lock:
            slots += self._take_free(arena, count - len(slots), grow=True)
        if len(slots) < count and evict_slots is not None:
            evict_slots(arena, count - len(slots))
            with self._lock:
                slots += self._take_free(arena, count - len(slots), grow=False)
        if not slots:
            return None
        with self._lock:
            if self._closed:
                return None
            rid = secrets.token_hex(8)
            self._reservations[rid] = _Reserved(arena, self._clock() + self.ttl_s, set(slots))
        return Reservation(rid, arena, slots, self.ttl_s)

    def take(self, reservation_id: str, slot: int) -> ArenaPayload:
        """The payload of a reserved slot, now held by the caller (who stores or discards it);
        SlotError when the slot is not reserved under this (unexpired) reservation."""
        with self._lock:
            self._expire(self._clock())
            res = self._reservations.get(reservation_id)
            if res is None:
                raise SlotError(f"reservation {reservation_id[:16]!r} is unknown or expired (reserved slots "
                                f"are taken back after {self.ttl_s:g} s)")
            if slot not in res.slots:
                raise SlotError(f"slot {slot} is not reserved under reservation {reservation_id[:16]!r}")
            res.slots.discard(slot)
            if not res.slots:
                del self._reservations[reservation_id]
            res.arena.state[slot] = _HELD
            return ArenaPayload(self, res.arena, slot)

    def cancel(self, reservation_id: str, slots: list[int]) -> int:
        """Frees those of `slots` still reserved under the reservation (a commit that stopped part-way);
        returns how many."""
        with self._lock:
            res = self._reservations.get(reservation_id)
            if res is None:
                return 0
            mine = [s for s in set(slots) if s in res.slots]
            res.slots.difference_update(mine)
            for slot in mine:
                self._release(res.arena, slot)
            if not res.slots:
                del self._reservations[reservation_id]
            return len(mine)

    def expire(self) -> int:
        """Frees the slots of expired reservations now (also done by every reserve/take); returns how many."""
        with self._lock:
            return self._expire(self._clock())

    def close(self) -> None:
        """Closes the files (the store's directory, removed after, takes them away)."""
        with self._lock:
            self._closed = True
            for arena in self._arenas.values():
                try:
                    arena.view.close()
                except BufferError:  # a checksum still running on a gRPC thread: the mapping goes with the process
                    log.warning("arena %s still in use while closing", arena.name)
                os.close(arena.fd)
            self._arenas.clear()
            self._reservations.clear()

    # ------------------------------------------------------------------ internals (lock held)

    def _arena(self, slot_size: int) -> Arena | None:
        arena = self._arenas.get(slot_size)
        if arena is not None or self._closed:
            return arena
        stride = -(-slot_size // SLOT_ALIGN) * SLOT_ALIGN
        max_slots = self.limit_bytes // stride
        if max_slots < 1 or len(self._arenas) >= MAX_ARENAS:
            return None
        try:
            arena = self._arenas[slot_size] = Arena(self.directory, slot_size, max_slots)
        except OSError as e:
            log.warning("cannot create the arena of %d-byte slots (clients stream instead): %s", slot_size, e)
            return None
        return arena

    def _take_free(self, arena: Arena, count: int, grow: bool) -> list[int]:
        slots: list[int] = []
        if self._closed:
            return slots
        self._expire(self._clock())
        while len(slots) < count:
            if not arena.free and not (grow and self._grow(arena)):
                break
            slot = heapq.heappop(arena.free)
            arena.state[slot] = _RESERVED
            slots.append(slot)
        return slots

    def _grow(self, arena: Arena) -> bool:
        """Allocates tmpfs pages for the next chunk of slots; False when none can be had."""
        room = min(arena.max_slots - arena.num_allocated,
                   (self.limit_bytes - self._allocated_bytes) // arena.stride)
        n = min(room, max(1, self.chunk_bytes // arena.stride))
        if n < 1:
            return False
        start = arena.offset(arena.num_allocated)
        try:
            os.posix_fallocate(arena.fd, start, n * arena.stride)
        except OSError as e:  # ENOSPC: tmpfs is full; clients stream until slots free up
            log.warning("cannot allocate %d bytes of shared memory for arena %s: %s", n * arena.stride,
                        arena.name, e)
            return False
        for slot in range(arena.num_allocated, arena.num_allocated + n):
            heapq.heappush(arena.free, slot)
        arena.num_allocated += n
        self._allocated_bytes += n * arena.stride
        return True

    def _expire(self, now: float) -> int:
        expired = [rid for rid, res in self._reservations.items() if res.expires_at <= now]
        freed = 0
        for rid in expired:
            res = self._reservations.pop(rid)
            for slot in res.slots:
                self._release(res.arena, slot)
            freed += len(res.slots)
        if freed:
            log.warning("took back %d arena slot(s) of %d reservation(s) never committed", freed, len(expired))
        return freed

    def _release(self, arena: Arena, slot: int) -> None:
        if arena.state[slot] == _FREE:  # never twice on the free heap
            log.error("arena %s: slot %d freed twice", arena.name, slot)
            return
        arena.state[slot] = _FREE
        heapq.heappush(arena.free, slot)

    def _free_held(self, payload: ArenaPayload) -> None:
        with self._lock:
            if not payload._held:
                return
            payload._held = False
            if self._arenas.get(payload.arena.slot_size) is payload.arena:  # not closed meanwhile
                self._release(payload.arena, payload.slot)
