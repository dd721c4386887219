"""Faults survived (DESIGN.md, failure policy), injected into real processes while requests run.

One `splitserve up --dtype bfloat16` with two prefill and two decode workers serves the module (a
start costs ~40 s here). It runs bfloat16 so that every answer checked here, resumed ones
included, also checks that greedy output does not depend on the path in the dtype whose K/V the
cache rounds (a float32 stack: tests/e2e/test_stack_path_invariance.py). Its decode workers
speculate (n-gram): a resumed stream must come out the same with proposals verified on both sides
of the failure. Its kvstore has no shared-memory arena, so every KV block travels as gRPC
chunks (the session stacks move them through shared memory on this one host). The tests run in file
order and each starts by waiting until every worker answers again, since `splitserve up` restarts
what an earlier test killed:
  1. Redis frozen (SIGSTOP), then back empty: /health says "degraded" (and splitserve_redis_up 0)
     within the gateway's probe interval, with no request; requests are served by load, every role
     rebuilds its ownership entries and prefix routing resumes.
  2. kill -9 of the decode worker serving a stream (gRPC): the stream goes on, token for token
     equal to a fault-free run in this process (greedy, bfloat16); test 6 does the same to an
     HTTP stream.
  3. kill -9 of a prefill worker in the middle of a prefill: the request is retried elsewhere.
  4. The killed workers are restarted on their ports and rejoin routing.
  5. Both decode workers dead: UNAVAILABLE / 503 at once, never a hang.
  6. kvstore killed: a decode worker whose fetch fails recomputes; requests complete correctly.
  7. SIGTERM while a restart backs off: everything stops, no process left behind.
Besides, without a stack: the restart back-off, `--no-restart`, and an ownership reporter that
notices an emptied Redis with no traffic.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services_fixture import SPECULATIVE, start_stack, wait_for
from splitserve import SamplingParams
from splitserve.client import generate, stream_generate
from splitserve.engine.hashing import block_hashes
from splitserve.rpc import channel, wait_until_serving
from splitserve.v1 import decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

Code = grpc.StatusCode
BLOCK = 16
PREFILLS, DECODES = ("prefill-0", "prefill-1"), ("decode-0", "decode-1")
KILLED: dict[str, int] = {}  # worker name -> pid killed by an earlier test (test 4 checks their restart)


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack("--dtype", "bfloat16", "--kv-cache-memory-gb", "0.1", "--prefill-workers", "2",
                    "--decode-workers", "2", "--decode-speculative-config", SPECULATIVE,
                    "--kvstore-shm-arena-gb", "0")
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop()
        # Every role's log of the whole module, for whoever has to explain a failure.
        path = tmp_path_factory.mktemp("faults") / "stack.log"
        path.write_text("\n".join(s.log) + "\n")
        print(f"splitserve up log: {path}")
    assert s.proc.returncode == 0, "\n".join(s.log[-40:])


@pytest.fixture(scope="module")
def model(stack) -> str:
    return http_json("GET", stack.http_base + "/models")[1]["data"][0]["id"]


_channels: dict[str, grpc.Channel] = {}
# Reconnect within half a second of a restarted worker listening again (gRPC's default back-off
# after refused connections grows to minutes).
_FAST_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500))


def load(stack, name: str) -> prefill_pb2.LoadResponse:
    """The worker's GetLoad answer (a fresh process after a restart: its counters start at 0)."""
    address = stack.roles[name]
    if address not in _channels:
        _channels[address] = channel(address, extra_options=_FAST_RECONNECT)
    ch = _channels[address]
    stub = prefill_pb2_grpc.PrefillStub(ch) if name.startswith("prefill") else decode_pb2_grpc.DecodeStub(ch)
    return stub.GetLoad(prefill_pb2.LoadRequest(), timeout=10)


def load_fails(stack, name: str) -> bool:
    """Whether the worker does not answer GetLoad (down, or still loading its model)."""
    try:
        load(stack, name)
    except grpc.RpcError:
        return True
    return False


