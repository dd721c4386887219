"""The kvstore's same-host path (payloads through slots of arena files in its shared-memory
directory) over real gRPC, and the client's choice between it and the gRPC streams."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import grpc
import pytest
import torch

from splitserve import rpc
from splitserve.transfer import block as kv_block
from splitserve.kvstore import shm
from splitserve.kvstore.arena import ArenaPayload
from splitserve.engine.kv_cache import KVCache
from splitserve.kvstore.client import KVStoreClient
from splitserve.services.kvstore.server import serve
from splitserve.config.kvstore import KVStoreConfig
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

from test_kvstore_service import BIG, SMALL, encode, get_blocks, random_cache

SMALL_BYTES = 32 << 10  # payload bytes of a SMALL block (float32)


@pytest.fixture()
def store(tmp_path):
    server = serve(KVStoreConfig(port=0, capacity_gb=0.0625, max_workers=4, shm_dir=str(tmp_path), metrics_port=-1))
    yield server
    server.stop(grace_s=0)


def files(server) -> list[str]:
    return sorted(n for n in os.listdir(server.area.path) if n not in (shm.PROBE_NAME, shm.HOST_NAME))


def as_blocks(encoded):
    return [(kv_block.BlockHeader.from_bytes(hdr), payload) for _, hdr, payload in encoded]


def in_arena(server, block_hash: bytes) -> bool:
    return isinstance(server.store._blocks[block_hash].payload, ArenaPayload)


def reserve(stub, size: int, n: int) -> kvstore_pb2.ReserveSlotsResponse:
    return stub.ReserveSlots(kvstore_pb2.ReserveSlotsRequest(payload_size=size, num_slots=n))


def write_slot(server, res, slot: int, payload: bytes) -> None:
    fd = os.open(os.path.join(server.area.path, res.arena), os.O_WRONLY)
    try:
        os.pwrite(fd, payload, slot * res.slot_stride)
    finally:
        os.close(fd)


def commit(stub, res, blocks_and_slots, lease_id: str = "") -> kvstore_pb2.PutResponse:
    return stub.CommitSlots(kvstore_pb2.CommitSlotsRequest(
        reservation_id=res.reservation_id, lease_id=lease_id,
        blocks=[kvstore_pb2.SlotBlock(block_hash=h, header=hdr, slot=slot) for (h, hdr, _), slot in blocks_and_slots]))


def test_same_host_client_moves_payloads_through_arena_slots(store):
    small, big = random_cache(SMALL, 3, seed=1), random_cache(BIG, 1, seed=2)
    encoded = [encode(small, i) for i in range(3)] + [encode(big, 0)]  # two payload sizes: two arenas
    client = KVStoreClient(store.address)
    try:
        assert client.transport == "shm"
        reply = client.put(as_blocks(encoded), lease_id="req-1", lease_ttl_s=30)
        assert (reply.num_stored, reply.num_already_present) == (4, 0)
        assert all(in_arena(store, h) for h, _, _ in encoded)
        assert files(store) == sorted([shm.arena_name(SMALL_BYTES), shm.arena_name(len(encoded[3][2]))])
        assert client.put(as_blocks(encoded[:2])).num_already_present == 2
        assert store.arenas.num_reserved() == 0  # every reserved slot was committed or freed
        assert store.store.stats().num_pinned_blocks == 4
        # The stream path sees what the arena path stored, byte for byte.
        streamed = get_blocks(kvstore_pb2_grpc.KVStoreStub(client._channel), [h for h, _, _ in encoded])
        assert [streamed[h][1] for h, _, _ in encoded] == [p for _, _, p in encoded]
        got = client.get([h for h, _, _ in encoded], release_lease_id="req-1")
        assert [(h.block_hash, p) for h, p in got] == [(h, p) for h, _, p in encoded]
        assert store.store.stats().num_leases == 0  # the request's lease and the read leases are gone
        # Only the leading blocks the store holds come back.
        missing = b"\x01" * 32
        assert [h.block_hash for h, _ in client.get([encoded[0][0], missing, encoded[1][0]])] == [encoded[0][0]]
        assert client.get([missing]) == []
        assert store.store.stats().num_leases == 0
    finally:
        client.close()


def test_slots_of_evicted_blocks_are_reused(tmp_path):
    cache = random_cache(SMALL, 6, seed=3)
    encoded = [encode(cache, i) for i in range(6)]
    nbytes = len(encoded[0][1]) + SMALL_BYTES
    evicted: list[bytes] = []
    server = serve(KVStoreConfig(port=0, capacity_gb=3 * nbytes / (1 << 30), max_workers=2, shm_dir=str(tmp_path),
                                 metrics_port=-1, shm_arena_gb=6 * nbytes / (1 << 30)))  # room for three blocks
    server.store.on_evict = evicted.extend
    client = KVStoreClient(server.address)
    stub = kvstore_pb2_grpc.KVStoreStub(client._channel)
    try:
        assert client.put(as_blocks(encoded[:3])).num_stored == 3
        allocated = server.arenas.allocated_bytes
        assert allocated == 3 * SMALL_BYTES
        # Slots 0, 1, 2 are held and the arena could grow, but two more blocks would evict the two
        # least recently used: the slots of those are reused instead of new shared memory.
        res = reserve(stub, SMALL_BYTES, 2)
        assert list(res.slots) == [0, 1] and evicted == [encoded[0][0], encoded[1][0]]
        write_slot(server, res, 0, encoded[3][2])
        write_slot(server, res, 1, encoded[4][2])
        assert commit(stub, res, [(encoded[3], 0), (encoded[4], 1)]).num_stored == 2
        assert len(evicted) == 2 and server.arenas.allocated_bytes == allocated  # no new shared memory
        got = client.get([encoded[i][0] for i in (2, 3, 4)])
        assert [p for _, p in got] == [encoded[i][2] for i in (2, 3, 4)]
        assert server.store.stats().used_bytes == 3 * nbytes
    finally:
        client.close()
        server.stop(grace_s=0)


def test_reservations_expire_and_late_or_foreign_commits_are_refused(tmp_path):
    server = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path), metrics_port=-1,
                                 shm_slot_ttl_s=0.3))
    block = encode(random_cache(SMALL, 1, seed=4), 0)
    try:
        with rpc.channel(server.address) as ch:
            stub = kvstore_pb2_grpc.KVStoreStub(ch)
            mine, other = reserve(stub, SMALL_BYTES, 1), reserve(stub, SMALL_BYTES, 1)
            assert mine.ttl_s == pytest.approx(0.3) and mine.slots != other.slots
            write_slot(server, mine, mine.slots[0], block[2])
            for res, slot, message in ((mine, other.slots[0], "is not reserved under"),
                                       (mine, 10_000, "is not reserved under"),
                                       (kvstore_pb2.ReserveSlotsResponse(reservation_id="nope"), mine.slots[0],
                                        "unknown or expired")):
                with pytest.raises(grpc.RpcError) as err:
                    commit(stub, res, [(block, slot)])
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in err.value.details() and "blocks[0]" in err.value.details()
            assert server.arenas.num_reserved() == 2  # refused commits took nobody's slot
            _wait_for(lambda: server.arenas.num_reserved() == 0, "the reservations to expire after their 0.3 s")
            with pytest.raises(grpc.RpcError) as err:  # written in time, committed too late
                commit(stub, mine, [(block, mine.slots[0])])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown or expired" in err.value.details()
            assert server.store.stats().num_blocks == 0
            assert server.arenas.num_free(SMALL_BYTES) == server.arenas.allocated_bytes // SMALL_BYTES
    finally:
        server.stop(grace_s=0)


def test_a_damaged_slot_is_refused_and_freed(store):
    block, other = (encode(random_cache(SMALL, 1, seed=s), 0) for s in (5, 6))
    with rpc.channel(store.address) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        res = reserve(stub, SMALL_BYTES, 2)
        free_before = store.arenas.num_free(SMALL_BYTES)
        write_slot(store, res, res.slots[0], bytes([block[2][0] ^ 1]) + block[2][1:])
        write_slot(store, res, res.slots[1], other[2])
        with pytest.raises(grpc.RpcError) as err:
            commit(stub, res, [(block, res.slots[0]), (other, res.slots[1])])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "checksum mismatch" in err.value.details() and "blocks[0]" in err.value.details()
        # Both slots are free again (the second was never reached), nothing was stored.
        assert store.arenas.num_free(SMALL_BYTES) == free_before + 2 and store.arenas.num_reserved() == 0
        assert store.store.stats().num_blocks == 0
        # A header naming another payload size than the reservation's slots hold.
        big = encode(random_cache(BIG, 1, seed=7), 0)
        res = reserve(stub, SMALL_BYTES, 1)
        with pytest.raises(grpc.RpcError) as err:
            commit(stub, res, [(big, res.slots[0])])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "payload_size" in err.value.details()
        # And the store keeps serving: the block, written right, is stored.
        res = reserve(stub, SMALL_BYTES, 1)
        write_slot(store, res, res.slots[0], block[2])
        assert commit(stub, res, [(block, res.slots[0])]).num_stored == 1
        with pytest.raises(grpc.RpcError) as err:
            reserve(stub, 0, 1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_buffers_are_reused_only_once_dropped(store):
    cache = random_cache(SMALL, 4, seed=14)
    encoded = [encode(cache, i) for i in range(4)]
    client = KVStoreClient(store.address)
    try:
        client.put(as_blocks(encoded))
        first = client.get([encoded[0][0], encoded[1][0]])
        kept = [p for _, p in first]
        with pytest.raises(TypeError):
            kept[0][0] = 0  # read-only
        del first
        second = client.get([encoded[2][0], encoded[3][0]])  # kept buffers are in use: fresh ones
        assert kept == [encoded[0][2], encoded[1][2]] and [p for _, p in second] == [encoded[2][2], encoded[3][2]]
        assert len(client._buffers._pool) == 4
        del kept, second
        third = client.get([encoded[1][0], encoded[0][0]])  # everything was dropped: reused
        assert [p for _, p in third] == [encoded[1][2], encoded[0][2]] and len(client._buffers._pool) == 4
    finally:
        client.close()


def test_a_slot_damaged_after_the_put_reads_as_missing(store):
    cache = random_cache(SMALL, 3, seed=8)
    encoded = [encode(cache, i) for i in range(3)]
    client = KVStoreClient(store.address)
    try:
        client.put(as_blocks(encoded), lease_id="req-2", lease_ttl_s=30)
        payload = store.store._blocks[encoded[1][0]].payload
        fd = os.open(os.path.join(store.area.path, payload.arena.name), os.O_WRONLY)
        os.pwrite(fd, b"\xff" * 8, payload.offset + 100)
        os.close(fd)
        got = client.get([h for h, _, _ in encoded], release_lease_id="req-2")
        assert [h.block_hash for h, _ in got] == [encoded[0][0]]  # the decode worker recomputes the rest
        assert store.store.stats().num_leases == 0
    finally:
        client.close()


def test_a_get_reads_same_host_payloads_straight_into_the_pages_it_is_given(store):
    """`into` names where block i goes (a page's slices): its bytes land there, checked against the
    header's checksum, and come back as a PagePayload of those slices; a block `into` has no place
    for comes in a buffer; a damaged slot read in place still reads as missing."""
    source = random_cache(SMALL, 3, seed=12)
    encoded = [encode(source, i) for i in range(3)]
    target = KVCache(**SMALL, num_blocks=3, dtype=torch.float32)
    client = KVStoreClient(store.address)
    try:
        client.put(as_blocks(encoded), lease_id="r", lease_ttl_s=30)
        places = {0: target.block_parts(2), 2: target.block_parts(0)}  # block 1: no place
        got = client.get([h for h, _, _ in encoded], release_lease_id="r", into=lambda i, header: places.get(i))
        assert isinstance(got[0][1], kv_block.PagePayload) and got[0][1].parts is places[0]
        assert not isinstance(got[1][1], kv_block.PagePayload) and bytes(got[1][1]) == encoded[1][2]
        assert target.read_block(2) == encoded[0][2] and target.read_block(0) == encoded[2][2]
        client.put(as_blocks(encoded), lease_id="r2", lease_ttl_s=30)
        payload = store.store._blocks[encoded[0][0]].payload
        fd = os.open(os.path.join(store.area.path, payload.arena.name), os.O_WRONLY)
        os.pwrite(fd, b"\xff" * 8, payload.offset + 100)
        os.close(fd)
        assert client.get([encoded[0][0]], release_lease_id="r2", into=lambda i, header: target.block_parts(1)) == []
        assert store.store.stats().num_leases == 0
    finally:
        client.close()


def test_blocks_put_through_streams_are_read_through_a_stream(store):
    cache = random_cache(SMALL, 3, seed=9)
    a, b, c = (encode(cache, i) for i in range(3))
    plain, client = KVStoreClient(store.address, use_shm=False), KVStoreClient(store.address)
    try:
        plain.put(as_blocks([b]), lease_id="req-3", lease_ttl_s=30)  # held in the store's memory
        client.put(as_blocks([a, c]), lease_id="req-3", lease_ttl_s=30)
        assert not in_arena(store, b[0]) and in_arena(store, a[0]) and in_arena(store, c[0])
        got = client.get([a[0], b[0], c[0]], release_lease_id="req-3")
        assert [p for _, p in got] == [a[2], b[2], c[2]]
        assert store.store.stats().num_leases == 0
    finally:
        plain.close()
        client.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_page_payloads_are_written_from_the_pages_and_read_back_as_their_bytes(store, dtype):
    """A pinned export's payloads (the block's page slices, not joined) put through the arena slots
    (one vectored write each) and through the streams: every block reads back as read_block's bytes
    under the checksum of those bytes; an 8-bit cache's scales come after its values."""
    cache = KVCache(**SMALL, num_blocks=4, dtype=dtype)
    g = torch.Generator().manual_seed(11)
    for t in cache.k_caches + cache.v_caches:
        t.copy_(torch.randint(-100, 100, t.shape, generator=g).to(dtype))
    for t in cache.k_scales + cache.v_scales:
        t.copy_(torch.rand(t.shape, generator=g))
    hashes = [bytes([i + 1]) * 32 for i in range(4)]
    blocks = [kv_block.encode_block(cache, i, hashes[i], "m", copy=False) for i in range(4)]
    assert all(isinstance(p, kv_block.PagePayload) for _, p in blocks)
    expected = [cache.read_block(i) for i in range(4)]
    assert [h.checksum for h, _ in blocks] == [kv_block.payload_checksum(p) for p in expected]
    plain, client = KVStoreClient(store.address, use_shm=False), KVStoreClient(store.address)
    try:
        assert client.put(blocks[:2], lease_id="r", lease_ttl_s=30).num_stored == 2
        assert plain.put(blocks[2:], lease_id="r", lease_ttl_s=30).num_stored == 2
        assert in_arena(store, hashes[0]) and not in_arena(store, hashes[2])
        got = client.get(hashes, release_lease_id="r")
        assert [bytes(p) for _, p in got] == expected
    finally:
        plain.close()
        client.close()


