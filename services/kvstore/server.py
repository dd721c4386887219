"""The kvstore role: the gRPC KVStore service over a BlockStore, and its entry point.

    splitserve kvstore --port 50070 --capacity-gb 2 --redis-url redis://127.0.0.1:6379/0

Wire form (protos/splitserve/v1/kvstore.proto): a block travels as BlockChunks; its first chunk
carries block_hash, header (and, on Put, lease_id/lease_ttl_s), later chunks carry slices of the
payload, the chunk with last=true ends it. Blocks follow one another in one stream.

Same host: a client that can read the store's shared-memory directory (Info) moves payloads
through slots of arena files there instead (ReserveSlots/CommitSlots/GetSlots,
splitserve.kvstore.arena); the checks, leases and status codes are the same.

Put stores each block when its last chunk arrives and verifies (header, hash, size, xxh3 checksum);
a block is never stored in part. A malformed stream is aborted with INVALID_ARGUMENT naming the
problem; blocks completed earlier in the same stream stay stored (puts are idempotent: a retry
reports them as already present). No room (everything else pinned) is RESOURCE_EXHAUSTED.

Metrics (Prometheus, GET /metrics on metrics_port; role "kvstore", model_name "": one store may hold
blocks of several models, each block's header names its own, so no single model label fits):
per successful Put/CommitSlots (direction "put") and Get/GetSlots (direction "get") call,
kv_transfer_bytes += the block payload bytes moved (headers not counted; on put also blocks the
store already had, they crossed the wire too) and one kv_transfer_seconds observation (the call's
duration); kv_transfer_failures{direction} per call rejected or failed. A Get the client cancels
counts as a transfer of what was sent. kv_cache_usage_perc = used_bytes / capacity_bytes, read on
each scrape.
"""
from __future__ import annotations

import argparse
import logging
import math
import secrets
import threading
import time

import grpc

from splitserve import rpc
from splitserve.config.flags import add_config_args, config_from_args
from splitserve.config.kvstore import KVStoreConfig
from splitserve.transfer.block import BlockHeader, KVBlockError
from splitserve.kvstore.arena import Arena, ArenaManager, ArenaPayload, SlotError
from splitserve.kvstore.block_store import BlockStore, PutResult, StoreFullError
from splitserve.kvstore import shm
from splitserve.launch.lifeline import SignalFlag
from splitserve.kvstore.client import block_chunks
from splitserve.metrics import Metrics, MetricsServer
from splitserve.ownership.registry import OwnershipRegistry, OwnershipReporter, redact_url
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

log = logging.getLogger("splitserve.kvstore")

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name  # "splitserve.v1.KVStore"
MAX_RESERVE_SLOTS = 4096  # slots one ReserveSlots call may grant


