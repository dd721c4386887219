"""More than one host: each role on a host of its own, made of Linux network namespaces (tests/netns.py).

    host-redis 10.77.0.2   redis-server
    host-gw    10.77.0.3   gateway, started with no worker flags (--prefill "" --decode "")
    host-kv    10.77.0.4   kvstore, no shared-memory arena (--shm-arena-gb 0)
    host-p1    10.77.0.5   prefill, bound to 0.0.0.0, --advertise-address 10.77.0.5:50061
    host-d1    10.77.0.6   decode, bound to 0.0.0.0, --advertise-address 10.77.0.6:50062
    host-d2    10.77.0.7   decode, bound to 10.77.0.7 (advertised as bound)

Hosts reach each other through veth pairs on a bridge (the test process sits on the bridge,
10.77.0.1), so nothing is on a shared loopback and KV blocks cross a network as gRPC chunks. The
namespaces still share /dev/shm, which is why the arena is off: otherwise the kvstore's clients would
find its probe file and move payloads through shared memory, as on one host. The tests, in file order:
  1. discovery: the workers registered in Redis under their advertised addresses, the gateway
     found them there and routes to them;
  2. routing: requests are served (greedy tokens equal to the offline engine's); a prompt whose
     prefix one decode host computed goes to that host (each host holds one prefix), which imports
     only the blocks it lacks, and the prefill host's prefix cache serves a repeated prefix;
  3. transfer: a new prompt's blocks go from the prefill host to the kvstore host and on to the
     decode host: the bytes counted by the prefill's, the kvstore's and the decode's
     kv_transfer_bytes are equal, are the blocks' size, and crossed the hosts' links;
  4. failover: the decode host serving a stream is killed whole (SIGKILL to every process in it):
     the stream goes on on the other decode host, token for token equal to a fault-free run, the
     gateway drops the dead host and serves new requests.

Needs root (CAP_NET_ADMIN) and `ip netns` (CI runs as root); elsewhere the module is skipped with
the reason. A developer without root runs it with sudo, or in a user namespace of their own where
they are root, with a private /run for the namespaces' mount points:

    sudo -E .venv/bin/python -m pytest tests/e2e/test_multihost.py
    unshare -rnm sh -c 'mount -t tmpfs tmpfs /run && .venv/bin/python -m pytest tests/e2e/test_multihost.py'

Setup removes what a crashed earlier run left (names start with "ssmh-"); teardown kills every
host's processes and removes namespaces, veths and bridge, also when a test failed.
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import netns
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from services_fixture import wait_for
from splitserve import SamplingParams, lifeline
from splitserve.client import generate, stream_generate
from splitserve.engine.hashing import block_hashes
from splitserve.ownership.membership import WorkerRecord
from splitserve.ownership.redis_server import redis_server_binary
from splitserve.ownership.registry import OwnershipRegistry
from splitserve.rpc import channel, wait_until_serving
from splitserve.v1 import (
    decode_pb2,
    decode_pb2_grpc,
    kvstore_pb2,
    kvstore_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)
from splitserve.wire import sampling_to_proto

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host tier skipped: {REASON}")
if REASON is not None:  # shown in the warnings summary of every run, not only with -rs
    warnings.warn(f"tests/e2e/test_multihost.py skipped: {REASON} (its docstring says how to run it)")

BLOCK = 16
PORTS = {"redis": 6379, "gw": 50051, "kv": 50070, "p1": 50061, "d1": 50062, "d2": 50062}
HTTP_PORT, METRICS_PORT = 8000, 9100
DECODES = ("d1", "d2")
WORKER_FLAGS = ("--dtype", "float32", "--kv-cache-memory-gb", "0.1", "--metrics-port", str(METRICS_PORT))


@dataclass
class Cluster:
    net: netns.Network
    logs: Path

    def ip(self, host: str) -> str:
        return self.net.hosts[host].ip

    def address(self, host: str) -> str:
        return f"{self.ip(host)}:{PORTS[host]}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.address('redis')}/0"

    def log(self, host: str) -> str:
        return (self.logs / f"{host}.log").read_text(errors="replace")

    def start(self, host: str, *argv: str) -> None:
        env = lifeline.child_env({**os.environ, "PYTHONUNBUFFERED": "1", "GOMP_SPINCOUNT": "10000"})
        self.net.hosts[host].popen([sys.executable, "-m", "splitserve.launch.cli", *argv], self.logs / f"{host}.log",
                                   env)

    def health(self) -> dict:
        url = f"http://{self.ip('gw')}:{HTTP_PORT}/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def metric(self, host: str, name: str, **labels: str) -> float:
        """A counter of the host's /metrics (the gateway's is on its HTTP port), 0 when absent."""
        port = HTTP_PORT if host == "gw" else METRICS_PORT
        with urllib.request.urlopen(f"http://{self.ip(host)}:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    def load(self, host: str) -> prefill_pb2.LoadResponse:
        with channel(self.address(host)) as ch:
            stub = prefill_pb2_grpc.PrefillStub(ch) if host.startswith("p") else decode_pb2_grpc.DecodeStub(ch)
            return stub.GetLoad(prefill_pb2.LoadRequest(), timeout=10)


def _start_redis(cluster: Cluster) -> None:
    data = cluster.logs / "redis-data"
    data.mkdir()
    cmd = [redis_server_binary(), "--bind", cluster.ip("redis"), "--port", str(PORTS["redis"]), "--save", "",
           "--appendonly", "no", "--protected-mode", "no", "--dir", str(data), "--daemonize", "no"]
    cluster.net.hosts["redis"].popen(lifeline.wrap(cmd), cluster.logs / "redis.log", dict(os.environ))
    client = redis.Redis(host=cluster.ip("redis"), port=PORTS["redis"], socket_timeout=1)

    def answers() -> bool:
        try:
            return client.ping()
        except redis.RedisError:
            return False

    wait_for(answers, 20, "redis-server on host-redis to answer")


def _start_roles(c: Cluster) -> None:
    url, kv = c.redis_url, c.address("kv")
    c.start("kv", "kvstore", "--host", "0.0.0.0", "--port", str(PORTS["kv"]), "--advertise-address", kv,
            "--shm-arena-gb", "0", "--capacity-gb", "0.5", "--redis-url", url, "--metrics-port", str(METRICS_PORT))
    c.start("p1", "prefill", "--host", "0.0.0.0", "--port", str(PORTS["p1"]), "--advertise-address",
            c.address("p1"), "--redis-url", url, "--kvstore", kv, *WORKER_FLAGS)
    c.start("d1", "decode", "--host", "0.0.0.0", "--port", str(PORTS["d1"]), "--advertise-address",
            c.address("d1"), "--redis-url", url, "--kvstore", kv, *WORKER_FLAGS)
    c.start("d2", "decode", "--host", c.ip("d2"), "--port", str(PORTS["d2"]), "--redis-url", url, "--kvstore", kv,
            *WORKER_FLAGS)
    c.start("gw", "gateway", "--host", "0.0.0.0", "--port", str(PORTS["gw"]), "--http-port", str(HTTP_PORT),
            "--prefill", "", "--decode", "", "--redis-url", url)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("multihost")
    net = netns.Network("ssmh", "10.77.0")
    try:
        net.open()
        for name in ("redis", "gw", "kv", "p1", "d1", "d2"):
            net.add_host(name)
        c = Cluster(net, logs)
        _start_redis(c)
        _start_roles(c)
        wait_until_serving(c.address("gw"), timeout_s=240)  # it serves once a prefill and a decode answered
        wait_for(lambda: c.health()["decode"]["healthy"] == 2, 240, "both decode hosts healthy in the gateway")
    except BaseException:
        for log in sorted(logs.glob("*.log")):  # why a host did not come up
            print(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        net.close()
        raise
    try:
        yield c
    finally:
        net.close()
        print(f"multi-host logs (one per host): {logs}")


def greedy(n: int) -> dict:
    return {"max_tokens": n, "temperature": 0.0, "ignore_eos": True}


def reference(llm, prompt, n: int) -> list[int]:
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return out.token_ids


def long_ids(llm, tag: str, n: int) -> list[int]:
    """`n` prompt tokens that share not even their first token with another tag's (the prefix
    cache matches single tokens too); `tag` one word."""
    text = f"{tag} ledger: " + " ".join(f"row {i} lists {i * 5 % 11} {tag} barrels;" for i in range(120))
    ids = llm.tokenizer.encode(text)[:n]
    assert len(ids) == n
    return ids


# ------------------------------------------------------------------------------- 1. discovery
@pytest.mark.timeout(300)  # includes the hosts' start
def test_workers_register_under_their_advertised_addresses_and_the_gateway_finds_them(cluster):
    client = redis.Redis.from_url(cluster.redis_url)
    records = {k.decode(): WorkerRecord.decode(client.get(k)) for k in client.scan_iter("ss:wrk:*")}
    expected = {"prefill": ["p1"], "decode": ["d1", "d2"]}
    assert sorted(records) == sorted(f"ss:wrk:{role}:{cluster.address(h)}" for role, hs in expected.items()
                                     for h in hs), "a worker registered an address other hosts cannot dial"
    assert all(r.state == "serving" and key == f"ss:wrk:{r.role}:{r.address}" for key, r in records.items())
    for role, hosts in expected.items():
        for host in hosts:  # its owner id in Redis names the same address
            assert cluster.load(host).worker_id == f"{role}:{cluster.address(host)}"
            assert f"worker discovered: role={role} address={cluster.address(host)}" in cluster.log("gw")
    health = cluster.health()
    assert health["prefill"] == {"healthy": 1, "draining": 0, "total": 1}
    assert health["decode"] == {"healthy": 2, "draining": 0, "total": 2}
    assert health["redis"] == "ok"


# ---------------------------------------------------------------------------------- 2. routing
def _warm(cluster: Cluster, host: str, ids: list[int]) -> None:
    """The decode host computes `ids` itself (a direct Decode call, no kvstore): it then holds,
    and records in Redis, the prompt's full blocks."""
    with channel(cluster.address(host)) as ch:
        msgs = list(decode_pb2_grpc.DecodeStub(ch).Decode(decode_pb2.DecodeRequest(
            request_id=f"warm-{host}", prompt_token_ids=ids, output_token_ids=[ids[-1]],
            sampling=sampling_to_proto(SamplingParams(temperature=0, max_tokens=2))), timeout=60))
    assert msgs[-1].finish_reason == "length"


