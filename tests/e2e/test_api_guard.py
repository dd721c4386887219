"""What the gateway refuses, and how: API keys, capacity, and random or malformed input on both
APIs and on the internal services. A second gateway (in this process, with an API key and room for
one request) is put in front of the shared stack's real workers."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certs import Authority
from splitserve import rpc
from splitserve.services.gateway.server import serve
from splitserve.config.gateway import GatewayConfig
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, kvstore_pb2, prefill_pb2

KEY = "s3cret-key"
AUTH = {"authorization": f"Bearer {KEY}"}


class BackgroundGateway:
    """A gateway served by an event loop in a thread (the tests stay synchronous)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.handle = asyncio.run_coroutine_threadsafe(serve(config), self.loop).result(timeout=120)
        self.base = self.handle.http.base_url
        self.grpc = self.handle.address

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.handle.stop(grace_s=0), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def guarded(http_stack):
    gw = BackgroundGateway(GatewayConfig(
        port=0, http_port=0, prefill=http_stack.roles["prefill-0"], decode=http_stack.roles["decode-0"],
        redis_url=http_stack.redis_url, api_key=KEY, max_inflight_requests=1, startup_timeout_s=60))
    yield gw
    gw.close()


@pytest.fixture(scope="module")
def model(guarded):
    return guarded.handle.service.served_model_name


def http(method: str, url: str, body=None, headers: dict | None = None, raw: bytes | None = None, timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json",
                                                                         **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def stub(gw):
    return gateway_pb2_grpc.GatewayStub(rpc.channel(gw.grpc))


def test_api_key_is_required_on_the_apis_but_not_on_health_and_metrics(guarded, model):
    body = {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        status, reply = http("POST", guarded.base + "/v1/completions", body, headers)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key", reply
        assert "Authorization: Bearer" in reply["error"]["message"]
    assert http("GET", guarded.base + "/v1/models")[0] == 401
    status, reply = http("POST", guarded.base + "/v1/completions", body, AUTH)
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    assert http("GET", guarded.base + "/v1/models", headers=AUTH)[0] == 200
    assert http("GET", guarded.base + "/health")[0] == 200
    assert http("GET", guarded.base + "/metrics")[0] == 200
    status, doc = http("GET", guarded.base + "/openapi.json")  # open too, and it says the key is needed
    assert status == 200 and doc["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "401" in doc["paths"]["/v1/models"]["get"]["responses"] and "security" not in doc["paths"]["/health"]["get"]
    request = gateway_pb2.GenerateRequest(prompt="Hello", sampling=common_pb2.SamplingParams(max_tokens=2))
    with pytest.raises(grpc.RpcError) as err:
        list(stub(guarded).Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        list(stub(guarded).Generate(request, timeout=30, metadata=(("authorization", "Bearer nope"),)))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    out = list(stub(guarded).Generate(request, timeout=30, metadata=tuple(AUTH.items())))
    assert out[-1].usage.completion_tokens == 2


def test_past_capacity_requests_are_refused_at_once(guarded, model, http_stack):
    """Room for one request: a second one, HTTP or gRPC, is refused at once while the first runs;
    the first completes and afterwards the decode worker's KV usage is back to idle."""
    ch = rpc.channel(http_stack.roles["decode-0"])
    from splitserve.v1 import decode_pb2_grpc

    def decode_usage():
        return decode_pb2_grpc.DecodeStub(ch).GetLoad(prefill_pb2.LoadRequest(), timeout=10).kv_cache_usage

    idle = decode_usage()
    long = gateway_pb2.GenerateRequest(prompt="Count slowly:", sampling=common_pb2.SamplingParams(
        max_tokens=40, temperature=0, ignore_eos=True))
    stream = stub(guarded).Generate(long, timeout=120, metadata=tuple(AUTH.items()))
    first = next(stream)  # the request holds the only slot now
    assert first.token_ids
    t0 = time.monotonic()
    status, reply = http("POST", guarded.base + "/v1/completions",
                         {"model": model, "prompt": "Hi", "max_tokens": 2}, AUTH)
    assert status == 429 and reply["error"]["type"] == "rate_limit_error" and "capacity" in reply["error"]["message"]
    with pytest.raises(grpc.RpcError) as err:
        list(stub(guarded).Generate(long, timeout=30, metadata=tuple(AUTH.items())))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - t0 < 5  # refused at once, not queued
    rest = list(stream)
    assert sum(len(m.token_ids) for m in [first, *rest]) == 40 and rest[-1].finish_reason == "length"
    deadline = time.monotonic() + 10
    while decode_usage() != idle and time.monotonic() < deadline:
        time.sleep(0.1)
    assert decode_usage() == idle
    ch.close()


# ----------------------------------------------------------------------------- random input
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                         st.text(max_size=12))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=6)
SMALL_TOKENS = st.one_of(st.integers(-3, 3), JSON_SCALARS)  # valid values stay tiny: random runs stay quick


def completion_bodies(model):
    return st.fixed_dictionaries({}, optional={
        "model": st.one_of(st.just(model), JSON_SCALARS),
        "prompt": st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 60000), max_size=5), JSON),
        "max_tokens": SMALL_TOKENS, "temperature": JSON_SCALARS, "top_p": JSON_SCALARS, "top_k": JSON_SCALARS,
        "min_p": JSON_SCALARS, "seed": JSON_SCALARS, "stop": JSON, "n": st.one_of(st.integers(-1, 2), JSON_SCALARS),
        "logprobs": st.one_of(st.integers(-1, 3), JSON_SCALARS), "echo": JSON_SCALARS, "stream": JSON_SCALARS,
        "stream_options": JSON, "ignore_eos": JSON_SCALARS, "cache_salt": JSON_SCALARS, "suffix": JSON_SCALARS,
        "presence_penalty": JSON_SCALARS, "junk": JSON,
    })