def http_json(method: str, url: str, body: dict | None = None, timeout_s: float = 60) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(stack) -> tuple[int, dict]:
    return http_json("GET", stack.http_base.removesuffix("/v1") + "/health", timeout_s=10)


def wait_all_healthy(stack, timeout_s: float = 240) -> dict:
    """Until the gateway counts every worker healthy and the kvstore serves (restarts take a model
    load: ~20-40 s on two busy cores)."""
    def ready():
        code, body = health(stack)
        if code == 200 and body["prefill"]["healthy"] == 2 and body["decode"]["healthy"] == 2:
            return body if not any(load_fails(stack, n) for n in PREFILLS + DECODES) else None
        return None

    body = wait_for(ready, timeout_s, "every worker healthy in the gateway's /health", interval_s=0.5)
    wait_until_serving(stack.roles["kvstore"], timeout_s=timeout_s)
    return body


def kill(stack, name: str, sig: int = signal.SIGKILL) -> int:
    pid = wait_for(lambda: stack.pid(name), 30, f"a process serving {name}")
    os.kill(pid, sig)
    return pid


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def greedy(n: int) -> dict:
    return {"max_tokens": n, "temperature": 0.0, "ignore_eos": True}


def reference(llm, prompt, n: int):
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return out


def grpc_health(stack) -> int:
    """The gateway's grpc.health.v1 status for the whole server."""
    with channel(stack.gateway) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def redis_up(stack) -> float | None:
    """The gateway's splitserve_redis_up gauge (None when absent)."""
    with urllib.request.urlopen(stack.metrics["gateway"], timeout=30) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "splitserve_redis_up":
                return sample.value
    return None


def prefill_routes(stack, reason: str) -> float:
    """The gateway's routing_decisions{target="prefill", reason} counter."""
    with urllib.request.urlopen(stack.metrics["gateway"], timeout=30) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "splitserve_routing_decisions_total" and sample.labels.get("target") == "prefill"
                    and sample.labels.get("reason") == reason):
                return sample.value
    return 0.0


def sse(url: str, body: dict, request_id: str):
    """The JSON events of a streamed HTTP response, as they arrive (until [DONE])."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "x-request-id": request_id})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.status == 200
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                return
            if line.startswith("data: "):
                yield json.loads(line[6:])


def log_lines(stack, since: int, *needles: str) -> list[str]:
    return [line for line in list(stack.log)[since:] if all(n in line for n in needles)]


def long_ids(llm, tag: str, n: int) -> list[int]:
    """`n` prompt tokens that share no leading block with any other tag's."""
    text = f"Inventory {tag}: " + " ".join(f"shelf {i} holds {i * 7 % 13} {tag} crates;" for i in range(200))
    ids = llm.tokenizer.encode(text)[:n]
    assert len(ids) == n
    return ids