def test_a_short_vectored_write_is_finished(tmp_path, monkeypatch):
    """pwritev may write less than asked (never on tmpfs, but any file system may): the rest of the
    slices, from the byte where it stopped, follows."""
    from splitserve.kvstore import client as client_module

    real = os.pwritev
    sizes = []

    def short(fd, buffers, offset):  # at most 1000 bytes a call, across slice boundaries
        left, cut = 1000, []
        for b in buffers:
            take = memoryview(b)[:left]
            cut.append(take)
            left -= take.nbytes
            if not left:
                break
        sizes.append(len(buffers))
        return real(fd, cut, offset)

    monkeypatch.setattr(client_module.os, "pwritev", short)
    data = [bytes(range(i, i + 200)) * 7 for i in range(5)]  # 1400-byte slices
    payload = kv_block.PagePayload([memoryview(d) for d in data])
    path = tmp_path / "slot"
    path.write_bytes(b"x" * 50)
    fd = os.open(path, os.O_WRONLY)
    try:
        client_module._pwrite_all(fd, payload, 50)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 50 + b"".join(data)
    assert len(sizes) == 7 and sizes[0] == 5  # 7000 bytes, 1000 a call


def test_without_room_in_shared_memory_puts_stream(tmp_path):
    """Past the arenas' allocation limit (what a full tmpfs does to posix_fallocate) and with every
    slot pinned, the client streams the blocks it got no slot for."""
    cache = random_cache(SMALL, 4, seed=10)
    encoded = [encode(cache, i) for i in range(4)]
    server = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path), metrics_port=-1,
                                 shm_arena_gb=2.5 * SMALL_BYTES / (1 << 30)))  # two slots
    client = KVStoreClient(server.address)
    try:
        assert client.put(as_blocks(encoded), lease_id="req-4", lease_ttl_s=30).num_stored == 4
        assert [in_arena(server, h) for h, _, _ in encoded] == [True, True, False, False]
        assert server.arenas.allocated_bytes == 2 * SMALL_BYTES
        assert client.transport == "shm"  # not given up: the next put tries the arena again
        got = client.get([h for h, _, _ in encoded], release_lease_id="req-4")
        assert [p for _, p in got] == [p for _, _, p in encoded]
    finally:
        client.close()
        server.stop(grace_s=0)
    # No room at all for the arenas: the store offers no shared-memory path.
    server = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path), metrics_port=-1,
                                 shm_arena_gb=0))
    client = KVStoreClient(server.address)
    try:
        assert client.transport == "grpc" and client.put(as_blocks(encoded[:1])).num_stored == 1
    finally:
        client.close()
        server.stop(grace_s=0)