def chat_bodies(model):
    message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]),
                                               "content": st.one_of(st.text(max_size=20), JSON)}), JSON)
    return st.fixed_dictionaries({}, optional={
        "model": st.one_of(st.just(model), JSON_SCALARS), "messages": st.one_of(st.lists(message, max_size=3), JSON),
        "max_tokens": SMALL_TOKENS, "max_completion_tokens": SMALL_TOKENS, "temperature": JSON_SCALARS,
        "logprobs": JSON_SCALARS, "top_logprobs": JSON_SCALARS, "n": st.one_of(st.integers(-1, 2), JSON_SCALARS),
        "stream": JSON_SCALARS, "tools": JSON, "response_format": JSON,
    })


def _check_reply(status, reply):
    assert status in (200, 400, 404, 413, 429), (status, reply)
    if status != 200:
        assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_http_bodies_get_a_clean_answer(guarded, model, data):
    path, body = data.draw(st.one_of(st.tuples(st.just("/v1/completions"), completion_bodies(model)),
                                     st.tuples(st.just("/v1/chat/completions"), chat_bodies(model))))
    if body.get("stream") is True:
        body["stream"] = False  # the status and body checks are about the non-streamed form
    if path.endswith("chat/completions") and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_completion_tokens"] = 3  # chat's default is the rest of the context: keep random runs short
    status, reply = http("POST", guarded.base + path, body, AUTH)
    _check_reply(status, reply)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.one_of(st.binary(max_size=64), st.text(max_size=40).map(str.encode),
                     st.sampled_from([b"\xff\xfe{", b'{"model": "\xc3\x28"}', b"{" * 200, b'"str"'])))
def test_random_http_bytes_get_a_clean_answer(guarded, raw):
    status, reply = http("POST", guarded.base + "/v1/completions", raw=raw, headers=AUTH)
    assert status == 400 and reply["error"]["code"] == "invalid_json", (raw, reply)


SAMPLING = st.builds(
    common_pb2.SamplingParams, max_tokens=st.integers(0, 3), temperature=st.floats(-5, 200, allow_nan=False),
    top_p=st.floats(-1, 2, allow_nan=False), top_k=st.integers(-3, 100), min_p=st.floats(-1, 2, allow_nan=False),
    seed=st.integers(-(2**63), 2**63 - 1), logprobs=st.integers(0, 30),
    stop=st.lists(st.text(max_size=4), max_size=2), stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=2))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["prompt", "ids", "chat", "none"]), text=st.text(max_size=16),
       ids=st.lists(st.integers(0, 2**32 - 1), max_size=4), role=st.sampled_from(["user", "system", "robot", ""]),
       sampling=SAMPLING, model=st.sampled_from(["", "other"]), request_id=st.text(max_size=300))
