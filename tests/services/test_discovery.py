"""Worker discovery through a real Redis, without models: a worker's registration and its lease
(splitserve.ownership.membership), the gateway following registrations into its worker pool and
router, dropping a gone worker's routing state and ownership entries (gateway/discovery.py), and
how `splitserve up` treats a worker that drained (exit 0) against one that crashed."""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import pytest
import redis
from services_fixture import wait_for
from splitserve.config.gateway import GatewayConfig, RouterConfig
from splitserve.config.worker import WorkerConfig
from splitserve.gateway.discovery import Discovery
from splitserve.gateway.router import DECODE, PREFILL, Router
from splitserve.gateway.workers import WorkerPool
from splitserve.ownership.membership import (
    DRAINING,
    SERVING,
    WorkerRecord,
    WorkerRegistration,
)
from splitserve.ownership.registry import OwnershipRegistry
from splitserve.worker import advertised_address


def record(role: str, address: str, state: str = SERVING) -> WorkerRecord:
    return WorkerRecord(role, address, "model-x", 640, 64, state)


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    for key in c.scan_iter("ss:*"):
        c.delete(key)
    yield c
    c.close()


def test_record_round_trips_and_bad_records_name_the_field():
    r = record("decode", "10.0.0.7:50062", DRAINING)
    assert WorkerRecord.decode(r.encode()) == r and r.key == "ss:wrk:decode:10.0.0.7:50062" and r.draining
    for raw, word in ((b"{}", "role"), (b'{"role": "gateway"}', "role"), (b"not json", "bad worker registration")):
        with pytest.raises(ValueError, match=word):
            WorkerRecord.decode(raw)
    with pytest.raises(ValueError, match="HOST:PORT"):
        record("prefill", "nohost")
    with pytest.raises(ValueError, match="state"):
        record("prefill", "h:1", "gone")


def test_registration_is_a_renewed_lease_that_drains_and_deregisters(client, redis_url):
    reg = WorkerRegistration(redis_url, record("decode", "127.0.0.1:50999"), ttl_s=0.6).start()
    key = reg.record.key
    try:
        time.sleep(1.0)  # past the TTL: only the renewals (every 0.2 s) keep it
        assert client.exists(key) and 0 < client.pttl(key) <= 600
        reg.set_draining()
        assert WorkerRecord.decode(client.get(key)).state == DRAINING
    finally:
        reg.stop(deregister=True)
    assert not client.exists(key)
    # A worker that dies without deregistering: its key lapses within one TTL.
    reg = WorkerRegistration(redis_url, record("prefill", "127.0.0.1:50998"), ttl_s=0.6).start()
    reg.stop(deregister=False)
    assert client.exists(reg.record.key)
    wait_for(lambda: not client.exists(reg.record.key), 1.0, "the lapsed registration to expire", interval_s=0.05)


def test_gateway_config_needs_static_workers_only_without_discovery():
    GatewayConfig(prefill="", decode="", redis_url="redis://r:1/0")  # registered workers only
    for kwargs in ({}, {"redis_url": "redis://r:1/0", "discovery_interval_s": 0.0}):
        with pytest.raises(ValueError, match="prefill and decode must each name"):
            GatewayConfig(prefill="", decode="", **kwargs)
    with pytest.raises(ValueError, match="discovery_interval_s"):
        GatewayConfig(discovery_interval_s=-1.0)
    with pytest.raises(ValueError, match="drain_timeout_s"):
        WorkerConfig(drain_timeout_s=-1.0)


def test_advertised_address_is_reachable_never_a_wildcard():
    assert advertised_address("10.1.2.3", 50061) == "10.1.2.3:50061"
    assert advertised_address("127.0.0.1", 7) == "127.0.0.1:7"
    for wildcard in ("0.0.0.0", "::", ""):
        host, _, port = advertised_address(wildcard, 50061).rpartition(":")
        assert port == "50061" and host not in ("0.0.0.0", "::", "", "[::]"), host


LOAD = argparse.Namespace(worker_id="decode:d:2", num_running=0, num_waiting=0, queued_tokens=0, kv_cache_usage=0.0,
                          num_free_blocks=100, num_total_blocks=100, draining=False)  # a GetLoad answer's fields


def test_router_adds_and_forgets_workers_and_skips_draining_ones():
    router = Router(RouterConfig(), 16, ["p:1"], ["d:1"])
    load = LOAD
    router.observe_load(DECODE, "d:1", argparse.Namespace(**{**vars(load), "worker_id": "decode:d:1", "num_running": 5}))
    router.add_worker(DECODE, "d:2")
    assert [w.address for w in router.workers(DECODE)] == ["d:1", "d:2"]
    assert router.pick_decode([], [], 1).worker.address == "d:1"  # d:2 unhealthy until it answers
    router.observe_load(DECODE, "d:2", load)
    assert router.pick_decode([], [], 1).worker.address == "d:2"  # fewer sequences
    router.observe_load(DECODE, "d:2", argparse.Namespace(**{**vars(load), "draining": True}))
    assert router.worker(DECODE, "d:2").healthy and not router.worker(DECODE, "d:2").routable
    assert router.pick_decode([], [], 1).worker.address == "d:1"  # a draining worker gets nothing new
    router.remove_worker(DECODE, "d:1")
    with pytest.raises(RuntimeError, match=r"none of 1 is healthy \(1 draining\)"):
        router.pick_decode([], [], 1)
    assert not router.has_worker(DECODE, "d:1")