# ------------------------------------------------------------------ 1. Redis down, then back empty
@pytest.mark.timeout(700)  # includes the stack's start
def test_redis_outage_serves_by_load_then_ownership_and_prefix_routing_return(stack, llm_bf16, model):
    wait_all_healthy(stack)
    assert health(stack)[1]["redis"] == "ok"
    ids = long_ids(llm_bf16, "redis", 5 * BLOCK + 5)  # five full blocks and a partial one
    ref = reference(llm_bf16, ids, 8)
    hashes = block_hashes(ids, BLOCK, llm_bf16.engine.namespace(None))
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    redis_pid = stack.pid("redis")
    assert redis_pid == stack.pids["redis"]
    assert redis_up(stack) == 1
    os.kill(redis_pid, signal.SIGSTOP)  # frozen: every Redis call times out (worse than a refusal)
    stopped = time.monotonic()
    try:
        # No request touches Redis meanwhile: the gateway's own probe (a PING every 1 s, 0.5 s
        # timeout) notices, within one probe interval plus its timeout.
        code, body = wait_for(lambda: (h := health(stack))[1]["redis"] == "degraded" and h, 10,
                              "/health to report Redis degraded", interval_s=0.05)
        assert time.monotonic() - stopped < 1.0 + 0.5 + 0.5, "the probe took longer than its interval"
        assert code == 200 and body["status"] == "ok", body  # still serving: Redis only steers routing
        assert redis_up(stack) == 0
        start = time.monotonic()
        got, text, final = generate(stack.gateway, token_ids=ids, sampling=greedy(8), timeout_s=60)
        assert got == ref.token_ids and text == ref.text
        assert time.monotonic() - start < 20
        code, reply = http_json("POST", stack.http_base + "/completions",
                                {"model": model, "prompt": "Redis is down, yet", "max_tokens": 4})
        assert code == 200 and reply["choices"][0]["finish_reason"] == "length", reply
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    client.flushall()  # back, and empty: what a Redis without persistence is after a restart
    wait_for(lambda: health(stack)[1]["redis"] == "ok", 10, "/health to report Redis ok again")
    assert redis_up(stack) == 1

    # Nobody recorded these blocks while Redis was frozen; only the rebuild can put them there.
    def rebuilt():
        owners = [{m.decode() for m in client.smembers("ss:blk:" + h.hex())} for h in hashes]
        roles = [{o.split(":", 1)[0] for o in block} for block in owners]
        return owners if all({"prefill", "kvstore", "decode"} <= r for r in roles) else None

    owners = wait_for(rebuilt, 30, "the prefill worker, kvstore and decode worker to re-record the blocks")
    holder = {o for o in owners[0] if o.startswith("prefill:")}
    assert len(holder) == 1, owners[0]  # only the worker that prefilled it holds it
    prefix_before = prefill_routes(stack, "prefix")
    got, _, final = generate(stack.gateway, token_ids=ids, sampling=greedy(8), timeout_s=60)
    assert got == ref.token_ids
    assert final.usage.cached_tokens == 5 * BLOCK  # routed to the holder: prefix routing is back
    assert prefill_routes(stack, "prefix") == prefix_before + 1


@pytest.mark.timeout(200)
def test_embedded_redis_killed_is_restarted_on_its_port(stack, llm_bf16):
    """kill -9 of the embedded Redis: requests go on (by load), `up` starts a new one on the same
    port, and the processes re-record what they hold in it."""
    old_pid = stack.pid("redis")
    ids = long_ids(llm_bf16, "redis-kill", 3 * BLOCK + 3)
    ref = reference(llm_bf16, ids, 6)
    os.kill(old_pid, signal.SIGKILL)
    got, _, _ = generate(stack.gateway, token_ids=ids, sampling=greedy(6), timeout_s=60)
    assert got == ref.token_ids
    new_pid = wait_for(lambda: (p := stack.pid("redis")) not in (None, old_pid) and p, 30,
                       "the launcher to restart Redis")
    assert new_pid != old_pid
    wait_for(lambda: health(stack)[1]["redis"] == "ok", 15, "/health to report Redis ok again")
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)  # the same URL as before
    hashes = block_hashes(ids, BLOCK, llm_bf16.engine.namespace(None))
    wait_for(lambda: all(client.exists("ss:blk:" + h.hex()) for h in hashes), 30,
             "the blocks to be re-recorded in the new Redis")
    assert log_lines(stack, 0, "embedded redis restarted")