def test_random_grpc_requests_never_fail_internally(guarded, kind, text, ids, role, sampling, model, request_id):
    req = gateway_pb2.GenerateRequest(sampling=sampling, model=model, request_id=request_id)
    if kind == "prompt":
        req.prompt = text
    elif kind == "ids":
        req.prompt_token_ids.ids.extend(ids)
        req.prompt_token_ids.SetInParent()
    elif kind == "chat":
        req.chat.messages.add(role=role, content=text)
    try:
        out = list(stub(guarded).Generate(req, timeout=60, metadata=tuple(AUTH.items())))
        assert out[-1].finish_reason in ("stop", "length")
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (e.code(), e.details())
        assert e.details()


MALFORMED = [b"\x0a\x02\xff\xfe", b"\xff\xff\xff", b"\x12\x10short", b"\x0a"]  # bad UTF-8, bad tags, truncated


@pytest.mark.parametrize("raw", MALFORMED)
def test_undecodable_messages_are_invalid_argument_on_every_service(guarded, http_stack, raw):
    targets = [(guarded.grpc, "/splitserve.v1.Gateway/Generate", "stream"),
               (http_stack.roles["prefill-0"], "/splitserve.v1.Prefill/Prefill", "unary"),
               (http_stack.roles["decode-0"], "/splitserve.v1.Decode/Decode", "stream"),
               (http_stack.roles["kvstore"], "/splitserve.v1.KVStore/Release", "unary")]
    for address, method, kind in targets:
        ch = grpc.insecure_channel(address)
        try:
            call = ch.unary_stream(method) if kind == "stream" else ch.unary_unary(method)
            with pytest.raises(grpc.RpcError) as err:
                result = call(raw, timeout=10, metadata=tuple(AUTH.items()))
                if kind == "stream":
                    list(result)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.details())
            assert "not a valid splitserve.v1." in err.value.details()
        finally:
            ch.close()
    # Every server still answers a well-formed call.
    with rpc.channel(http_stack.roles["kvstore"]) as ch:
        from splitserve.v1 import kvstore_pb2_grpc

        assert kvstore_pb2_grpc.KVStoreStub(ch).Stats(kvstore_pb2.StatsRequest(), timeout=10).capacity_bytes > 0


def test_oversize_messages_are_refused_by_size(guarded, model):
    big = "x" * (17 << 20)  # beyond the 16 MiB limits of the HTTP body and of gRPC messages
    status, reply = http("POST", guarded.base + "/v1/completions", {"model": model, "prompt": big}, AUTH)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    with pytest.raises(grpc.RpcError) as err:
        list(stub(guarded).Generate(gateway_pb2.GenerateRequest(prompt=big), timeout=30, metadata=tuple(AUTH.items())))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, reply = http("POST", guarded.base + "/v1/completions", {"model": model, "prompt": "ok", "max_tokens": 1},
                         AUTH)
    assert status == 200