@pytest.mark.timeout(200)
def test_a_prefix_one_decode_host_holds_is_routed_to_it_and_requests_are_served(cluster, llm_f32):
    prefixes = {host: long_ids(llm_f32, word, 4 * BLOCK) for host, word in zip(DECODES, ("Harbour", "Orchard"))}
    registry = OwnershipRegistry(cluster.redis_url)
    for host, prefix in prefixes.items():  # d1 holds one prefix, d2 the other: no tie-break serves both
        _warm(cluster, host, prefix + llm_f32.tokenizer.encode(" warm"))
        owner = f"decode:{cluster.address(host)}"
        hashes = block_hashes(prefix, BLOCK, llm_f32.engine.namespace(None))
        wait_for(lambda owner=owner, hashes=hashes: all(owner in o for o in registry.owners(hashes)), 10,
                 f"{owner} recorded in Redis")
    time.sleep(1.5)  # the gateway polls loads every 0.5 s: let it see both idle again
    for repeat in range(2):
        for host, prefix in prefixes.items():
            ids = prefix + llm_f32.tokenizer.encode(f" Question {repeat} for {host}: which barrels come first?")
            before = {h: cluster.load(h) for h in DECODES}
            got, _, final = generate(cluster.address("gw"), token_ids=ids, sampling=greedy(6), timeout_s=120)
            after = {h: cluster.load(h) for h in DECODES}
            assert got == reference(llm_f32, ids, 6)
            served = [h for h in DECODES if after[h].prefix_cache_queries > before[h].prefix_cache_queries]
            assert served == [host], f"a prompt whose prefix {host} holds went to {served}"
            # the prefix came from its own cache, only the new full blocks from the kvstore host
            assert after[host].num_imported_blocks - before[host].num_imported_blocks == len(ids) // BLOCK - 4
            assert after[host].num_recomputed == before[host].num_recomputed
            # the prefill host computed the prefix once (first round), then served it from its cache
            assert final.usage.cached_tokens == (0 if repeat == 0 else 4 * BLOCK)


