"""What the kvstore does for each call, over a BlockStore: Put and Get as chunk streams
(splitserve.kvstore.protocol), the same-host slot path (ReserveSlots/CommitSlots/GetSlots through
splitserve.kvstore.arena), leases, ownership reports and the transfer metrics. It takes and returns
Python values and protocol chunks; the gRPC shell (services/kvstore/server.py) turns `Reject` into
a status code and results into response messages.

Put stores each block when its last chunk arrives and verifies (header, hash, size, xxh3 checksum);
a block is never stored in part. A malformed stream is refused with INVALID_ARGUMENT naming the
problem; blocks completed earlier in the same stream stay stored (puts are idempotent: a retry
reports them as already present). No room (everything else pinned) is RESOURCE_EXHAUSTED.

Metrics: per successful Put/CommitSlots (direction "put") and Get/GetSlots (direction "get") call,
kv_transfer_bytes += the block payload bytes moved (headers not counted; on put also blocks the
store already had, they crossed the wire too) and one kv_transfer_seconds observation (the call's
duration); kv_transfer_failures{direction} per call refused or failed. A Get the client cancels
counts as a transfer of what was sent.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from splitserve.kvstore.arena import Arena, ArenaManager, ArenaPayload, SlotError
from splitserve.kvstore.block_store import BlockStore, StoreFullError, StoreStats
from splitserve.kvstore.protocol import (ChunkError, OpenBlock, block_chunks, missing_chunk, reassemble_put,
                                         short_hash)
from splitserve.metrics import Metrics
from splitserve.ownership.registry import OwnershipReporter
from splitserve.transfer.block import BlockHeader, KVBlockError

log = logging.getLogger("splitserve.kvstore")

MAX_RESERVE_SLOTS = 4096  # slots one ReserveSlots call may grant


class Reject(Exception):
    """A call the store refuses; `code` is the gRPC status it answers with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class ClientGone(Exception):
    """A Put whose client cancelled mid-stream: counted as a failed transfer, answered with an
    empty response nobody reads."""


@dataclass
class PutCounts:
    """What one Put or CommitSlots call did."""

    num_stored: int = 0  # blocks new to the store
    num_already_present: int = 0  # blocks it held already
    num_bytes: int = 0  # header + payload bytes of both kinds
    payload_bytes: int = 0  # payload bytes of both kinds (the transfer metric)


class SlotGrant(NamedTuple):
    """Arena slots reserved for one payload size (ReserveSlots)."""

    reservation_id: str
    arena: str  # file name in the store's shared-memory directory
    slot_stride: int  # bytes between slots: slot i starts at i * slot_stride
    slots: list[int]
    ttl_s: float  # seconds before unused slots go back


class SlotBlock(NamedTuple):
    """Where a held block's payload lies in shared memory (GetSlots)."""

    block_hash: bytes
    header: bytes
    arena: str
    offset: int  # bytes into the arena file


class SlotsAnswer(NamedTuple):
    """GetSlots: the leading blocks that lie in arenas, under `read_lease_id` while the client
    copies; `rest_by_stream` when the next block arrived through Put (in this process's memory)."""

    blocks: list[SlotBlock]
    read_lease_id: str
    rest_by_stream: bool


def _read_lease_id() -> str:
    """A lease that pins blocks while a get hands them out."""
    return "read-" + secrets.token_hex(8)


def _no_empty_hash(hashes: Iterable[bytes]) -> None:
    if any(not h for h in hashes):
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, "block_hashes contains an empty hash")