def test_gateway_over_tls(http_stack, tmp_path):
    import ssl

    from splitserve.client import generate

    ca = Authority(tmp_path)
    cert, key = ca.issue("gateway")
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        GatewayConfig(tls_cert_file=cert)
    gw = BackgroundGateway(GatewayConfig(
        port=0, http_port=0, prefill=http_stack.roles["prefill-0"], decode=http_stack.roles["decode-0"],
        tls_cert_file=cert, tls_key_file=key, startup_timeout_s=60))
    try:
        assert gw.base.startswith("https://")
        context = ssl.create_default_context(cafile=ca.ca_file)
        with urllib.request.urlopen(gw.base + "/health", context=context, timeout=30) as resp:
            assert resp.status == 200
        body = json.dumps({"model": gw.handle.service.served_model_name, "prompt": "Hi", "max_tokens": 2}).encode()
        req = urllib.request.Request(gw.base + "/v1/completions", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, context=context, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 2
        with pytest.raises(OSError):  # plain HTTP to the TLS port: the connection is dropped
            urllib.request.urlopen(gw.base.replace("https://", "http://") + "/health", timeout=10).read()
        result = generate(gw.grpc, prompt="Hi", sampling={"max_tokens": 2}, tls_ca_file=ca.ca_file, timeout_s=60)
        assert len(result.token_ids) == 2
        with pytest.raises(grpc.RpcError) as err:  # a plaintext client cannot talk to it
            generate(gw.grpc, prompt="Hi", sampling={"max_tokens": 2}, timeout_s=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gw.close()


def test_mutual_tls_between_roles(tmp_path):
    """A kvstore with mutual TLS: a client with a certificate from the roles' CA is served; one
    without a certificate, or with one from another CA, is refused."""
    from splitserve.kvstore.client import KVStoreClient
    from splitserve.config.kvstore import KVStoreConfig
    from splitserve.services.kvstore.server import serve as serve_kvstore

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ca, other = Authority(tmp_path / "a", "roles-ca"), Authority(tmp_path / "b", "other-ca")
    store_cert, store_key = ca.issue("kvstore")
    worker_cert, worker_key = ca.issue("worker")
    stranger_cert, stranger_key = other.issue("stranger")
    with pytest.raises(ValueError, match="together"):
        KVStoreConfig(tls_ca_file=ca.ca_file)
    store = serve_kvstore(KVStoreConfig(port=0, metrics_port=-1, capacity_gb=0.01, tls_ca_file=ca.ca_file,
                                        tls_cert_file=store_cert, tls_key_file=store_key))
    try:
        good = KVStoreClient(store.address, credentials=rpc.channel_credentials(ca.ca_file, worker_cert, worker_key),
                             timeout_s=10)
        assert good.contains([b"\x01" * 32]) == [False]
        good.close()
        for creds in (None, rpc.channel_credentials(ca.ca_file),
                      rpc.channel_credentials(ca.ca_file, stranger_cert, stranger_key)):
            bad = KVStoreClient(store.address, credentials=creds, timeout_s=5)
            with pytest.raises(grpc.RpcError) as err:
                bad.contains([b"\x01" * 32])
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            bad.close()
    finally:
        store.stop(grace_s=0)


@pytest.mark.timeout(400)
def test_splitserve_up_with_every_guard_on(tmp_path):
    """`splitserve up` with an API key, TLS on the gateway and mutual TLS between the roles: a client
    with the key and the CA is served over gRPC and HTTPS; the internal roles refuse plaintext."""
    import ssl
    import subprocess
    import sys

    from services_fixture import start_stack
    from splitserve.v1 import prefill_pb2_grpc

    ca = Authority(tmp_path)
    gw_cert, gw_key = ca.issue("gateway")
    role_cert, role_key = ca.issue("roles")
    stack = start_stack("--dtype", "float32", "--kv-cache-memory-gb", "0.05", "--api-key", KEY,
                        "--tls-cert-file", gw_cert, "--tls-key-file", gw_key, "--tls-ca-file", ca.ca_file,
                        "--internal-tls-ca-file", ca.ca_file, "--internal-tls-cert-file", role_cert,
                        "--internal-tls-key-file", role_key)
    try:
        assert stack.http_base.startswith("https://")
        out = subprocess.run([sys.executable, "-m", "splitserve.launch.cli", "generate", "--target", stack.gateway,
                              "--tls-ca", ca.ca_file, "--api-key", KEY, "--max-tokens", "4", "--temperature", "0",
                              "Hi"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        denied = subprocess.run([sys.executable, "-m", "splitserve.launch.cli", "generate", "--target", stack.gateway,
                                 "--tls-ca", ca.ca_file, "--max-tokens", "4", "Hi"],
                                capture_output=True, text=True, timeout=120)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        context = ssl.create_default_context(cafile=ca.ca_file)
        models = urllib.request.Request(stack.http_base + "/models", headers=AUTH)
        with urllib.request.urlopen(models, context=context, timeout=30) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        req = urllib.request.Request(stack.http_base + "/completions", headers={**AUTH, "content-type": "application/json"},
                                     data=json.dumps({"model": model, "prompt": "Hi", "max_tokens": 3}).encode())
        with urllib.request.urlopen(req, context=context, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 3
        with grpc.insecure_channel(stack.roles["prefill-0"]) as ch:  # plaintext to an internal role
            with pytest.raises(grpc.RpcError) as err:
                prefill_pb2_grpc.PrefillStub(ch).GetLoad(prefill_pb2.LoadRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        assert stack.stop() == 0, "\n".join(stack.log[-30:])


def _decode_usage(http_stack) -> float:
    return http_stack.decode_load().kv_cache_usage


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.timeout(300)
def test_many_more_requests_than_room_are_served_or_refused_and_nothing_leaks(guarded, model, http_stack):
    """24 concurrent requests (HTTP and gRPC) against room for one: each is served correctly or
    refused with 429 / RESOURCE_EXHAUSTED, nothing else; the process's memory does not grow with
    the refusals; afterwards the decode worker's KV usage is idle and the kvstore holds no lease of theirs."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from splitserve.v1 import kvstore_pb2_grpc

    idle = _decode_usage(http_stack)
    with rpc.channel(http_stack.roles["kvstore"]) as ch:  # what earlier tests' direct Prefill calls hold
        leases_before = kvstore_pb2_grpc.KVStoreStub(ch).Stats(kvstore_pb2.StatsRequest(), timeout=10).num_leases
    reference = http("POST", guarded.base + "/v1/completions",
                     {"model": model, "prompt": "Name three colors:", "max_tokens": 6, "temperature": 0,
                      "ignore_eos": True}, AUTH)[1]["choices"][0]["text"]
    rss_before = _rss_mib(os.getpid())  # the gateway runs in this process
    workers = {name: http_stack.pid(name) for name in ("prefill-0", "decode-0", "kvstore")}
    workers_before = {name: _rss_mib(pid) for name, pid in workers.items()}

    def one(i: int):
        if i % 2:
            status, reply = http("POST", guarded.base + "/v1/completions",
                                 {"model": model, "prompt": "Name three colors:", "max_tokens": 6, "temperature": 0,
                                  "ignore_eos": True}, AUTH)
            if status == 200:
                return "served" if reply["choices"][0]["text"] == reference else f"wrong {reply}"
            return "refused" if status == 429 else f"http {status} {reply}"
        try:
            out = list(stub(guarded).Generate(gateway_pb2.GenerateRequest(
                prompt="Name three colors:", sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0,
                                                                                ignore_eos=True)),
                timeout=120, metadata=tuple(AUTH.items())))
            return "served" if "".join(m.text for m in out) == reference else "wrong grpc"
        except grpc.RpcError as e:
            return "refused" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else f"grpc {e.code().name}"

    for _ in range(2):  # two waves: a leak would show as growth between them
        with ThreadPoolExecutor(24) as pool:
            outcomes = list(pool.map(one, range(24)))
        assert set(outcomes) <= {"served", "refused"}, outcomes
        assert "served" in outcomes and "refused" in outcomes
    assert _rss_mib(os.getpid()) - rss_before < 64
    for name, pid in workers.items():  # the workers' memory is bounded too (their pools are fixed)
        assert _rss_mib(pid) - workers_before[name] < 64, name
    deadline = time.monotonic() + 15
    while _decode_usage(http_stack) != idle and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _decode_usage(http_stack) == idle
    with rpc.channel(http_stack.roles["kvstore"]) as ch:
        stats = kvstore_pb2_grpc.KVStoreStub(ch)
        wait = time.monotonic() + 15
        while stats.Stats(kvstore_pb2.StatsRequest(), timeout=10).num_leases > leases_before and \
                time.monotonic() < wait:
            time.sleep(0.2)
        # (a lease of an earlier test may run out meanwhile: none of these requests' is left)
        assert stats.Stats(kvstore_pb2.StatsRequest(), timeout=10).num_leases <= leases_before


@pytest.mark.timeout(120)
def test_a_client_deadline_ends_the_request_and_frees_its_blocks(guarded, http_stack):
    idle = _decode_usage(http_stack)
    request = gateway_pb2.GenerateRequest(prompt="Write a very long story about the sea:",
                                          sampling=common_pb2.SamplingParams(max_tokens=400, ignore_eos=True))
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stub(guarded).Generate(request, timeout=3.0, metadata=tuple(AUTH.items())))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 6
    deadline = time.monotonic() + 15
    while _decode_usage(http_stack) != idle and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _decode_usage(http_stack) == idle


@pytest.mark.timeout(120)
def test_the_gateways_request_timeout_gives_504_over_http_and_frees_the_blocks(http_stack):
    gw = BackgroundGateway(GatewayConfig(
        port=0, http_port=0, prefill=http_stack.roles["prefill-0"], decode=http_stack.roles["decode-0"],
        request_timeout_s=2.0, startup_timeout_s=60))
    try:
        idle = _decode_usage(http_stack)
        t0 = time.monotonic()
        status, reply = http("POST", gw.base + "/v1/completions",
                             {"model": gw.handle.service.served_model_name, "prompt": "Tell a long story:",
                              "max_tokens": 400, "ignore_eos": True})
        assert status == 504 and "deadline" in reply["error"]["message"], reply
        assert time.monotonic() - t0 < 6
        deadline = time.monotonic() + 15
        while _decode_usage(http_stack) != idle and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _decode_usage(http_stack) == idle
    finally:
        gw.close()