# --------------------------------------------------------------------------------- 3. transfer
def _transfer_counters(cluster: Cluster) -> dict:
    name = "splitserve_kv_transfer_bytes_total"
    hosts = ("kv", "p1", *DECODES)
    return {"kv_put": cluster.metric("kv", name, direction="put"), "kv_get": cluster.metric("kv", name, direction="get"),
            "p1_put": cluster.metric("p1", name, direction="put"),
            **{f"{h}_get": cluster.metric(h, name, direction="get") for h in DECODES},
            **{f"{h}_link": cluster.net.hosts[h].link_bytes() for h in hosts},
            **{f"{h}_load": cluster.load(h) for h in ("p1", *DECODES)}}


@pytest.mark.timeout(200)
def test_kv_blocks_cross_the_network_from_the_prefill_host_to_the_decode_host_as_grpc_bytes(cluster, llm_f32):
    with channel(cluster.address("kv")) as ch:
        info = kvstore_pb2_grpc.KVStoreStub(ch).Info(kvstore_pb2.InfoRequest(), timeout=10)
    assert info.shm_dir == "", "the kvstore offers a shared-memory path: blocks would not cross the network"
    n = 6
    ids = long_ids(llm_f32, "Quarry", n * BLOCK + 5)
    before = _transfer_counters(cluster)
    got, _, _ = generate(cluster.address("gw"), token_ids=ids, sampling=greedy(4), timeout_s=120)
    after = _transfer_counters(cluster)
    assert got == reference(llm_f32, ids, 4)
    (decode,) = [h for h in DECODES if after[f"{h}_load"].num_imported_blocks > before[f"{h}_load"].num_imported_blocks]
    assert after[f"{decode}_load"].num_imported_blocks - before[f"{decode}_load"].num_imported_blocks == n
    assert after["p1_load"].num_blocks_put - before["p1_load"].num_blocks_put == n
    delta = {k: after[k] - before[k] for k in ("kv_put", "kv_get", "p1_put", "d1_get", "d2_get")}
    payload = n * llm_f32.engine.kv_cache.bytes_per_block  # float32 on both sides
    assert delta == {"kv_put": payload, "kv_get": payload, "p1_put": payload, f"{decode}_get": payload,
                     **{f"{h}_get": 0 for h in DECODES if h != decode}}
    # ... and those bytes went through the hosts' links (received, sent)
    kv_rx, kv_tx = (a - b for a, b in zip(after["kv_link"], before["kv_link"]))
    p1_tx = after["p1_link"][1] - before["p1_link"][1]
    d_rx = after[f"{decode}_link"][0] - before[f"{decode}_link"][0]
    assert min(kv_rx, kv_tx, p1_tx, d_rx) >= payload, (kv_rx, kv_tx, p1_tx, d_rx, payload)
    owners = OwnershipRegistry(cluster.redis_url).owners(block_hashes(ids, BLOCK, llm_f32.engine.namespace(None)))
    assert all(f"kvstore:{cluster.address('kv')}" in o for o in owners)
    for host in ("p1", *DECODES):
        assert "same host, payloads go through" not in cluster.log(host)


