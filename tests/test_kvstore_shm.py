"""The kvstore's same-host path (payloads through files in its shared-memory directory) over real
gRPC, and the client's choice between it and the gRPC streams."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import grpc
import pytest

from splitserve import rpc
from splitserve.engine import kv_block
from splitserve.kvstore import shm
from splitserve.kvstore.client import KVStoreClient
from splitserve.services.kvstore.server import KVStoreConfig, serve
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

from test_kvstore_service import BIG, SMALL, encode, get_blocks, random_cache


@pytest.fixture()
def store(tmp_path):
    server = serve(KVStoreConfig(port=0, capacity_gb=0.0625, max_workers=4, shm_dir=str(tmp_path)))
    yield server
    server.stop(grace_s=0)


def transfer_files(server) -> list[str]:
    return sorted(n for n in os.listdir(server.area.path) if n not in (shm.PROBE_NAME, shm.HOST_NAME))


def as_blocks(encoded):
    return [(kv_block.BlockHeader.from_bytes(hdr), payload) for _, hdr, payload in encoded]


def test_same_host_client_moves_payloads_through_files_and_leaves_none(store):
    small, big = random_cache(SMALL, 3, seed=1), random_cache(BIG, 1, seed=2)
    encoded = [encode(small, i) for i in range(3)] + [encode(big, 0)]
    client = KVStoreClient(store.address)
    try:
        assert client.transport == "shm"
        reply = client.put(as_blocks(encoded), lease_id="req-1", lease_ttl_s=30)
        assert (reply.num_stored, reply.num_already_present) == (4, 0)
        assert client.put(as_blocks(encoded[:2])).num_already_present == 2
        assert store.store.stats().num_pinned_blocks == 4
        # The stream path sees what the file path stored, byte for byte.
        streamed = get_blocks(kvstore_pb2_grpc.KVStoreStub(client._channel), [h for h, _, _ in encoded])
        assert [streamed[h][1] for h, _, _ in encoded] == [p for _, _, p in encoded]
        got = client.get([h for h, _, _ in encoded], release_lease_id="req-1")
        assert [(h.block_hash, bytes(p)) for h, p in got] == [(h, p) for h, _, p in encoded]
        assert store.store.stats().num_leases == 0
        # The store kept one file per block; the client's get links are gone.
        assert [n[:4] for n in transfer_files(store)] == ["blk-"] * 4
        # Only the leading blocks the store holds come back.
        missing = b"\x01" * 32
        got = client.get([encoded[0][0], missing, encoded[1][0]])
        assert [h.block_hash for h, _ in got] == [encoded[0][0]]
        assert client.get([missing]) == []
        assert [n[:4] for n in transfer_files(store)] == ["blk-"] * 4
    finally:
        client.close()


def test_put_file_rejects_names_outside_the_directory_and_bad_files(store):
    block = encode(random_cache(SMALL, 1, seed=3), 0)

    def put_file(name: str):
        return stub.PutFile(kvstore_pb2.PutFileRequest(blocks=[
            kvstore_pb2.FileBlock(block_hash=block[0], header=block[1], file_name=name)]))

    with rpc.channel(store.address) as ch:
        stub = kvstore_pb2_grpc.KVStoreStub(ch)
        for name in ("../../etc/passwd", "/etc/passwd", "probe", "put-xyz", "", "get-" + "0" * 32,
                     "blk-" + "0" * 32):
            with pytest.raises(grpc.RpcError) as err:
                put_file(name)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "file_name" in err.value.details() and "blocks[0]" in err.value.details()
        name = shm.new_file_name("put")
        with pytest.raises(grpc.RpcError) as err:  # named well, never written
            put_file(name)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not exist" in err.value.details()
        # A file one byte short of the block: named, refused, and removed.
        shm.write_file(store.area.file_path(name), block[2][:-1])
        with pytest.raises(grpc.RpcError) as err:
            put_file(name)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "payload_size" in err.value.details() and "blocks[0]" in err.value.details()
        # Damaged bytes: the checksum check of the stream path applies.
        shm.write_file(store.area.file_path(name), bytes([block[2][0] ^ 1]) + block[2][1:])
        with pytest.raises(grpc.RpcError) as err:
            put_file(name)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "checksum mismatch" in err.value.details()
        assert transfer_files(store) == [] and store.store.stats().num_blocks == 0
        shm.write_file(store.area.file_path(name), block[2])  # and the store keeps serving
        assert put_file(name).num_stored == 1
        assert [n[:4] for n in transfer_files(store)] == ["blk-"]  # the file is now the block's storage
        # Evicted or dropped, the block's file goes with it.
        assert store.store.release("nothing") == 0
        store.store._remove(block[0])
        assert transfer_files(store) == []


def test_clients_that_cannot_see_the_directory_use_streams(store, tmp_path):
    block = encode(random_cache(SMALL, 1, seed=4), 0)
    plain = KVStoreClient(store.address, use_shm=False)
    assert plain.transport == "grpc"
    assert plain.put(as_blocks([block])).num_stored == 1
    plain.close()
    # Another host or container: the probe token is not readable where Info says it is.
    os.rename(os.path.join(store.area.path, shm.PROBE_NAME), os.path.join(store.area.path, "moved"))
    elsewhere = KVStoreClient(store.address)
    try:
        assert elsewhere.transport == "grpc"
        assert [bytes(p) for _, p in elsewhere.get([block[0]])] == [block[2]]
    finally:
        elsewhere.close()
    # A store without a directory says so, and refuses the file calls.
    no_shm = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=""))
    try:
        client = KVStoreClient(no_shm.address)
        assert client.transport == "grpc" and client.put(as_blocks([block])).num_stored == 1
        with pytest.raises(grpc.RpcError) as err:
            kvstore_pb2_grpc.KVStoreStub(client._channel).GetFile(kvstore_pb2.GetRequest(block_hashes=[block[0]]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        client.close()
    finally:
        no_shm.stop(grace_s=0)


def test_stale_files_are_swept_and_the_directory_removed_on_stop(tmp_path):
    server = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path),
                                 shm_file_ttl_s=30))
    area = server.area
    old, fresh = area.file_path(shm.new_file_name("get")), area.file_path(shm.new_file_name("put"))
    shm.write_file(old, b"left by a client that died")
    shm.write_file(fresh, b"in flight")
    os.utime(old, (time.time() - 60, time.time() - 60))
    assert area.sweep(force=True) == 1
    assert transfer_files(server) == [os.path.basename(fresh)]
    server.stop(grace_s=0)
    assert not os.path.exists(area.path)


def test_directories_of_dead_stores_are_removed_at_start(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{shm.DIR_PREFIX}{int(dead.stdout)}-0badcafe"
    orphan.mkdir()
    (orphan / shm.HOST_NAME).write_bytes(socket.gethostname().encode())
    (orphan / ("get-" + "0" * 32)).write_bytes(b"x")
    alive = tmp_path / f"{shm.DIR_PREFIX}{os.getpid()}-00000000"
    alive.mkdir()
    server = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path)))
    try:
        assert not orphan.exists() and alive.exists()
    finally:
        server.stop(grace_s=0)


def test_client_follows_a_restarted_store_to_its_new_directory(tmp_path):
    block = encode(random_cache(SMALL, 1, seed=5), 0)
    first = serve(KVStoreConfig(port=0, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path), metrics_port=-1))
    port, old_dir = first.port, first.area.path
    client = KVStoreClient(first.address)
    try:
        assert client.transport == "shm"
        first.stop(grace_s=0)
        second = serve(KVStoreConfig(port=port, capacity_gb=0.01, max_workers=2, shm_dir=str(tmp_path),
                                     metrics_port=-1))
        try:
            assert second.area.path != old_dir
            assert client.put(as_blocks([block])).num_stored == 1  # asked the new store where it keeps files
            assert client.transport == "shm"
            assert [n[:4] for n in transfer_files(second)] == ["blk-"]
            assert [bytes(p) for _, p in client.get([block[0]])] == [block[2]]
        finally:
            second.stop(grace_s=0)
    finally:
        client.close()
