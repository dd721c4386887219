"""The kvstore over real gRPC (in-process server on a free loopback port) and a real Redis."""
from __future__ import annotations

import hashlib
import logging
import signal
import socket
import subprocess
import sys
import time
import uuid

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from splitserve import rpc
from splitserve.transfer import block as kv_block
from splitserve.engine.kv_cache import KVCache
from splitserve.ownership.registry import OwnershipRegistry
from splitserve.ownership.redis_server import EmbeddedRedis
from splitserve.kvstore.protocol import block_chunks
from splitserve.services.kvstore.server import SERVICE_NAME, serve
from splitserve.config.kvstore import KVStoreConfig
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

MODEL = "test-model"
SMALL = dict(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)  # 32 KiB per block (float32)
BIG = dict(num_layers=10, num_kv_heads=8, head_dim=128, block_size=16)  # 1.25 MiB per block
PUT_CHUNK = 12 << 10  # bytes per Put chunk: small blocks travel in 3 chunks


def start(redis_url: str = "", **overrides):
    config = KVStoreConfig(port=0, redis_url=redis_url, max_workers=4, **overrides)
    server = serve(config)
    ch = rpc.channel(server.address)
    return server, ch, kvstore_pb2_grpc.KVStoreStub(ch)


@pytest.fixture(scope="module")
def kvstore(redis_url):
    server, ch, stub = start(redis_url, capacity_gb=0.0625)
    yield server, stub
    ch.close()
    server.stop(grace_s=0)


