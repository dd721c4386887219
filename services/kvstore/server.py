"""The kvstore role: the gRPC KVStore service and its entry point.

    splitserve kvstore --port 50070 --capacity-gb 2 --redis-url redis://127.0.0.1:6379/0

Wire form (protos/splitserve/v1/kvstore.proto): blocks travel as BlockChunks
(splitserve.kvstore.protocol). Same host: a client that can read the store's shared-memory
directory (Info) moves payloads through slots of arena files there instead
(ReserveSlots/CommitSlots/GetSlots, splitserve.kvstore.arena); the checks, leases and status codes
are the same. What each call does, with its metrics, is splitserve.kvstore.service; the process's
store, shared memory, ownership reporter and metrics endpoint are splitserve.kvstore.node. This
module turns messages into those calls and `Reject` into status codes.
"""
from __future__ import annotations

import logging
import threading

from splitserve import rpc, tracing
from splitserve.config.flags import parse_role_args
from splitserve.config.kvstore import KVStoreConfig
from splitserve.kvstore import shm
from splitserve.kvstore.node import KVStoreNode
from splitserve.kvstore.service import ClientGone, KVStoreService, PutCounts, Reject
from splitserve.lifeline import SignalFlag
from splitserve.ownership.registry import redact_url
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

log = logging.getLogger("splitserve.kvstore")

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name  # "splitserve.v1.KVStore"

def _put_response(counts: PutCounts) -> kvstore_pb2.PutResponse:
    return kvstore_pb2.PutResponse(num_stored=counts.num_stored, num_already_present=counts.num_already_present,
                                   num_bytes=counts.num_bytes)

class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    """Messages <-> KVStoreService calls; a Reject aborts the call with its status code."""

    def __init__(self, service: KVStoreService, area: shm.ShmArea | None = None):
        self.service = service
        self.area = area

    def _unary(self, context, fn, *args, put: bool = False):
        try:
            return fn(*args)
        except Reject as e:
            if put:
                log.warning("put rejected code=%s peer=%s error=%s", e.code.name, context.peer(), e)
            context.abort(e.code, str(e))

    def Put(self, request_iterator, context):
        try:
            counts = self._unary(context, self.service.put, request_iterator, context.is_active, put=True)
        except ClientGone:
            return kvstore_pb2.PutResponse()
        return _put_response(counts)

    def Get(self, request, context):
        try:
            yield from self.service.get(list(request.block_hashes), request.release_lease_id, context.is_active)
        except Reject as e:
            context.abort(e.code, str(e))

    def Info(self, request, context):
        if self.area is None or self.service.arenas is None:
            return kvstore_pb2.InfoResponse()
        return kvstore_pb2.InfoResponse(shm_dir=self.area.path, shm_probe=shm.PROBE_NAME,
                                        shm_token=self.area.token)

    def ReserveSlots(self, request, context):
        grant = self._unary(context, self.service.reserve_slots, request.payload_size, request.num_slots)
        if grant is None:
            return kvstore_pb2.ReserveSlotsResponse()
        return kvstore_pb2.ReserveSlotsResponse(reservation_id=grant.reservation_id, arena=grant.arena,
                                                slot_stride=grant.slot_stride, slots=grant.slots, ttl_s=grant.ttl_s)

    def CommitSlots(self, request, context):
        counts = self._unary(context, self.service.commit_slots, request.reservation_id, request.lease_id,
                             request.lease_ttl_s, list(request.blocks), put=True)
        return _put_response(counts)

    def GetSlots(self, request, context):
        answer = self._unary(context, self.service.get_slots, list(request.block_hashes), request.release_lease_id)
        blocks = [kvstore_pb2.ArenaBlock(block_hash=b.block_hash, header=b.header, arena=b.arena, offset=b.offset)
                  for b in answer.blocks]
        return kvstore_pb2.GetSlotsResponse(blocks=blocks, read_lease_id=answer.read_lease_id,
                                            rest_by_stream=answer.rest_by_stream)

    def Contains(self, request, context):
        return kvstore_pb2.ContainsResponse(present=self.service.contains(list(request.block_hashes)))

    def Release(self, request, context):
        return kvstore_pb2.ReleaseResponse(num_released=self._unary(context, self.service.release, request.lease_id))

    def Stats(self, request, context):
        s = self.service.stats()
        return kvstore_pb2.StatsResponse(
            num_blocks=s.num_blocks, used_bytes=s.used_bytes, capacity_bytes=s.capacity_bytes,
            num_leases=s.num_leases, num_pinned_blocks=s.num_pinned_blocks,
            num_evictions=s.num_evictions, bytes_in=s.bytes_in, bytes_out=s.bytes_out,
        )

class KVStoreServer:
    """A running kvstore: the gRPC server over a KVStoreNode. Built by serve()."""

    def __init__(self, config: KVStoreConfig):
        self.config = config
        self.node = KVStoreNode(config)
        server_creds, _ = rpc.mtls_credentials(config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
        tracing.setup(config.tracing, "kvstore")
        try:
            self.server, self.port = rpc.create_server(
                config.host, config.port, config.max_workers, config.max_message_bytes, credentials=server_creds,
                interceptors=tracing.server_interceptors(SERVICE_NAME, "kvstore"))
        except BaseException:
            self.node.close()
            raise
        try:
            self.node.bind_metrics(config.host)
        except OSError:
            self.server.stop(0)
            self.node.close()
            raise
        self.address = rpc.format_address(config.host, self.port)  # where this process listens
        self.owner_id = "kvstore:" + (config.advertise_address or self.address)
        service = self.node.attach(self.owner_id)
        rpc.add_servicer(KVStoreServicer(service, self.node.area),
                         kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"], self.server)
        self.health = rpc.add_health_and_reflection(self.server, [SERVICE_NAME])
        self._stopped = threading.Event()

    # What tests and the launcher look at, held by the node.
    store = property(lambda self: self.node.store)
    area = property(lambda self: self.node.area)
    arenas = property(lambda self: self.node.arenas)
    metrics = property(lambda self: self.node.metrics)
    metrics_server = property(lambda self: self.node.metrics_server)
    metrics_url = property(lambda self: self.node.metrics_url, doc="http://HOST:PORT/metrics, or \"\" when off.")

    def start(self) -> "KVStoreServer":
        self.node.start()
        self.server.start()
        self.node.start_metrics()
        log.info("kvstore serving address=%s owner=%s capacity_bytes=%d shm=%s redis=%s metrics=%s", self.address,
                 self.owner_id, self.store.capacity_bytes, self.area.path if self.area else "off",
                 redact_url(self.config.redis_url) if self.config.redis_url else "off", self.metrics_url or "off")
        return self

    def drain(self) -> bool:
        """NOT_SERVING, no new puts; leased blocks stay readable until no lease is left (bounded by
        drain_timeout_s). Whether every lease ended."""
        self.health.enter_graceful_shutdown()
        return self.node.drain(self.config.drain_timeout_s)

    def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, then stop accepting RPCs and wait up to grace_s for in-flight ones."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.config.shutdown_grace_s if grace_s is None else grace_s).wait()
        self.node.close()
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
    config = parse_role_args(KVStoreConfig, argv, "splitserve kvstore", __doc__.splitlines()[0])
    signals = SignalFlag()  # before serving: a signal during start-up is kept, not lost
    try:
        server = serve(config)
    except OSError as e:
        log.error("kvstore failed to start error=%s", e)
        return 1
    signals.wait()  # a handler must take no lock (see SignalFlag)
    log.info("kvstore shutting down")
    server.drain()
    server.stop()
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