# ------------------------------------------------------------- 2. decode worker killed mid-stream
@pytest.mark.timeout(300)
def test_decode_worker_killed_mid_stream_resumes_token_exact(stack, llm_bf16):
    wait_all_healthy(stack)
    prompt = "Tell me a long story about a lighthouse keeper who finds a message in a bottle."
    ref = reference(llm_bf16, prompt, 64)
    since = len(stack.log)
    chunks, killed = [], None
    for msg in stream_generate(stack.gateway, prompt=prompt, sampling=greedy(64), timeout_s=120,
                               request_id="fault-decode-kill"):
        chunks.append(msg)
        received = sum(len(c.token_ids) for c in chunks)
        if killed is None and received >= 4:
            # The decode worker running a sequence is the one serving this stream (nothing else runs).
            name = wait_for(lambda: next((n for n in DECODES if load(stack, n).num_running), None), 10,
                            "a decode worker running the stream", interval_s=0.01)
            killed = (name, kill(stack, name), received)
    assert killed is not None, "the stream ended before 4 tokens"
    name, pid, received_at_kill = killed
    KILLED[name] = pid
    assert received_at_kill < 64 - 8, f"the kill came too late to test a resume ({received_at_kill} tokens in)"
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == ref.token_ids  # no gap, no duplicate, same tokens as a fault-free run
    assert "".join(c.text for c in chunks) == ref.text
    assert chunks[-1].finish_reason == "length" and not any(c.finish_reason for c in chunks[:-1])
    resumed = log_lines(stack, since, "decode resume:", "request_id=fault-decode-kill")
    assert resumed and f"worker={stack.roles[name]}" in resumed[0], resumed


# ------------------------------------------------------------ 3. prefill worker killed mid-prefill
@pytest.mark.timeout(300)
def test_prefill_worker_killed_mid_prefill_is_retried_elsewhere(stack, llm_bf16):
    wait_all_healthy(stack)
    prompts = [long_ids(llm_bf16, f"prefill-{i}", 320) for i in range(4)]  # ~0.5-1 s of prefill each
    refs = llm_bf16.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    since = len(stack.log)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(generate, stack.gateway, token_ids=p, sampling=greedy(8), timeout_s=120,
                               request_id=f"fault-prefill-{i}") for i, p in enumerate(prompts)]

        def busy():
            return next((n for n in PREFILLS if (lo := load(stack, n)).queued_tokens or lo.num_running), None)

        name = wait_for(busy, 60, "a prefill worker computing a prompt", interval_s=0.01)
        address = stack.roles[name]
        KILLED[name] = kill(stack, name)
        results = [f.result(timeout=120) for f in futures]
    for (ids, text, final), ref in zip(results, refs):
        assert ids == ref.token_ids and text == ref.text and final.finish_reason == "length"
    retried = log_lines(stack, since, "prefill retry:", f"worker={address}")
    assert retried, f"no request was retried after {name} died mid-prefill"


# --------------------------------------------------------------------- 4. restarted and rejoined
@pytest.mark.timeout(400)
def test_killed_workers_restart_on_their_ports_and_rejoin_routing(stack):
    if not KILLED:  # run on its own: make a death to recover from
        KILLED["decode-1"] = kill(stack, "decode-1")
    for name, pid in KILLED.items():
        wait_for(lambda: log_lines(stack, 0, f"{name} exited (killed by SIGKILL); restarting it"), 10,
                 f"the launcher to log {name}'s death")
    wait_all_healthy(stack)  # the gateway's /health counts them healthy again
    for name, pid in KILLED.items():
        assert stack.pid(name) not in (None, pid), f"{name} is not a new process"
        assert log_lines(stack, 0, f"{name} restarted: pid={stack.pid(name)}", f"address={stack.roles[name]}")

    def served(name: str) -> bool:
        lo = load(stack, name)
        return bool(lo.prompt_tokens_computed if name.startswith("prefill") else lo.max_batch_size)

    # Concurrent requests spread over the workers (the router counts each one's in-flight calls).
    prompts = ["Name a colour.", "Name a river.", "Name a planet.", "Name a tree."]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            list(pool.map(lambda p: generate(stack.gateway, prompt=p, sampling=greedy(16), timeout_s=120), prompts))
            if all(served(n) for n in KILLED):
                break
    assert all(served(n) for n in KILLED), {n: load(stack, n) for n in KILLED}