def test_clients_that_cannot_see_the_directory_use_streams(store):
    block = encode(random_cache(SMALL, 1, seed=11), 0)
    plain = KVStoreClient(store.address, use_shm=False)
    assert plain.transport == "grpc"
    assert plain.put(as_blocks([block])).num_stored == 1
    plain.close()
    # Another host or container: the probe token is not readable where Info says it is.
    os.rename(os.path.join(store.area.path, shm.PROBE_NAME), os.path.join(store.area.path, "moved"))
    elsewhere = KVStoreClient(store.address)
    try:
        assert elsewhere.transport == "grpc"
        assert [p for _, p in elsewhere.get([block[0]])] == [block[2]]
    finally:
        elsewhere.close()
    # A store without a directory says so, and refuses the slot calls.
    no_shm = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir="", metrics_port=-1))
    try:
        client = KVStoreClient(no_shm.address)
        assert client.transport == "grpc" and client.put(as_blocks([block])).num_stored == 1
        stub = kvstore_pb2_grpc.KVStoreStub(client._channel)
        for call in (lambda: stub.GetSlots(kvstore_pb2.GetRequest(block_hashes=[block[0]])),
                     lambda: reserve(stub, SMALL_BYTES, 1)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        client.close()
    finally:
        no_shm.stop(grace_s=0)


def test_the_directory_and_its_arenas_are_removed_on_stop(tmp_path):
    server = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path), metrics_port=-1))
    client = KVStoreClient(server.address)
    client.put(as_blocks([encode(random_cache(SMALL, 1, seed=12), 0)]))
    path = server.area.path
    assert files(server) == [shm.arena_name(SMALL_BYTES)]
    client.close()
    server.stop(grace_s=0)
    assert not os.path.exists(path)