def test_discovery_follows_registrations_into_the_pool_and_drops_gone_workers(client, redis_url):
    ownership = OwnershipRegistry(redis_url)
    hashes = [bytes([i]) * 32 for i in range(3)]
    ownership.record("decode:127.0.0.1:7002", hashes)
    ownership.record("prefill:127.0.0.1:7001", hashes[:1])

    async def scenario():
        pool = WorkerPool(["127.0.0.1:7001"], [], RouterConfig(), 0.5, 0.5)
        pool.router = Router(RouterConfig(), 16, pool.addresses(PREFILL), [])  # as start() builds it
        discovery = Discovery(redis_url, pool, interval_s=3600)
        try:
            regs = [WorkerRegistration(redis_url, r, ttl_s=30).start() for r in (
                record("prefill", "127.0.0.1:7001"), record("decode", "127.0.0.1:7002"),
                record("colocated", "127.0.0.1:7003"))]
            await discovery.sync()
            assert sorted(pool.addresses(PREFILL)) == ["127.0.0.1:7001", "127.0.0.1:7003"]
            assert sorted(pool.addresses(DECODE)) == ["127.0.0.1:7002", "127.0.0.1:7003"]
            assert [w.address for w in pool.router.workers(DECODE)] == ["127.0.0.1:7002", "127.0.0.1:7003"]
            regs[1].set_draining()
            await discovery.sync()
            assert pool.router.worker(DECODE, "127.0.0.1:7002").draining
            pool.router.observe_load(DECODE, "127.0.0.1:7002", LOAD)  # it answers its polls
            for reg in regs[:2]:  # the static prefill worker and the decode worker leave
                reg.stop(deregister=True)
            await discovery.sync()
            assert sorted(pool.addresses(DECODE)) == ["127.0.0.1:7002", "127.0.0.1:7003"]  # kept while it answers
            assert ownership.owners(hashes)[1] == {"decode:127.0.0.1:7002"}
            pool.router.observe_failure(DECODE, "127.0.0.1:7002", "GetLoad failed")
            await discovery.sync()
            assert sorted(pool.addresses(PREFILL)) == ["127.0.0.1:7001", "127.0.0.1:7003"]  # flags' workers stay
            assert pool.addresses(DECODE) == ["127.0.0.1:7003"]
            assert not pool.router.has_worker(DECODE, "127.0.0.1:7002")
            regs[2].stop(deregister=True)
            await discovery.sync()
            assert pool.addresses(DECODE) == [] and pool.addresses(PREFILL) == ["127.0.0.1:7001"]
        finally:
            await discovery.close()
            await pool.close()

    asyncio.run(scenario())
    # The gone workers' ownership entries went with them (the static one's too: its process is gone).
    assert ownership.owners(hashes) == [set(), set(), set()]
    assert not client.exists("ss:own:decode:127.0.0.1:7002")
    ownership.close()


def _launcher():
    from splitserve.launch.up import Launcher, add_up_args

    p = argparse.ArgumentParser()
    add_up_args(p)
    return Launcher(p.parse_args(["--redis-url", "redis://127.0.0.1:1/0"]))


@pytest.mark.parametrize("code, drained", [(0, True), (1, False)])
def test_up_starts_a_drained_worker_again_without_counting_a_crash(code, drained):
    from splitserve.launch.up import RESTART_DELAY_S, Child

    launcher = _launcher()
    child = Child("decode-0", [], "127.0.0.1:1", config=WorkerConfig(), restartable=True, restarts=3)
    child.proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    child.proc.wait()
    assert launcher._watch(child)
    delay = child.restart_at_s - time.monotonic()
    if drained:  # no growing back-off: a rolling restart is no crash loop
        assert child.restarts == 3 and delay <= RESTART_DELAY_S
    else:
        assert child.restarts == 4 and delay > 4 * RESTART_DELAY_S


def test_a_draining_worker_refuses_new_calls_with_unavailable_and_counts_running_ones():
    """splitserve.drain on a real gRPC server: a call admitted before the drain runs to its end
    (wait_idle sees it leave), one arriving after is UNAVAILABLE, which the gateway retries elsewhere."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from splitserve.drain import Drain

    drain, release = Drain("decode"), threading.Event()

    def handler(request, context):
        with drain.call(context):
            if request == b"slow":
                release.wait(10)
            return b"ok"

    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.T", {"Call": grpc.unary_unary_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/t.T/Call")
            slow = call.future(b"slow", timeout=10)
            wait_for(lambda: drain.num_calls == 1, 5, "the slow call to be admitted", interval_s=0.01)
            drain.begin()
            with pytest.raises(grpc.RpcError) as info:
                call(b"new", timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()
            assert not drain.wait_idle(0.1)  # the running call holds the drain
            release.set()
            assert slow.result() == b"ok" and drain.wait_idle(5) and drain.num_calls == 0
    finally:
        server.stop(0)