def random_cache(dims: dict, num_blocks: int, seed: int) -> KVCache:
    cache = KVCache(**dims, num_blocks=num_blocks, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for t in cache.k_caches + cache.v_caches:
        t.copy_(torch.randn(t.shape, generator=g))
    return cache


def encode(cache: KVCache, block_id: int) -> tuple[bytes, bytes, bytes]:
    """(hash, header bytes, payload) of one cached block, under a fresh hash."""
    block_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
    header, payload = kv_block.encode_block(cache, block_id, block_hash, MODEL)
    return block_hash, header.to_bytes(), payload


def chunks_of(*blocks, lease_id: str = "", lease_ttl_s: float = 0.0):
    for block_hash, header, payload in blocks:
        yield from block_chunks(block_hash, header, payload, PUT_CHUNK, lease_id, lease_ttl_s)


def get_blocks(stub, hashes, release_lease_id: str = "") -> dict:
    """hash -> (header, payload, number of chunks), or None for a block reported missing."""
    out: dict = {}
    cur = None
    for chunk in stub.Get(kvstore_pb2.GetRequest(block_hashes=hashes, release_lease_id=release_lease_id)):
        if chunk.missing:
            out[chunk.block_hash] = None
            continue
        if chunk.header:
            cur = [chunk.header, [], 0]
        assert chunk.block_hash
        cur[1].append(chunk.data)
        cur[2] += 1
        if chunk.last:
            out[chunk.block_hash] = (cur[0], b"".join(cur[1]), cur[2])
    return out


def test_put_get_roundtrip_and_import_into_another_cache(kvstore, redis_url):
    server, stub = kvstore
    small, big = random_cache(SMALL, 3, seed=1), random_cache(BIG, 1, seed=2)
    blocks = [encode(small, i) for i in range(3)] + [encode(big, 0)]
    assert len(blocks[3][2]) == 1310720 > 1 << 20
    reply = stub.Put(chunks_of(*blocks))
    assert (reply.num_stored, reply.num_already_present) == (4, 0)
    assert reply.num_bytes == sum(len(h) + len(p) for _, h, p in blocks)
    assert stub.Put(chunks_of(*blocks[:2])).num_already_present == 2

    missing = hashlib.sha256(b"never stored").digest()
    got = get_blocks(stub, [b[0] for b in blocks] + [missing])
    assert got[missing] is None
    for (block_hash, header, payload), n_chunks in zip(blocks, [1, 1, 1, 2]):
        assert got[block_hash] == (header, payload, n_chunks)  # byte-identical, 1 MiB chunks

    small2, big2 = KVCache(**SMALL, num_blocks=4, dtype=torch.float32), KVCache(**BIG, num_blocks=2, dtype=torch.float32)
    for src, (dst_cache, src_cache, src_id, dst_id) in zip(blocks, [(small2, small, 0, 3), (small2, small, 1, 0),
                                                                    (small2, small, 2, 1), (big2, big, 0, 1)]):
        header, payload, _ = got[src[0]]
        kv_block.import_block(dst_cache, dst_id, kv_block.BlockHeader.from_bytes(header), payload, MODEL, src[0])
        for layer in range(src_cache.num_layers):
            assert torch.equal(dst_cache.k_caches[layer][dst_id], src_cache.k_caches[layer][src_id])
            assert torch.equal(dst_cache.v_caches[layer][dst_id], src_cache.v_caches[layer][src_id])

    assert OwnershipRegistry(redis_url).owners([b[0] for b in blocks] + [missing]) == [{server.owner_id}] * 4 + [set()]
    assert server.owner_id == f"kvstore:{server.address}"


def test_contains_and_stats(kvstore):
    _, stub = kvstore
    a, b = encode(random_cache(SMALL, 1, seed=3), 0), encode(random_cache(SMALL, 1, seed=4), 0)
    before = stub.Stats(kvstore_pb2.StatsRequest())
    stub.Put(chunks_of(a))
    assert list(stub.Contains(kvstore_pb2.ContainsRequest(block_hashes=[b[0], a[0]])).present) == [False, True]
    after = stub.Stats(kvstore_pb2.StatsRequest())
    assert after.num_blocks == before.num_blocks + 1
    assert after.bytes_in - before.bytes_in == len(a[1]) + len(a[2])
    assert after.capacity_bytes == 64 << 20


class NoMetrics:
    def touch(self, *names, **labels):
        pass


def test_prefill_export_asks_a_real_kvstore_which_blocks_it_holds(kvstore):
    """The prefill worker's exporter after the first token: the stored hashes from the Contains
    call; nothing (put everything) when the kvstore is unreachable or does not answer in time."""
    from splitserve.kvstore.client import KVStoreClient
    from splitserve.transfer.export import BlockExporter

    def stored(client, hashes, wait_s=0.1):
        return BlockExporter(client, NoMetrics(), lambda hashes: None, 30.0, contains_wait_s=wait_s)._stored(hashes)

    server, stub = kvstore
    a, b = encode(random_cache(SMALL, 1, seed=13), 0), encode(random_cache(SMALL, 1, seed=14), 0)
    stub.Put(chunks_of(a))
    client = KVStoreClient(server.address)
    assert stored(client, [a[0], b[0]]) == {a[0]} and stored(client, []) == frozenset()
    with socket.socket() as dead:  # bound, never listening: the call fails at once
        dead.bind(("127.0.0.1", 0))
        gone = KVStoreClient(f"127.0.0.1:{dead.getsockname()[1]}")
        assert stored(gone, [a[0]], wait_s=5.0) == frozenset()
    with socket.socket() as mute:  # accepts connections, never speaks HTTP/2: no answer
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        silent = KVStoreClient(f"127.0.0.1:{mute.getsockname()[1]}")
        t0 = time.monotonic()
        assert stored(silent, [a[0]], wait_s=0.2) == frozenset()
        assert 0.15 < time.monotonic() - t0 < 5
    for c in (client, gone, silent):
        c.close()


def test_lease_protects_from_eviction_and_eviction_clears_ownership(redis_url):
    cache = random_cache(SMALL, 5, seed=5)
    a, b, c, d, e = (encode(cache, i) for i in range(5))
    nbytes = len(a[1]) + len(a[2])
    server, ch, stub = start(redis_url, capacity_gb=2 * nbytes / (1 << 30))  # room for two blocks
    registry = OwnershipRegistry(redis_url)
    try:
        stub.Put(chunks_of(a, lease_id="req-1", lease_ttl_s=30))
        stub.Put(chunks_of(b))
        stub.Put(chunks_of(c))  # evicts b: a is older but leased
        present = stub.Contains(kvstore_pb2.ContainsRequest(block_hashes=[a[0], b[0], c[0]])).present
        assert list(present) == [True, False, True]
        assert registry.owners([a[0], b[0], c[0]]) == [{server.owner_id}, set(), {server.owner_id}]
        assert stub.Release(kvstore_pb2.ReleaseRequest(lease_id="req-1")).num_released == 1
        stub.Put(chunks_of(d))  # now a, least recently used, goes
        assert registry.owners([a[0], c[0], d[0]]) == [set(), {server.owner_id}, {server.owner_id}]

        stub.Put(chunks_of(e, lease_id="req-2"))  # default TTL; evicts c
        stub.Put(chunks_of(encode(cache, 0), lease_id="req-3"))  # a new hash; evicts d
        with pytest.raises(grpc.RpcError) as err:  # both resident blocks are leased
            stub.Put(chunks_of(encode(cache, 1)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in err.value.details()
        assert stub.Stats(kvstore_pb2.StatsRequest()).num_leases == 2
        got = get_blocks(stub, [e[0]], release_lease_id="req-2")  # Get then drops the lease
        assert got[e[0]][1] == e[2]
        assert stub.Stats(kvstore_pb2.StatsRequest()).num_leases == 1

        too_big = encode(random_cache(BIG, 1, seed=8), 0)
        with pytest.raises(grpc.RpcError) as err:
            stub.Put(chunks_of(too_big))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in err.value.details()
    finally:
        ch.close()
        server.stop(grace_s=0)


def _garbage_header(h, hdr, p):
    return [kvstore_pb2.BlockChunk(block_hash=h, header=b"\xc1 not msgpack", data=p, last=True)]


def _truncated(h, hdr, p):
    return [kvstore_pb2.BlockChunk(block_hash=h, header=hdr, data=p[:1000])]


def _bad_checksum(h, hdr, p):
    fields = kv_block.BlockHeader.from_bytes(hdr).__dict__ | {"checksum": 12345}
    return list(block_chunks(h, kv_block.BlockHeader(**fields).to_bytes(), p, PUT_CHUNK))


def _data_without_header(h, hdr, p):
    return [kvstore_pb2.BlockChunk(block_hash=h, data=p, last=True)]


def _other_hash_mid_block(h, hdr, p):
    return [kvstore_pb2.BlockChunk(block_hash=h, header=hdr, data=p[:100]),
            kvstore_pb2.BlockChunk(block_hash=b"\x01" * 32, data=p[100:], last=True)]


def _oversized(h, hdr, p):
    return list(block_chunks(h, hdr, p + b"\0", PUT_CHUNK))


@pytest.mark.parametrize("make, message", [
    (_garbage_header, "header is not valid msgpack"),
    (_truncated, "stream ended in the middle of block"),
    (_bad_checksum, "checksum mismatch"),
    (_data_without_header, "without a preceding header"),
    (_other_hash_mid_block, "arrived in the middle of block"),
    (_oversized, "more than the header's payload_size"),
])
def test_malformed_put_streams_are_invalid_argument(kvstore, make, message):
    _, stub = kvstore
    block = encode(random_cache(SMALL, 1, seed=9), 0)
    good = encode(random_cache(SMALL, 1, seed=10), 0)
    with pytest.raises(grpc.RpcError) as err:
        stub.Put(iter(list(chunks_of(good)) + make(*block)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    # The block is not stored at all; the complete block before it in the stream is.
    assert list(stub.Contains(kvstore_pb2.ContainsRequest(block_hashes=[block[0], good[0]])).present) == [False, True]
    assert stub.Put(chunks_of(block)).num_stored == 1  # and the server keeps serving


def test_health_and_reflection(kvstore):
    server, _ = kvstore
    rpc.wait_until_serving(server.address, timeout_s=5)
    with rpc.channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(ch).get_services()


def test_wait_until_serving_times_out_naming_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        with pytest.raises(TimeoutError, match=address):
            rpc.wait_until_serving(address, timeout_s=0.3)


def test_serves_without_redis_and_rebuilds_ownership_when_it_appears(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"  # nothing listens there yet
    block = encode(random_cache(SMALL, 1, seed=11), 0)
    caplog.set_level(logging.WARNING, logger="splitserve")
    server, ch, stub = start(url, ownership_retry_s=0.05)
    redis_server = None
    try:
        assert stub.Put(chunks_of(block)).num_stored == 1
        assert get_blocks(stub, [block[0]])[block[0]][1] == block[2]
        assert any("redis unavailable" in r.getMessage() for r in caplog.records)
        redis_server = EmbeddedRedis(port=port).start()
        registry = OwnershipRegistry(url)
        deadline = time.monotonic() + 5
        while registry.owners([block[0]]) != [{server.owner_id}] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert registry.owners([block[0]]) == [{server.owner_id}]
    finally:
        ch.close()
        server.stop(grace_s=0)
        if redis_server is not None:
            redis_server.stop()


def test_main_serves_until_sigterm_and_exits_cleanly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys; from splitserve.services.kvstore.server import main; "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", str(port), "--capacity-gb", "0.01",
                             "--max-workers", "2", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        rpc.wait_until_serving(f"127.0.0.1:{port}", timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_get_and_release_validate_their_arguments(kvstore):
    _, stub = kvstore
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Get(kvstore_pb2.GetRequest(block_hashes=[b""])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty hash" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Release(kvstore_pb2.ReleaseRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lease_id" in err.value.details()
    assert stub.Release(kvstore_pb2.ReleaseRequest(lease_id="never-granted")).num_released == 0


def test_config_flags_and_validation():
    import argparse

    from splitserve.config.flags import add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, KVStoreConfig)
    args = parser.parse_args(["--capacity-gb", "0.5", "--redis-url", "redis://127.0.0.1:6379/0", "--port", "0"])
    config = config_from_args(KVStoreConfig, args)
    assert (config.capacity_bytes, config.port, config.chunk_bytes) == (512 << 20, 0, 1 << 20)
    for bad, message in [({"redis_url": "localhost:6379"}, "redis_url"), ({"capacity_gb": 0}, "capacity_gb"),
                         ({"chunk_bytes": 16 << 20}, "chunk_bytes"), ({"lease_ttl_s": 0}, "lease_ttl_s")]:
        with pytest.raises(ValueError, match=message):
            KVStoreConfig(**bad)
