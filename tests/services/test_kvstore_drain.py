"""The kvstore's drain on SIGTERM, on a real `splitserve kvstore` process (gRPC streams, no Redis):
new puts are refused with UNAVAILABLE while blocks under lease stay readable, and the process
exits 0 once no lease is left (expired or released), or after --drain-timeout-s at the latest."""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve import rpc
from splitserve.engine.kv_cache import KVCache
from splitserve.kvstore.protocol import block_chunks
from splitserve.launch.up import free_port
from splitserve.transfer import block as kv_block
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

DIMS = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4)


def block(seed: int) -> tuple[bytes, bytes, bytes]:
    """(hash, header bytes, payload) of one random float32 block under a fresh hash."""
    cache = KVCache(**DIMS, num_blocks=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for t in cache.k_caches + cache.v_caches:
        t.copy_(torch.randn(t.shape, generator=g))
    block_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
    header, payload = kv_block.encode_block(cache, 0, block_hash, "test-model")
    return block_hash, header.to_bytes(), payload


def put(stub, b, lease_id: str = "", lease_ttl_s: float = 0.0):
    return stub.Put(block_chunks(*b, 1 << 20, lease_id, lease_ttl_s), timeout=10)


def get(stub, block_hash: bytes, release_lease_id: str = "") -> tuple[bytes, bytes] | None:
    header, data = b"", []
    for chunk in stub.Get(kvstore_pb2.GetRequest(block_hashes=[block_hash], release_lease_id=release_lease_id),
                          timeout=10):
        if chunk.missing:
            return None
        header = chunk.header or header
        data.append(chunk.data)
    return header, b"".join(data)


@pytest.fixture
def kvstore():
    """A kvstore process (drain timeout 20 s unless a test passes its own flags) and its stub."""
    procs = []

    def start(*flags: str):
        address = f"127.0.0.1:{free_port()}"
        proc = subprocess.Popen([sys.executable, "-m", "splitserve.launch.cli", "kvstore", "--port",
                                 address.rsplit(":", 1)[1], "--host", "127.0.0.1", "--metrics-port", "-1",
                                 "--shm-dir", "", "--capacity-gb", "0.01", "--drain-timeout-s", "20", *flags],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        rpc.wait_until_serving(address, timeout_s=60)
        ch = rpc.channel(address)
        return proc, kvstore_pb2_grpc.KVStoreStub(ch), health_pb2_grpc.HealthStub(ch)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def exit_after_sigterm(proc, sent: float, timeout_s: float = 30.0) -> float:
    """Seconds from `sent` to the process's exit, asserting it exited 0."""
    out, _ = proc.communicate(timeout=timeout_s)
    took = time.monotonic() - sent
    assert proc.returncode == 0, out[-3000:]
    assert "kvstore draining: 1 lease(s) open" in out, out[-3000:]
    return took


def test_leased_blocks_stay_readable_new_puts_refused_exit_when_the_lease_expires(kvstore):
    proc, stub, health = kvstore()
    leased, plain, late = block(1), block(2), block(3)
    put(stub, plain)
    put(stub, leased, lease_id="handoff-1", lease_ttl_s=3.0)
    lease_end = time.monotonic() + 3.0
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    time.sleep(0.3)  # the signal is polled every 0.5 s
    status = None
    while status != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < sent + 5:
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert get(stub, leased[0]) == (leased[1], leased[2])  # byte-identical during the drain
    assert get(stub, plain[0]) == (plain[1], plain[2])
    with pytest.raises(grpc.RpcError) as refused:
        put(stub, late)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "kvstore draining" in refused.value.details() and "no new blocks" in refused.value.details()
    assert proc.poll() is None  # still draining: the lease holds
    took = exit_after_sigterm(proc, sent)
    assert time.monotonic() >= lease_end - 0.2 and took < 10, took  # at the lease's end, not the 20 s timeout


def test_a_released_lease_ends_the_drain_at_once(kvstore):
    proc, stub, _ = kvstore()
    leased = block(4)
    put(stub, leased, lease_id="handoff-2", lease_ttl_s=60.0)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    time.sleep(1.0)
    assert proc.poll() is None
    assert get(stub, leased[0], release_lease_id="handoff-2") == (leased[1], leased[2])  # the decode's fetch
    took = exit_after_sigterm(proc, sent)
    assert took < 5, took


def test_the_drain_timeout_bounds_a_long_lease(kvstore):
    proc, stub, _ = kvstore("--drain-timeout-s", "1.5")
    put(stub, block(5), lease_id="handoff-3", lease_ttl_s=60.0)
    proc.send_signal(signal.SIGTERM)
    took = exit_after_sigterm(proc, time.monotonic())
    assert 1.5 <= took < 6, took
