"""Client of the kvstore role: put and get of whole KV blocks, through the store's shared-memory
arenas when it runs on this host (splitserve.kvstore.arena), through chunked gRPC streams otherwise."""
from __future__ import annotations

import collections
import io
import logging
import os
import secrets
import threading
import time
from typing import Callable, Iterable

import grpc

from splitserve import tracing
from splitserve.transfer.block import BlockHeader, KVBlockError, PagePayload, payload_checksum
from splitserve.kvstore import shm
from splitserve.kvstore.protocol import CHUNK_BYTES, block_chunks, reassemble_get
from splitserve.rpc import DEFAULT_MAX_MESSAGE_BYTES, channel
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

SHM_BATCH_BLOCKS = 32  # blocks per CommitSlots call: writing one batch overlaps the store checking the last
MAX_RESERVE_BLOCKS = 1024  # slots asked for per ReserveSlots call
RECEIVE_BUFFER_BYTES = 8 << 20  # most bytes of get buffers a client keeps for reuse (beyond, the heap's freed memory)
IOV_MAX = 1024  # buffers one pwritev takes (Linux's limit)
log = logging.getLogger(__name__)


def _add_counts(total: kvstore_pb2.PutResponse, part: kvstore_pb2.PutResponse) -> None:
    total.num_stored += part.num_stored
    total.num_already_present += part.num_already_present
    total.num_bytes += part.num_bytes