class KVStoreService:
    """The kvstore's calls over one BlockStore (and its arenas when same-host clients may use them)."""

    def __init__(self, config, store: BlockStore, reporter: OwnershipReporter | None,
                 metrics: Metrics, arenas: ArenaManager | None = None):
        self.config = config  # KVStoreConfig
        self.store = store
        self.reporter = reporter
        self.arenas = arenas  # None: streams only
        self.metrics = metrics
        self.draining = False  # SIGTERM came: no new puts; reads go on while leases last

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise Reject(grpc.StatusCode.UNAVAILABLE, "kvstore draining (shutting down): it takes no new blocks; "
                                                      "blocks already stored can still be read")

    def _metered(self, direction: str, handler: Callable, *args):
        """Runs a transfer handler returning (result, payload bytes) and records the call: bytes
        and duration when it succeeds, a failure when it raises."""
        t0 = time.monotonic()
        try:
            result, nbytes = handler(*args)
        except BaseException:
            self.metrics.kv_transfer_failed(direction)
            raise
        self.metrics.kv_transfer(direction, nbytes, time.monotonic() - t0)
        return result

    def _record(self, held: list[bytes]) -> None:
        if self.reporter is not None:
            self.reporter.record(held)

    # ------------------------------------------------------------------ streams
    def put(self, chunks: Iterable, is_active: Callable[[], bool]) -> PutCounts:
        """Stores the blocks of a Put stream. Reject, or ClientGone when the client went away."""
        self._refuse_if_draining()
        return self._metered("put", self._put, chunks, is_active)

    def _put(self, chunks: Iterable, is_active: Callable[[], bool]) -> tuple[PutCounts, int]:
        held: list[bytes] = []  # stored or already present in this stream: recorded as owned
        counts = PutCounts()
        try:
            for block, payload in reassemble_put(chunks, self._open_block):
                self._store_block(block, payload, held, counts)
        except grpc.RpcError:  # the client cancelled or went away mid-stream
            if is_active():
                raise
            raise ClientGone() from None
        except ChunkError as e:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        finally:
            self._record(held)
        return counts, counts.payload_bytes

    def _open_block(self, chunk) -> OpenBlock:
        header = self._parse_header(chunk.block_hash, chunk.header)
        lease_id, ttl = self._lease(chunk.lease_id, chunk.lease_ttl_s)
        return OpenBlock(chunk.block_hash, chunk.header, header, lease_id, ttl)

    def _store_block(self, block: OpenBlock, payload, held: list[bytes], counts: PutCounts) -> bool:
        """Puts one whole block; True when it is new to the store."""
        try:
            result = self.store.put(block.block_hash, block.header_bytes, payload, block.lease_id,
                                    block.lease_ttl_s, block.header)
        except KVBlockError as e:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"block {short_hash(block.block_hash)}: {e}") from None
        except StoreFullError as e:
            raise Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        held.append(block.block_hash)
        if result.stored:
            counts.num_stored += 1
        else:
            counts.num_already_present += 1
        counts.num_bytes += len(block.header_bytes) + len(payload)
        counts.payload_bytes += len(payload)
        return result.stored

    def _parse_header(self, block_hash: bytes, header_bytes: bytes) -> BlockHeader:
        if not block_hash:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, "header chunk without block_hash")
        try:
            header = BlockHeader.from_bytes(header_bytes)
        except KVBlockError as e:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"block {short_hash(block_hash)}: {e}") from None
        if header.block_hash != block_hash:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"block {short_hash(block_hash)}: header's block_hash is {short_hash(header.block_hash)}")
        if len(header_bytes) + header.payload_size > self.store.capacity_bytes:
            raise Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"block {short_hash(block_hash)} of {header.payload_size} payload bytes exceeds "
                         f"the store's capacity of {self.store.capacity_bytes} bytes")
        return header

    def _lease(self, lease_id: str, lease_ttl_s: float) -> tuple[str | None, float | None]:
        """(lease id or None, ttl or None for the default), with the ttl cut to max_lease_ttl_s."""
        lease, ttl = lease_id or None, None
        if lease is not None and lease_ttl_s != 0:
            if not lease_ttl_s > 0 or math.isinf(lease_ttl_s):
                raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                             f"lease_ttl_s must be a positive number of seconds, got {lease_ttl_s}")
            ttl = min(float(lease_ttl_s), self.config.max_lease_ttl_s)
        return lease, ttl

    def get(self, hashes: list[bytes], release_lease_id: str, is_active: Callable[[], bool]) -> Iterator:
        """The BlockChunks answering a Get: each held block whole, a missing=true chunk for each
        one not held. `release_lease_id` is released when the stream ends, however it ends."""
        t0 = time.monotonic()
        try:
            _no_empty_hash(hashes)
        except Reject:
            self.metrics.kv_transfer_failed("get")
            raise
        sent, failed = 0, False  # payload bytes of the blocks streamed out whole
        try:
            for block_hash in hashes:
                if not is_active():
                    return
                block = self._copy_out(block_hash)
                if block is None:
                    yield missing_chunk(block_hash)
                    continue
                header, payload = block
                yield from block_chunks(block_hash, header, payload, self.config.chunk_bytes)
                sent += len(payload)
        except Exception:
            failed = True
            raise
        finally:
            # Also on cancellation: the reader gave up on these blocks, they need no pin anymore.
            if release_lease_id:
                self.store.release(release_lease_id)
            if failed:
                self.metrics.kv_transfer_failed("get")
            else:  # complete, or cut short by the client (GeneratorExit): what it was sent
                self.metrics.kv_transfer("get", sent, time.monotonic() - t0)

    def _copy_out(self, block_hash: bytes) -> tuple[bytes, bytes] | None:
        """(header, payload bytes) of a held block, or None; an arena slot is copied while a lease
        pins its block (so the slot is not reused meanwhile)."""
        lease = _read_lease_id()
        block = self.store.get(block_hash, lease_id=lease, lease_ttl_s=self.config.shm_slot_ttl_s)
        if block is None:
            return None
        try:
            header, payload = block
            return header, payload.read() if isinstance(payload, ArenaPayload) else payload
        finally:
            self.store.release(lease)

    # ------------------------------------------------------------------ shared-memory slots
    def _need_arenas(self) -> ArenaManager:
        if self.arenas is None:
            raise Reject(grpc.StatusCode.FAILED_PRECONDITION,
                         "this kvstore has no shared-memory directory (use Put/Get streams)")
        return self.arenas

    def reserve_slots(self, payload_size: int, num_slots: int) -> SlotGrant | None:
        """Slots for `num_slots` payloads of `payload_size` bytes (maybe fewer), or None when none
        can be had (Put then says why). A commit of slots reserved before a drain still stores."""
        self._refuse_if_draining()
        arenas = self._need_arenas()
        if payload_size < 1 or num_slots < 1:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"payload_size and num_slots must be >= 1, got {payload_size} and {num_slots}")
        if payload_size > self.store.capacity_bytes:
            return None
        res = arenas.reserve(payload_size, min(num_slots, MAX_RESERVE_SLOTS),
                             make_room=self.store.make_room, evict_slots=self._evict_slots)
        if res is None:
            return None
        return SlotGrant(res.id, res.arena.name, res.arena.stride, list(res.slots), res.ttl_s)

    def _evict_slots(self, arena: Arena, count: int) -> None:
        """Frees up to `count` slots of `arena` by evicting its least recently used unpinned blocks."""
        evicted = self.store.evict_where(lambda p: isinstance(p, ArenaPayload) and p.arena is arena, count)
        if evicted:
            log.info("evicted %d block(s) for slots of %s", len(evicted), arena.name)

    def commit_slots(self, reservation_id: str, lease_id: str, lease_ttl_s: float, blocks: list) -> PutCounts:
        """Stores the blocks written into reserved slots (`blocks`: block_hash, header, slot each)."""
        return self._metered("put", self._commit_slots, reservation_id, lease_id, lease_ttl_s, blocks)

    def _commit_slots(self, reservation_id: str, lease_id: str, lease_ttl_s: float,
                      blocks: list) -> tuple[PutCounts, int]:
        arenas = self._need_arenas()
        held: list[bytes] = []
        counts = PutCounts()
        try:
            lease, ttl = self._lease(lease_id, lease_ttl_s)
            for i, block in enumerate(blocks):
                try:
                    self._commit_block(arenas, reservation_id, block, lease, ttl, held, counts)
                except Reject as e:
                    raise Reject(e.code, f"blocks[{i}]: {e}") from None
        finally:
            # Slots of this call not reached (after an error) go back at once.
            arenas.cancel(reservation_id, [b.slot for b in blocks])
            self._record(held)
        return counts, counts.payload_bytes

    def _commit_block(self, arenas: ArenaManager, reservation_id: str, block, lease_id: str | None,
                      ttl: float | None, held: list[bytes], counts: PutCounts) -> None:
        try:
            payload = arenas.take(reservation_id, block.slot)  # the slot is ours to store or free
        except SlotError as e:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"block {short_hash(block.block_hash)}: {e}") from None
        stored = False
        try:
            header = self._parse_header(block.block_hash, block.header)
            if header.payload_size != len(payload):
                raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                             f"block {short_hash(block.block_hash)}: the header's payload_size is "
                             f"{header.payload_size}, the reservation's slots hold {len(payload)} bytes")
            # Checked in place (never copied); the slot is the block's storage from now on.
            opened = OpenBlock(block.block_hash, block.header, header, lease_id, ttl)
            stored = self._store_block(opened, payload, held, counts)
        finally:
            if not stored:  # already present, refused or damaged: the store did not take it
                payload.discard()

    def get_slots(self, hashes: list[bytes], release_lease_id: str) -> SlotsAnswer:
        return self._metered("get", self._get_slots, hashes, release_lease_id)

    def _get_slots(self, hashes: list[bytes], release_lease_id: str) -> tuple[SlotsAnswer, int]:
        _no_empty_hash(hashes)
        self._need_arenas()
        read_lease = _read_lease_id()
        blocks, nbytes, rest = [], 0, False
        for block_hash in hashes:
            # The client checks the checksum as it copies (no read here); the lease keeps the slot.
            block = self.store.get(block_hash, verify=False, lease_id=read_lease,
                                   lease_ttl_s=self.config.shm_slot_ttl_s)
            if block is None:
                break
            header, payload = block
            if not isinstance(payload, ArenaPayload):  # arrived through Put: in this process's memory
                rest = True
                break
            blocks.append(SlotBlock(block_hash, header, payload.arena.name, payload.offset))
            nbytes += len(payload)
        if not blocks:
            self.store.release(read_lease)
        if release_lease_id and not rest:
            self.store.release(release_lease_id)
        return SlotsAnswer(blocks, read_lease if blocks else "", rest), nbytes

    # ------------------------------------------------------------------ bookkeeping
    def contains(self, hashes: list[bytes]) -> list[bool]:
        return self.store.contains(hashes)

    def release(self, lease_id: str) -> int:
        if not lease_id:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, "lease_id is empty")
        return self.store.release(lease_id)

    def stats(self) -> StoreStats:
        return self.store.stats()
