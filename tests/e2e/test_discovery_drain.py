"""Workers that join and leave a running stack: discovery through Redis, and the graceful drain.

One `splitserve up` (one prefill, two decode workers, decode leases of 2 s and a 3 s drain
timeout) serves the module; the tests run in file order:
  1. A decode worker started by hand after the gateway, named nowhere but in its registration,
     is routed to within a scan and a poll of answering its health check; killed with -9 (no
     deregistration), the gateway drops it within its lease plus a scan, with its ownership entries.
  2. SIGTERM to a decode worker serving streams under load: its health turns NOT_SERVING, new
     requests go elsewhere, the streams it cannot finish within the drain timeout are resumed on
     the other decode worker, and every stream ends with the text of a fault-free run of the same
     requests (greedy) and no error; the worker exits 0 within the timeout, and `up` counts it as
     drained, not crashed.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services_fixture import start_stack, wait_for
from splitserve.client import generate, stream_generate
from splitserve.launch.up import free_port
from splitserve.rpc import channel, wait_until_serving
from splitserve.v1 import decode_pb2_grpc, prefill_pb2

LEASE_S = 2.0  # the decode workers' registration TTL
DISCOVERY_S = 1.0  # the gateway's scan interval (its default)
DRAIN_S = 1.0  # the decode workers' drain timeout: well inside a drained stream's run (test 2)
DECODES = ("decode-0", "decode-1")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack("--kv-cache-memory-gb", "0.1", "--prefill-workers", "1", "--decode-workers", "2",
                    "--decode-registration-ttl-s", str(LEASE_S), "--decode-drain-timeout-s", str(DRAIN_S))
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop()
        path = tmp_path_factory.mktemp("discovery_drain") / "stack.log"
        path.write_text("\n".join(s.log) + "\n")
        print(f"splitserve up log: {path}")
    assert s.proc.returncode == 0, "\n".join(s.log[-40:])


def health(stack) -> dict:
    try:
        with urllib.request.urlopen(stack.http_base.removesuffix("/v1") + "/health", timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def decode_load(address: str) -> prefill_pb2.LoadResponse:
    with channel(address) as ch:
        return decode_pb2_grpc.DecodeStub(ch).GetLoad(prefill_pb2.LoadRequest(), timeout=5)


def grpc_status(address: str) -> int:
    with channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def logged_at(line: str) -> float:
    """Unix time of a log line of `up` or its children ("2026-12-04 07:44:52,272 LEVEL ...")."""
    return datetime.datetime.strptime(" ".join(line.split()[:2]), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def greedy(n: int) -> dict:
    return {"max_tokens": n, "temperature": 0.0, "ignore_eos": True}


def both_decodes_healthy(stack) -> None:
    """Until the gateway routes to exactly decode-0 and decode-1 (after a restart: a model load)."""
    wait_for(lambda: health(stack)["decode"] == {"healthy": 2, "draining": 0, "total": 2}, 240,
             "both decode workers healthy in the gateway's /health", interval_s=0.5)


def running(stack) -> dict[str, int] | None:
    """Sequences running on each decode worker, once the four streams all run."""
    loads = {name: decode_load(stack.roles[name]).num_running for name in DECODES}
    return loads if sum(loads.values()) >= 4 else None


# ------------------------------------------------------------------- 1. a worker joins, then dies
@pytest.mark.timeout(400)
def test_worker_started_after_the_gateway_serves_and_a_killed_one_is_dropped(stack):
    both_decodes_healthy(stack)
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve.launch.cli", "decode", "--host", "127.0.0.1", "--port", str(port),
         "--metrics-port", "-1", "--redis-url", stack.redis_url, "--kvstore", stack.roles["kvstore"],
         "--kv-cache-memory-gb", "0.1", "--registration-ttl-s", str(LEASE_S), "--log-level", "WARNING"],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "GOMP_SPINCOUNT": "10000"})
    try:
        wait_until_serving(address, timeout_s=240)  # its model load: not what is measured
        ready = time.monotonic()
        wait_for(lambda: health(stack)["decode"] == {"healthy": 3, "draining": 0, "total": 3}, 10,
                 "the gateway to route to the new worker", interval_s=0.1)
        joined_s = time.monotonic() - ready
        assert joined_s < DISCOVERY_S + 2.5, f"discovered {joined_s:.1f} s after it served"
        # It serves: concurrent requests spread over the three decode workers (the router counts
        # in-flight sequences), so the new one runs some.
        # (prompts of several full blocks, which the decode workers record as theirs in Redis)
        prompts = [f"Discovery check {i}: " + "list the colours of the rainbow, one by one, and say why " * 2
                   for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda p: generate(stack.gateway, prompt=p, sampling=greedy(6), timeout_s=120),
                                    prompts))
        assert all(len(r.token_ids) == 6 for r in results)
        assert decode_load(address).max_batch_size >= 1, "no request reached the discovered worker"
        client = redis.Redis.from_url(stack.redis_url)
        owner = f"decode:{address}"
        assert client.exists(f"ss:own:{owner}"), "the new worker recorded no blocks"
        proc.kill()  # -9: no deregistration, its lease must lapse
        proc.wait()
        killed = time.monotonic()
        wait_for(lambda: health(stack)["decode"]["total"] == 2, LEASE_S + DISCOVERY_S + 3,
                 "the gateway to drop the killed worker", interval_s=0.1)
        dropped_s = time.monotonic() - killed
        assert dropped_s <= LEASE_S + DISCOVERY_S + 1.5, f"dropped {dropped_s:.1f} s after the kill"
        wait_for(lambda: not client.exists(f"ss:own:{owner}"), 5, "its ownership entries to be dropped")
        assert not any(owner.encode() in client.smembers(k) for k in client.scan_iter("ss:blk:*"))
        assert not client.exists(f"ss:wrk:decode:{address}")
        client.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ 2. SIGTERM drains under load
@pytest.mark.timeout(400)
def test_sigterm_drains_a_decode_worker_under_load_without_a_client_error(stack):
    both_decodes_healthy(stack)
    prompts = [f"Write a long letter to a friend about {topic}." for topic in ("the sea", "a garden", "winter",
                                                                               "an old clock")]
    n = 320  # tokens a stream: 2-3 s of decode with four at once, so some outlive the 1 s drain timeout

    def run(prompt: str, i: int, tag: str) -> tuple[list[int], str, str]:
        ids, text, final = [], [], None
        for msg in stream_generate(stack.gateway, prompt=prompt, sampling=greedy(n), timeout_s=180,
                                   request_id=f"drain-{tag}-{i}"):
            ids += msg.token_ids
            text.append(msg.text)
            final = msg
        return ids, "".join(text), final.finish_reason

    with ThreadPoolExecutor(4) as pool:  # the fault-free run, concurrent as the drained one
        reference = list(pool.map(lambda a: run(*a, "ref"), [(p, i) for i, p in enumerate(prompts)]))
    assert all(len(ids) == n and reason == "length" for ids, _, reason in reference)

    since = len(stack.log)
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(run, p, i, "load") for i, p in enumerate(prompts)]
        loads = wait_for(lambda: running(stack), 60, "the four streams running on the decode workers",
                         interval_s=0.05)
        name = max(loads, key=loads.get)  # the worker serving the most of them
        pid = stack.pid(name)
        os.kill(pid, signal.SIGTERM)
        signalled = time.time()
        wait_for(lambda: grpc_status(stack.roles[name]) == health_pb2.HealthCheckResponse.NOT_SERVING, 2,
                 f"{name}'s health to turn NOT_SERVING")
        assert decode_load(stack.roles[name]).draining
        # A request that arrives during the drain is served elsewhere.
        extra = generate(stack.gateway, prompt="A short note during a drain.", sampling=greedy(4), timeout_s=60)
        assert len(extra.token_ids) == 4
        results = [f.result() for f in futures]  # any client error raises here
    assert results == reference, "a drained stream differs from the fault-free run"
    (drained,) = wait_for(lambda: [line for line in stack.log[since:] if f"{name} drained and exited (exit code 0)"
                                   in line], DRAIN_S + 10, f"{name} to exit 0")
    exited_s = logged_at(drained) - signalled  # `up` notices an exit within its 0.5 s watch
    assert 0 < exited_s < DRAIN_S + 6, f"{name} took {exited_s:.1f} s to drain (timeout {DRAIN_S} s)"
    assert not any(f"{name} exited" in line for line in stack.log[since:]), "the drain counted as a crash"
    resumed = [line for line in stack.log[since:] if "decode resume:" in line and "request_id=drain-load" in line]
    assert loads[name] >= 1 and resumed, "no stream outlived the drain timeout: the hand-back path went untested"
    assert all(f"worker={stack.roles[name]}" in line for line in resumed), resumed