def test_directories_of_dead_stores_are_removed_at_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{shm.DIR_PREFIX}{int(dead.stdout)}-0badcafe"
    orphan.mkdir()
    (orphan / shm.HOST_NAME).write_bytes(socket.gethostname().encode())
    with open(orphan / shm.arena_name(4096), "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 1 << 20)
    alive = tmp_path / f"{shm.DIR_PREFIX}{os.getpid()}-00000000"
    alive.mkdir()
    server = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path), metrics_port=-1))
    try:
        assert not orphan.exists() and alive.exists()
    finally:
        server.stop(grace_s=0)


def test_client_follows_a_restarted_store_to_its_new_directory(tmp_path):
    block = encode(random_cache(SMALL, 1, seed=13), 0)
    first = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path), metrics_port=-1))
    port, old_dir = first.port, first.area.path
    client = KVStoreClient(first.address)
    try:
        assert client.transport == "shm"
        assert client.put(as_blocks([block])).num_stored == 1  # the client holds the old arena open
        first.stop(grace_s=0)
        second = serve(KVStoreConfig(port=port, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path),
                                     metrics_port=-1))
        try:
            assert second.area.path != old_dir
            assert client.put(as_blocks([block])).num_stored == 1  # asked the new store where its arenas are
            assert client.transport == "shm" and in_arena(second, block[0])
            assert [p for _, p in client.get([block[0]])] == [block[2]]
        finally:
            second.stop(grace_s=0)
    finally:
        client.close()


def _wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(0.02)