# ------------------------------------------------------------------- 5. no decode worker left
@pytest.mark.timeout(400)
def test_no_decode_worker_left_is_unavailable_at_once(stack, model):
    wait_all_healthy(stack)
    for name in DECODES:
        kill(stack, name)
    # Restarting them takes a back-off and a model load: far longer than what follows.
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        generate(stack.gateway, prompt="Is anyone there?", sampling=greedy(4), timeout_s=60)
    assert info.value.code() == Code.UNAVAILABLE and "decode worker" in info.value.details(), info.value
    assert time.monotonic() - start < 5
    start = time.monotonic()
    code, reply = http_json("POST", stack.http_base + "/completions", {"model": model, "prompt": "Anyone?",
                                                                      "max_tokens": 4})
    assert code == 503 and reply["error"]["code"] == "service_unavailable", reply
    assert "decode worker" in reply["error"]["message"]
    assert time.monotonic() - start < 5
    code, body = wait_for(lambda: (h := health(stack))[0] == 503 and h, 5, "/health to say 503")
    assert body["decode"] == {"healthy": 0, "draining": 0, "total": 2} and body["status"] == "unavailable", body
    wait_for(lambda: grpc_health(stack) == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
             "the gateway's gRPC health to say NOT_SERVING")  # it follows the workers, not only startup
    assert all(stack.pid(n) is None or load_fails(stack, n) for n in DECODES), "a decode worker came back already"