# --------------------------------------------------------------------------------- 4. failover
@pytest.mark.timeout(200)
def test_a_decode_host_killed_mid_stream_the_stream_goes_on_on_the_other(cluster, llm_f32):
    prompt = "Tell me a long story about a lighthouse keeper who finds a message in a bottle."
    ref = reference(llm_f32, prompt, 64)
    chunks, killed = [], None
    for msg in stream_generate(cluster.address("gw"), prompt=prompt, sampling=greedy(64), timeout_s=120,
                               request_id="multihost-failover"):
        chunks.append(msg)
        if killed is None and sum(len(c.token_ids) for c in chunks) >= 4:
            received = sum(len(c.token_ids) for c in chunks)
            host = wait_for(lambda: next((h for h in DECODES if cluster.load(h).num_running), None), 10,
                            "a decode host running the stream", interval_s=0.01)
            pids = cluster.net.hosts[host].kill()
            killed = (host, pids, received)
    assert killed is not None, "the stream ended before 4 tokens"
    host, pids, received = killed
    other = next(h for h in DECODES if h != host)
    assert pids and not cluster.net.hosts[host].pids()
    assert received < 64 - 8, f"the kill came too late to test a resume ({received} tokens in)"
    assert [t for c in chunks for t in c.token_ids] == ref  # no gap, no duplicate
    assert chunks[-1].finish_reason == "length" and not any(c.finish_reason for c in chunks[:-1])
    resumed = [line for line in cluster.log("gw").splitlines()
               if "decode resume:" in line and "request_id=multihost-failover" in line]
    assert resumed and f"worker={cluster.address(host)}" in resumed[0], resumed
    # the gateway drops the dead host (its lease lapses, its polls fail); new requests go to the other
    wait_for(lambda: cluster.health()["decode"] == {"healthy": 1, "draining": 0, "total": 1}, 15,
             f"the gateway to drop host-{host}")
    before = cluster.load(other).prefix_cache_queries
    got, _, _ = generate(cluster.address("gw"), prompt="After the storm,", sampling=greedy(6), timeout_s=60)
    assert got == reference(llm_f32, "After the storm,", 6)
    assert cluster.load(other).prefix_cache_queries > before