class _Reject(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class _ClientGone(Exception):
    """A Put whose client cancelled mid-stream: counted as a failed transfer, answered with an
    empty PutResponse nobody reads."""


def _read_lease_id() -> str:
    """A lease that pins blocks while a get hands them out."""
    return "read-" + secrets.token_hex(8)


def _short(block_hash: bytes) -> str:
    return block_hash.hex()[:16] + "..." if block_hash else "(empty hash)"


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    """Thin shell: wire chunks <-> BlockStore, status codes, ownership reports."""

    def __init__(self, config: KVStoreConfig, store: BlockStore, reporter: OwnershipReporter | None,
                 area: shm.ShmArea | None = None, metrics: Metrics | None = None,
                 arenas: ArenaManager | None = None):
        self.config = config
        self.store = store
        self.reporter = reporter
        self.area = area
        self.arenas = arenas  # in area's directory; None: streams only
        self.metrics = metrics if metrics is not None else Metrics("kvstore")

    def _metered(self, direction: str, handler, request, context):
        """Runs a unary transfer handler returning (response, payload bytes) and records the call:
        bytes and duration when it succeeds, a failure when it aborts or raises."""
        t0 = time.monotonic()
        try:
            response, nbytes = handler(request, context)
        except BaseException:  # context.abort raises too
            self.metrics.kv_transfer_failed(direction)
            raise
        self.metrics.kv_transfer(direction, nbytes, time.monotonic() - t0)
        return response

    def Put(self, request_iterator, context):
        try:
            return self._metered("put", self._put, request_iterator, context)
        except _ClientGone:
            return kvstore_pb2.PutResponse()

    def _put(self, request_iterator, context):
        held: list[bytes] = []  # stored or already present in this stream: recorded as owned
        counts = {"stored": 0, "present": 0, "bytes": 0, "payload": 0}
        try:
            self._receive(request_iterator, held, counts)
        except grpc.RpcError:  # the client cancelled or went away mid-stream
            if self.reporter is not None:
                self.reporter.record(held)
            if context.is_active():
                raise
            raise _ClientGone() from None
        except _Reject as e:
            if self.reporter is not None:
                self.reporter.record(held)
            log.warning("put rejected code=%s peer=%s error=%s", e.code.name, context.peer(), e)
            context.abort(e.code, str(e))
        if self.reporter is not None:
            self.reporter.record(held)
        return kvstore_pb2.PutResponse(num_stored=counts["stored"], num_already_present=counts["present"],
                                       num_bytes=counts["bytes"]), counts["payload"]

    def _receive(self, chunks, held: list[bytes], counts: dict) -> None:
        cur = None  # the block being received: (hash, header bytes, BlockHeader, lease id, ttl, parts)
        received = 0  # payload bytes of `cur` so far
        for chunk in chunks:
            if chunk.missing:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "Put chunk has missing=true (a Get-only field)")
            if cur is None:
                if not chunk.header:
                    raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"data chunk for block {_short(chunk.block_hash)} without a preceding "
                                  "header chunk")
                cur = self._start_block(chunk)
                received = 0
            elif chunk.block_hash and chunk.block_hash != cur[0]:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                              f"chunk for block {_short(chunk.block_hash)} arrived in the middle of block "
                              f"{_short(cur[0])} (no chunk with last=true yet)")
            elif chunk.header:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                              f"second header chunk for block {_short(cur[0])} before its last chunk")
            block_hash, header_bytes, header, lease_id, ttl, parts = cur
            received += len(chunk.data)
            if received > header.payload_size:  # bounds what one block may buffer
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                              f"block {_short(block_hash)}: received more than the header's payload_size "
                              f"of {header.payload_size} bytes")
            parts.append(chunk.data)
            if not chunk.last:
                continue
            cur = None
            self._store_block(block_hash, header_bytes, b"".join(parts), lease_id, ttl, held, counts, header)
        if cur is not None:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"stream ended in the middle of block {_short(cur[0])}: {received} of "
                          f"{cur[2].payload_size} payload bytes received, no chunk with last=true")

    def _store_block(self, block_hash, header_bytes, payload, lease_id, ttl, held, counts,
                     header: BlockHeader | None = None) -> PutResult:
        try:
            result = self.store.put(block_hash, header_bytes, payload, lease_id, ttl, header)
        except KVBlockError as e:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"block {_short(block_hash)}: {e}") from None
        except StoreFullError as e:
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        held.append(block_hash)
        counts["stored" if result.stored else "present"] += 1
        counts["bytes"] += len(header_bytes) + len(payload)
        counts["payload"] += len(payload)
        return result

    def _parse_header(self, block_hash: bytes, header_bytes: bytes) -> BlockHeader:
        if not block_hash:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "header chunk without block_hash")
        try:
            header = BlockHeader.from_bytes(header_bytes)
        except KVBlockError as e:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"block {_short(block_hash)}: {e}") from None
        if header.block_hash != block_hash:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"block {_short(block_hash)}: header's block_hash is {_short(header.block_hash)}")
        if len(header_bytes) + header.payload_size > self.store.capacity_bytes:
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"block {_short(block_hash)} of {header.payload_size} payload bytes exceeds "
                          f"the store's capacity of {self.store.capacity_bytes} bytes")
        return header

    def _lease(self, lease_id: str, lease_ttl_s: float) -> tuple[str | None, float | None]:
        """(lease id or None, ttl or None for the default), with the ttl cut to max_lease_ttl_s."""
        lease, ttl = lease_id or None, None
        if lease is not None and lease_ttl_s != 0:
            if not lease_ttl_s > 0 or math.isinf(lease_ttl_s):
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                              f"lease_ttl_s must be a positive number of seconds, got {lease_ttl_s}")
            ttl = min(float(lease_ttl_s), self.config.max_lease_ttl_s)
        return lease, ttl

    def _start_block(self, chunk):
        header = self._parse_header(chunk.block_hash, chunk.header)
        lease_id, ttl = self._lease(chunk.lease_id, chunk.lease_ttl_s)
        return chunk.block_hash, chunk.header, header, lease_id, ttl, []

    def Get(self, request, context):
        t0 = time.monotonic()
        if any(not h for h in request.block_hashes):
            self.metrics.kv_transfer_failed("get")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "block_hashes contains an empty hash")
        sent, failed = 0, False  # payload bytes of the blocks streamed out whole
        try:
            for block_hash in request.block_hashes:
                if not context.is_active():
                    return
                block = self._copy_out(block_hash)
                if block is None:
                    yield kvstore_pb2.BlockChunk(block_hash=block_hash, missing=True)
                    continue
                header, payload = block
                yield from block_chunks(block_hash, header, payload, self.config.chunk_bytes)
                sent += len(payload)
        except Exception:
            failed = True
            raise
        finally:
            # Also on cancellation: the reader gave up on these blocks, they need no pin anymore.
            if request.release_lease_id:
                self.store.release(request.release_lease_id)
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

    def Info(self, request, context):
        if self.area is None or self.arenas is None:
            return kvstore_pb2.InfoResponse()
        return kvstore_pb2.InfoResponse(shm_dir=self.area.path, shm_probe=shm.PROBE_NAME,
                                        shm_token=self.area.token)

    def _need_arenas(self, context) -> ArenaManager:
        if self.arenas is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this kvstore has no shared-memory directory (use Put/Get streams)")
        return self.arenas

    def ReserveSlots(self, request, context):
        arenas = self._need_arenas(context)
        if request.payload_size < 1 or request.num_slots < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"payload_size and num_slots must be >= 1, got "
                          f"{request.payload_size} and {request.num_slots}")
        if request.payload_size > self.store.capacity_bytes:
            return kvstore_pb2.ReserveSlotsResponse()  # cannot fit at all: Put says why
        res = arenas.reserve(request.payload_size, min(request.num_slots, MAX_RESERVE_SLOTS),
                             make_room=self.store.make_room, evict_slots=self._evict_slots)
        if res is None:
            return kvstore_pb2.ReserveSlotsResponse()
        return kvstore_pb2.ReserveSlotsResponse(reservation_id=res.id, arena=res.arena.name,
                                                slot_stride=res.arena.stride, slots=res.slots, ttl_s=res.ttl_s)

    def _evict_slots(self, arena: Arena, count: int) -> None:
        """Frees up to `count` slots of `arena` by evicting its least recently used unpinned blocks."""
        evicted = self.store.evict_where(lambda p: isinstance(p, ArenaPayload) and p.arena is arena, count)
        if evicted:
            log.info("evicted %d block(s) for slots of %s", len(evicted), arena.name)

    def CommitSlots(self, request, context):
        return self._metered("put", self._commit_slots, request, context)

    def _commit_slots(self, request, context):
        arenas = self._need_arenas(context)
        held: list[bytes] = []
        counts = {"stored": 0, "present": 0, "bytes": 0, "payload": 0}
        try:
            lease_id, ttl = self._lease(request.lease_id, request.lease_ttl_s)
            for i, block in enumerate(request.blocks):
                try:
                    self._commit_block(arenas, request.reservation_id, block, lease_id, ttl, held, counts)
                except _Reject as e:
                    raise _Reject(e.code, f"blocks[{i}]: {e}") from None
        except _Reject as e:
            log.warning("put rejected code=%s peer=%s error=%s", e.code.name, context.peer(), e)
            context.abort(e.code, str(e))
        finally:
            # Slots of this call not reached (after an error) go back at once.
            arenas.cancel(request.reservation_id, [b.slot for b in request.blocks])
            if self.reporter is not None:
                self.reporter.record(held)
        return kvstore_pb2.PutResponse(num_stored=counts["stored"], num_already_present=counts["present"],
                                       num_bytes=counts["bytes"]), counts["payload"]

    def _commit_block(self, arenas: ArenaManager, reservation_id: str, block, lease_id, ttl, held, counts) -> None:
        try:
            payload = arenas.take(reservation_id, block.slot)  # the slot is ours to store or free
        except SlotError as e:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"block {_short(block.block_hash)}: {e}") from None
        stored = False
        try:
            header = self._parse_header(block.block_hash, block.header)
            if header.payload_size != len(payload):
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                              f"block {_short(block.block_hash)}: the header's payload_size is "
                              f"{header.payload_size}, the reservation's slots hold {len(payload)} bytes")
            # Checked in place (never copied); the slot is the block's storage from now on.
            stored = self._store_block(block.block_hash, block.header, payload, lease_id, ttl, held, counts,
                                       header).stored
        finally:
            if not stored:  # already present, refused or damaged: the store did not take it
                payload.discard()

    def GetSlots(self, request, context):
        return self._metered("get", self._get_slots, request, context)

    def _get_slots(self, request, context):
        if any(not h for h in request.block_hashes):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "block_hashes contains an empty hash")
        self._need_arenas(context)
        read_lease = _read_lease_id()
        blocks, nbytes, rest = [], 0, False
        for block_hash in request.block_hashes:
            # The client checks the checksum as it copies (no read here); the lease keeps the slot.
            block = self.store.get(block_hash, verify=False, lease_id=read_lease,
                                   lease_ttl_s=self.config.shm_slot_ttl_s)
            if block is None:
                break
            header, payload = block
            if not isinstance(payload, ArenaPayload):  # arrived through Put: in this process's memory
                rest = True
                break
            blocks.append(kvstore_pb2.ArenaBlock(block_hash=block_hash, header=header, arena=payload.arena.name,
                                                 offset=payload.offset))
            nbytes += len(payload)
        if not blocks:
            self.store.release(read_lease)
        if request.release_lease_id and not rest:
            self.store.release(request.release_lease_id)
        return kvstore_pb2.GetSlotsResponse(blocks=blocks, read_lease_id=read_lease if blocks else "",
                                            rest_by_stream=rest), nbytes

    def Contains(self, request, context):
        return kvstore_pb2.ContainsResponse(present=self.store.contains(list(request.block_hashes)))

    def Release(self, request, context):
        if not request.lease_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "lease_id is empty")
        return kvstore_pb2.ReleaseResponse(num_released=self.store.release(request.lease_id))

    def Stats(self, request, context):
        s = self.store.stats()
        return kvstore_pb2.StatsResponse(
            num_blocks=s.num_blocks, used_bytes=s.used_bytes, capacity_bytes=s.capacity_bytes,
            num_leases=s.num_leases, num_pinned_blocks=s.num_pinned_blocks,
            num_evictions=s.num_evictions, bytes_in=s.bytes_in, bytes_out=s.bytes_out,
        )