# -------------------------------------------------------------------------------- 6. kvstore
@pytest.mark.timeout(400)
def test_kvstore_killed_decode_recomputes_and_requests_complete(stack, llm_bf16, model):
    """The kvstore dies after a request's blocks went through it; then the decode worker serving
    the request dies too, so the stream (HTTP, server-sent events) resumes on a decode worker
    whose fetch finds no kvstore: it recomputes prompt + tokens so far, and the text stays exact.
    A request sent while the kvstore is down or just restarted (empty) completes correctly."""
    wait_all_healthy(stack)
    ids = long_ids(llm_bf16, "kvstore-resume", 3 * BLOCK + 3)
    ref = reference(llm_bf16, ids, 64)
    since = len(stack.log)
    texts, finish, killed = [], None, None
    body = {"model": model, "prompt": ids, "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}
    for event in sse(stack.http_base + "/completions", body, request_id="fault-kv-resume"):
        assert "error" not in event, event
        for choice in event["choices"]:
            texts.append(choice["text"])
            finish = choice["finish_reason"] or finish
        if killed is None and sum(1 for t in texts if t) >= 4:
            name = wait_for(lambda: next((n for n in DECODES if load(stack, n).num_running), None), 10,
                            "a decode worker running the stream", interval_s=0.01)
            other = next(n for n in DECODES if n != name)
            recomputed_before = load(stack, other).num_recomputed
            kv_pid = kill(stack, "kvstore")
            killed = (name, kill(stack, name), other)
    assert killed is not None, "the stream ended before 4 chunks"
    name, _, other = killed
    assert "".join(texts) == ref.text and finish == "length"
    assert load(stack, other).num_recomputed == recomputed_before + 1
    (done,) = log_lines(stack, since, "request done:", "request_id=fault-kv-resume ")
    assert f"decode_worker={stack.roles[other]}" in done and "recomputed=True" in done, done
    assert "completion_tokens=64" in done

    fresh = long_ids(llm_bf16, "kvstore-down", 3 * BLOCK + 3)
    ref = reference(llm_bf16, fresh, 8)
    got, text, final = generate(stack.gateway, token_ids=fresh, sampling=greedy(8), timeout_s=60)
    assert got == ref.token_ids and text == ref.text and final.finish_reason == "length"
    wait_for(lambda: stack.pid("kvstore") not in (None, kv_pid), 30, "the kvstore's restart")
    wait_until_serving(stack.roles["kvstore"], timeout_s=60)  # back on its port


# ------------------------------------------------------------- 7. SIGTERM during a restart back-off
@pytest.mark.timeout(200)
def test_sigterm_during_restart_backoff_stops_everything(stack):
    wait_for(lambda: stack.pid("decode-0"), 120, "decode-0 running")
    since = len(stack.log)
    kill(stack, "decode-0")
    wait_for(lambda: log_lines(stack, since, "decode-0 exited (killed by SIGKILL); restarting it"), 10,
             "the launcher to schedule decode-0's restart")
    children = stack.child_pids()
    assert stack.pid("redis") in children and len(children) >= 4  # gateway, Redis, the workers up now
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(60) == 0, "\n".join(stack.log[-30:])
    assert not log_lines(stack, since, "decode-0 restarted")
    assert log_lines(stack, since, "all processes stopped")
    wait_for(lambda: not any(alive(p) for p in children), 10, "every child of the launcher to be gone")


# -------------------------------------------------------------------------- without a stack
def test_restart_backoff_doubles_up_to_its_cap():
    from splitserve.launch.up import restart_delay_s

    assert [restart_delay_s(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def _launcher(*flags: str):
    from splitserve.launch.up import Launcher, add_up_args

    p = argparse.ArgumentParser()
    add_up_args(p)
    return Launcher(p.parse_args(["--redis-url", "redis://127.0.0.1:1/0", *flags]))


def _kvstore_child(port: int, shm_dir):
    """A kvstore child whose same-host directory lives under `shm_dir` (a killed store leaves its
    directory behind: in the test's tmp_path, not in /dev/shm)."""
    from splitserve.launch.up import Child

    return Child("kvstore", ["kvstore", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1",
                             "--shm-dir", str(shm_dir)], f"127.0.0.1:{port}", restartable=True)


@pytest.mark.timeout(120)
def test_launcher_restarts_a_dead_child_on_its_port_unless_no_restart(tmp_path):
    """The supervision step of `splitserve up` on a real kvstore process (no model: quick)."""
    from splitserve.launch.up import free_port

    launcher = _launcher()
    child = launcher._spawn(_kvstore_child(free_port(), tmp_path))
    try:
        launcher._wait_healthy(child, 60)
        first = child.proc.pid
        child.proc.kill()
        child.proc.wait()
        assert launcher._watch(child) and child.restart_at_s is not None and child.restarts == 1
        assert child.restart_at_s - time.monotonic() <= 1.0  # the first back-off
        wait_for(lambda: launcher._watch(child) and child.restart_at_s is None, 5, "the restart", interval_s=0.05)
        assert child.proc.pid != first
        launcher._wait_healthy(child, 60)  # serving again on the same address
    finally:
        launcher.stop()
    assert child.proc.poll() is not None

    strict = _launcher("--no-restart")
    child = strict._spawn(_kvstore_child(free_port(), tmp_path))
    try:
        strict._wait_healthy(child, 60)
        child.proc.kill()
        child.proc.wait()
        assert strict._watch(child) is False and child.restart_at_s is None  # stop everything
    finally:
        strict.stop()


@pytest.mark.timeout(60)
def test_reporter_rebuilds_entries_a_restarted_redis_lost_without_traffic():
    """No record or remove fails while Redis is away (no traffic): the periodic check notices the
    empty Redis and re-records what the process holds."""
    from splitserve.ownership.registry import OwnershipRegistry, OwnershipReporter
    from splitserve.ownership.redis_server import EmbeddedRedis

    server = EmbeddedRedis().start()
    held = [bytes([i]) * 32 for i in range(3)]
    try:
        registry = OwnershipRegistry(server.url)
        reporter = OwnershipReporter(registry, "prefill:127.0.0.1:9", lambda: list(held), refresh_s=600,
                                     retry_s=0.1, check_s=0.1)
        reporter.start()
        try:
            assert registry.owners(held) == [{"prefill:127.0.0.1:9"}] * 3
            server.stop()
            server = EmbeddedRedis(port=server.port).start()  # the same address, empty
            wait_for(lambda: registry.owners(held) == [{"prefill:127.0.0.1:9"}] * 3, 10, "the rebuild")
            assert reporter.synced
        finally:
            reporter.stop()
    finally:
        server.stop()