class KVStoreClient:
    """put/get of whole blocks. With use_shm (the default) the client asks the store for its
    shared-memory directory once; when it can read the store's probe token there (same host, same
    user) payloads travel through arena slots (ReserveSlots/CommitSlots/GetSlots), otherwise through
    the gRPC streams. Payloads are written and read with pwrite/pread on the arena files, never
    through a mapping: a shared-memory fault is an OSError here, never a SIGBUS, and the copies run
    without the GIL (a store in the same process checks one batch while the next is written)."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 chunk_bytes: int = CHUNK_BYTES, timeout_s: float = 30.0, use_shm: bool = True,
                 credentials: grpc.ChannelCredentials | None = None,
                 receive_buffer_bytes: int = RECEIVE_BUFFER_BYTES) -> None:
        self.address = address
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.use_shm = use_shm
        self._shm_dir: str | None = None  # the store's directory once probed and readable
        self._probed = False
        # arena path -> the open file. Never closed while a call may use it: dropped from here, it
        # closes when the last call holding it is done (a closed fd's number could name another file).
        self._arenas: dict[str, io.FileIO] = {}
        self._buffers = _ReceiveBuffers(receive_buffer_bytes)
        self._lock = threading.Lock()
        self._channel = channel(address, max_message_bytes, credentials=credentials)
        self._stub = kvstore_pb2_grpc.KVStoreStub(tracing.intercept(self._channel))  # calls carry the trace

    @property
    def transport(self) -> str:
        """"shm" or "grpc": the path the next put/get takes (probes the store on first use)."""
        return "shm" if self._shm() else "grpc"

    def _shm(self) -> str | None:
        if not self.use_shm:
            return None
        with self._lock:
            if self._probed and self._shm_dir is not None and \
                    not os.path.exists(os.path.join(self._shm_dir, shm.PROBE_NAME)):
                # The store restarted (a new process has a new directory): ask it again.
                log.info("kvstore %s: its shared-memory directory is gone, asking the store again", self.address)
                self._forget()
            if not self._probed:
                self._shm_dir = self._probe()
                self._probed = True
            return self._shm_dir

    def _probe(self) -> str | None:
        try:
            info = self._stub.Info(kvstore_pb2.InfoRequest(), timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older store: streams only
                return None
            raise
        if not info.shm_dir or not info.shm_token:
            return None
        try:
            with open(os.path.join(info.shm_dir, shm.PROBE_NAME), "rb") as f:
                if secrets.compare_digest(f.read(64), info.shm_token):
                    log.info("kvstore %s: same host, payloads go through %s", self.address, info.shm_dir)
                    return info.shm_dir
        except OSError:
            pass
        return None  # another host or container: the directory is not ours to see

    def _forget(self) -> None:
        """Drops the probed directory and its open arenas (lock held)."""
        self._shm_dir, self._probed = None, False
        self._arenas = {}

    def _disable_shm(self, why: object) -> None:
        """This call streams; the next one asks the store for its directory again (it may have
        restarted, or shared memory was short for a moment)."""
        log.warning("kvstore %s: shared-memory path failed, streaming this call: %s", self.address, why)
        with self._lock:
            self._forget()

    def _arena_file(self, directory: str, name: str) -> io.FileIO:
        """The open arena file `name` of the store's directory; ShmNameError, OSError."""
        path = os.path.join(directory, shm.check_arena_name(name))
        with self._lock:
            arena = self._arenas.get(path)
            if arena is None:
                arena = self._arenas[path] = io.FileIO(path, "r+")
            return arena

    def contains(self, hashes: list[bytes]) -> list[bool]:
        if not hashes:
            return []
        resp = self._stub.Contains(kvstore_pb2.ContainsRequest(block_hashes=hashes), timeout=self.timeout_s)
        return list(resp.present)

    def contains_future(self, hashes: list[bytes]) -> "grpc.Future":
        """`contains` without waiting: a grpc.Future of the ContainsResponse (its `present` flags)."""
        return self._stub.Contains.future(kvstore_pb2.ContainsRequest(block_hashes=hashes), timeout=self.timeout_s)

    def put(self, blocks: Iterable[tuple[BlockHeader, bytes | PagePayload]], lease_id: str = "",
            lease_ttl_s: float = 0.0) -> kvstore_pb2.PutResponse:
        """Stores the blocks, each pinned under `lease_id` for at most lease_ttl_s. A payload is
        bytes-like or a PagePayload (a pinned page's slices, written straight into the slot). RpcError
        from the store (a refused block: INVALID_ARGUMENT; no room: RESOURCE_EXHAUSTED) propagates."""
        blocks = list(blocks)
        done = kvstore_pb2.PutResponse()
        directory = self._shm()
        if directory is not None and blocks:
            blocks = self._put_slots(directory, blocks, lease_id, lease_ttl_s, done)
        if not blocks:
            return done

        def chunks():  # a PagePayload is joined here, one block at a time
            for header, payload in blocks:
                data = payload.tobytes() if isinstance(payload, PagePayload) else payload
                yield from block_chunks(header.block_hash, header.to_bytes(), data, self.chunk_bytes,
                                        lease_id, lease_ttl_s)
        _add_counts(done, self._stub.Put(chunks(), timeout=self.timeout_s))
        return done

    def _put_slots(self, directory: str, blocks: list, lease_id: str, lease_ttl_s: float,
                   done: kvstore_pb2.PutResponse) -> list:
        """Puts blocks through arena slots, each run of equal payload size under its own reservations.
        Returns the blocks left for the stream: those the store had no slots for, or all from the
        point where the shared-memory path failed."""
        left: list = []
        start = 0
        while start < len(blocks):
            size = len(blocks[start][1])
            end = start
            while end < len(blocks) and len(blocks[end][1]) == size:
                end += 1
            run = blocks[start:end]
            while run:
                n, failure = self._put_reserved(directory, run[:MAX_RESERVE_BLOCKS], lease_id, lease_ttl_s, done)
                run = run[n:]
                if failure is not None:  # the arena went away (store restarted) or a write failed
                    self._disable_shm(failure)
                    return left + run + blocks[end:]
                if n == 0:  # no slots to be had: the rest of this size streams
                    left += run
                    break
            start = end
        return left

    def _put_reserved(self, directory: str, blocks: list, lease_id: str, lease_ttl_s: float,
                      done: kvstore_pb2.PutResponse) -> tuple[int, Exception | None]:
        """Reserves slots for `blocks` (one payload size), then writes and commits them
        SHM_BATCH_BLOCKS per CommitSlots call, writing the next batch while the store checks the
        last (two processes, both busy). Returns how many leading blocks were put (fewer than
        asked when fewer slots were granted, or the reservation got close to its expiry) and the
        error that stopped the shared-memory path, if any. RpcError from the store propagates."""
        size = len(blocks[0][1])
        try:
            res = self._stub.ReserveSlots(kvstore_pb2.ReserveSlotsRequest(payload_size=size, num_slots=len(blocks)),
                                          timeout=self.timeout_s)
        except grpc.RpcError as e:  # a store restarted without shared memory, or an older one
            if e.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                raise
            return 0, e
        if not res.slots:
            return 0, None
        # Stop at half the store's deadline: a slot it took back may be reserved to someone else.
        use_by = time.monotonic() + res.ttl_s / 2
        granted = list(zip(blocks, res.slots))
        inflight: list = []  # [(CommitSlots future, number of blocks)]: at most two, oldest first
        put, failure = 0, None
        try:
            try:
                arena = self._arena_file(directory, res.arena)
                for first in range(0, len(granted), SHM_BATCH_BLOCKS):
                    if time.monotonic() > use_by:
                        log.warning("kvstore %s: slot reservation nearly expired, streaming the rest", self.address)
                        break
                    batch = granted[first:first + SHM_BATCH_BLOCKS]
                    for (_, payload), slot in batch:
                        _pwrite_all(arena.fileno(), payload, slot * res.slot_stride)
                    inflight.append((self._stub.CommitSlots.future(kvstore_pb2.CommitSlotsRequest(
                        reservation_id=res.reservation_id, lease_id=lease_id, lease_ttl_s=lease_ttl_s,
                        blocks=[kvstore_pb2.SlotBlock(block_hash=h.block_hash, header=h.to_bytes(), slot=slot)
                                for (h, _), slot in batch]), timeout=self.timeout_s), len(batch)))
                    if len(inflight) == 2:  # the store checks this batch while we write the next
                        _add_counts(done, inflight[0][0].result())
                        put += inflight.pop(0)[1]
            except (OSError, shm.ShmNameError) as e:
                failure = e
            while inflight:
                _add_counts(done, inflight[0][0].result())
                put += inflight.pop(0)[1]
        finally:
            for call, _ in inflight:
                call.cancel()
        return put, failure

    def get(self, hashes: list[bytes], release_lease_id: str = "",
            into: Callable[[int, BlockHeader], list[memoryview] | None] | None = None
            ) -> list[tuple[BlockHeader, bytes | PagePayload]]:
        """The leading blocks of `hashes` the store has, in order; stops at the first missing one
        (a block whose bytes fail their checksum counts as missing). A payload is bytes (streams) or
        a read-only memoryview of a receive buffer (same host) that is reused once every view of it
        is gone; or, same host, where `into(i, header)` gives writable slices of exactly the payload's
        size for block i (its page: splitserve.transfer.pages.PageImport), the payload is read
        straight into them and is a PagePayload of those slices. KVBlockError when what arrived is
        malformed (the caller recomputes)."""
        if not hashes:
            return []
        request = kvstore_pb2.GetRequest(block_hashes=hashes, release_lease_id=release_lease_id)
        directory = self._shm()
        if directory is None:
            return self._get_stream(request, hashes)
        try:
            reply = self._stub.GetSlots(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            self._disable_shm(e.details())  # a store restarted without shared memory
            return self._get_stream(request, hashes)
        try:
            out, intact = self._read_slots(directory, reply, hashes, into)
        except OSError as e:  # the store's directory went away under us
            self._disable_shm(e)
            out, intact = [], True
            if not reply.rest_by_stream:  # the store dropped the lease already: what it still has
                return self._get_stream(kvstore_pb2.GetRequest(block_hashes=hashes), hashes)
        if not reply.rest_by_stream:
            return out
        if not intact:  # stopped at a damaged block: the lease the store kept for Get goes now
            if release_lease_id:
                self.release(release_lease_id)
            return out
        rest = hashes[len(out):]
        return out + self._get_stream(kvstore_pb2.GetRequest(block_hashes=rest, release_lease_id=release_lease_id),
                                      rest)

    def _read_slots(self, directory: str, reply, hashes: list[bytes], into=None) -> tuple[list, bool]:
        """Copies each block out of its slot and checks it against its header, then drops the read
        lease. Returns (the leading intact blocks, False when one failed its checksum)."""
        out: list[tuple[BlockHeader, bytes]] = []
        try:
            for i, block in enumerate(reply.blocks):
                header = BlockHeader.from_bytes(block.header)
                if i >= len(hashes) or block.block_hash != hashes[i] or header.block_hash != block.block_hash:
                    raise KVBlockError("kvstore reply: blocks arrived out of order or under the wrong hash")
                try:
                    arena = self._arena_file(directory, block.arena)
                except shm.ShmNameError as e:
                    raise KVBlockError(f"kvstore reply: {e}") from None
                dest = into(i, header) if into is not None else None
                if dest is not None and sum(part.nbytes for part in dest) == header.payload_size:
                    payload = PagePayload(dest)
                    got = _preadv_all(arena.fileno(), dest, block.offset)
                else:
                    buf = self._buffers.take(header.payload_size)
                    got = os.preadv(arena.fileno(), [buf], block.offset)
                    payload = buf.toreadonly()
                if got != header.payload_size or payload_checksum(payload) != header.checksum:
                    log.warning("kvstore %s: block %s failed its checksum in shared memory (treated as "
                                "missing)", self.address, block.block_hash.hex()[:16])
                    return out, False
                out.append((header, payload))
            return out, True
        finally:
            if reply.read_lease_id:
                self.release(reply.read_lease_id)

    def _get_stream(self, request, hashes: list[bytes]) -> list[tuple[BlockHeader, bytes]]:
        stream = self._stub.Get(request, timeout=self.timeout_s)
        try:
            return reassemble_get(stream, hashes)
        finally:
            stream.cancel()  # no-op when complete; stops the server at once when we broke off

    def release(self, lease_id: str) -> int:
        return self._stub.Release(kvstore_pb2.ReleaseRequest(lease_id=lease_id), timeout=self.timeout_s).num_released

    def close(self) -> None:
        with self._lock:
            self._forget()
        self._channel.close()


class _ReceiveBuffers:
    """Buffers that same-host gets copy payloads into, reused once the caller dropped every view
    of them: on small VMs the first touch of fresh memory costs more than the copy (about 1 GB/s
    against 4), so a decode worker that imports and drops what it fetched reads the next request's
    blocks at memcpy speed. Keeps at most limit_bytes; beyond that, buffers are fresh and not kept."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._pool: collections.deque[bytearray] = collections.deque()  # handed out oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        """A writable view of a `size`-byte buffer no one else holds (the view, made under the lock,
        keeps it taken: no other thread can be handed it)."""
        with self._lock:
            if self._pool and len(self._pool[0]) == size and _unused(self._pool[0]):
                buf = self._pool.popleft()
                self._pool.append(buf)
                return memoryview(buf)
            buf = bytearray(size)
            if self._bytes + size <= self.limit_bytes:
                self._pool.append(buf)
                self._bytes += size
            elif self._pool and _unused(self._pool[0]):  # full: the oldest, if free, makes way
                self._bytes -= len(self._pool.popleft())
            return memoryview(buf)


def _unused(buf: bytearray) -> bool:
    """Whether no view of `buf` is alive: a bytearray with exported buffers refuses to shrink
    (pop raises BufferError); otherwise it shrinks by one byte and append restores it in place."""
    try:
        last = buf.pop()
    except BufferError:
        return False
    buf.append(last)
    return True


def _vectored(call, fd: int, parts: list, offset: int) -> int:
    """Runs os.preadv or os.pwritev over `parts` from `offset` until all are done (a short call is
    continued where it stopped) or a call moves nothing; returns the bytes moved."""
    left = [memoryview(part) for part in parts]
    total = 0
    while left:
        moved = call(fd, left[:IOV_MAX], offset + total)
        if moved <= 0:
            break
        total += moved
        while left and moved >= left[0].nbytes:
            moved -= left[0].nbytes
            left.pop(0)
        if moved:
            left[0] = left[0][moved:]
    return total


def _preadv_all(fd: int, parts: list[memoryview], offset: int) -> int:
    """Reads into `parts`, in order, from `offset` (up to the end of the file); the bytes read."""
    return _vectored(os.preadv, fd, parts, offset)


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Writes all of `data` (bytes-like, or a PagePayload's slices in one vectored write) at
    `offset` (one write on tmpfs; a short one is finished here)."""
    if isinstance(data, PagePayload):
        if _vectored(os.pwritev, fd, data.parts, offset) != data.nbytes:
            raise OSError(f"pwritev wrote less than {data.nbytes} bytes at offset {offset}")
        return
    view = memoryview(data)
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)