class KVStoreServer:
    """A running kvstore: the gRPC server, its store and ownership reporter. Built by serve()."""

    def __init__(self, config: KVStoreConfig):
        self.config = config
        self.store = BlockStore(config.capacity_bytes, config.lease_ttl_s, on_evict=self._evicted)
        self.area, self.arenas = None, None
        if config.shm_dir and config.arena_bytes > 0:
            try:
                self.area = shm.ShmArea(config.shm_dir)
            except OSError as e:
                log.warning("no shared-memory path (gRPC streams only): %s", e)
            else:
                self.arenas = ArenaManager(self.area.path, config.arena_bytes, config.shm_slot_ttl_s)
        self.registry = OwnershipRegistry(config.redis_url, config.ownership_ttl_s) if config.redis_url else None
        server_creds, _ = rpc.mtls_credentials(config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
        self.server, self.port = rpc.create_server(config.host, config.port, config.max_workers,
                                                   config.max_message_bytes, credentials=server_creds)
        self.metrics = Metrics("kvstore")
        self.metrics.touch("kv_transfer_bytes", "kv_transfer_seconds", "kv_transfer_failures", direction="put")
        self.metrics.touch("kv_transfer_bytes", "kv_transfer_seconds", "kv_transfer_failures", direction="get")
        self.metrics.on_collect(self._refresh_metrics)
        self.metrics_server = None
        if config.metrics_port >= 0:
            try:  # bound now, so a taken port fails the start-up like a taken gRPC port
                self.metrics_server = MetricsServer(self.metrics, config.metrics_host or config.host,
                                                    config.metrics_port)
            except OSError:
                self.server.stop(0)
                if self.area is not None:
                    self.arenas.close()
                    self.area.close()
                if self.registry is not None:
                    self.registry.close()
                raise
        self.address = rpc.format_address(config.host, self.port)  # where this process listens
        self.owner_id = "kvstore:" + (config.advertise_address or self.address)
        self.reporter = None
        if self.registry is not None:
            self.reporter = OwnershipReporter(self.registry, self.owner_id, self.store.hashes,
                                              refresh_s=config.ownership_ttl_s / 3,
                                              retry_s=config.ownership_retry_s)
        rpc.add_servicer(KVStoreServicer(config, self.store, self.reporter, self.area, self.metrics, self.arenas),
                         kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"], self.server)
        self.health = rpc.add_health_and_reflection(self.server, [SERVICE_NAME])
        self._stopped = threading.Event()

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

    def start(self) -> "KVStoreServer":
        if self.reporter is not None:
            self.reporter.start()
        self.server.start()
        if self.metrics_server is not None:
            self.metrics_server.start()
        log.info("kvstore serving address=%s owner=%s capacity_bytes=%d shm=%s redis=%s metrics=%s", self.address,
                 self.owner_id, self.store.capacity_bytes, self.area.path if self.area else "off",
                 redact_url(self.config.redis_url) if self.config.redis_url else "off", self.metrics_url or "off")
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, then stop accepting RPCs and wait up to grace_s for in-flight ones."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.config.shutdown_grace_s if grace_s is None else grace_s).wait()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.reporter is not None:
            self.reporter.stop()
        if self.registry is not None:
            self.registry.close()
        if self.area is not None:
            self.arenas.close()
            self.area.close()
        log.info("kvstore stopped address=%s", self.address)

    def __enter__(self) -> "KVStoreServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace_s=0)


def serve(config: KVStoreConfig) -> KVStoreServer:
    """Starts the kvstore in this process (gRPC threads) and returns the running handle."""
    return KVStoreServer(config).start()


def main(argv: list[str] | None = None) -> int:
    """`splitserve kvstore [flags]`: serves until SIGTERM or SIGINT, then stops cleanly (exit 0)."""
    parser = argparse.ArgumentParser(prog="splitserve kvstore", description=__doc__.splitlines()[0])
    add_config_args(parser, KVStoreConfig)
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = config_from_args(KVStoreConfig, args)
    except ValueError as e:
        parser.error(str(e))
    signals = SignalFlag()  # before serving: a signal during start-up is kept, not lost
    try:
        server = serve(config)
    except OSError as e:
        log.error("kvstore failed to start error=%s", e)
        return 1
    signals.wait()  # a handler must take no lock (see SignalFlag)
    log.info("kvstore shutting down")
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
