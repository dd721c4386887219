"""The gateway end to end: real gRPC on loopback, a real Redis, fake in-process workers.

The fakes are deterministic: the first token is sum(prompt) % 1000 + 1000 (ordinary BPE tokens of
the default tokenizer), each next token is the previous + 1. They run as grpc.aio servers on the
same event loop as the gateway (a background thread); the test thread is the synchronous client.
"""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.client import generate, stream_generate
from splitserve.engine.hashing import block_hashes, hash_namespace
from splitserve.model.loader import default_model_path
from splitserve.ownership.registry import OwnershipRegistry
from splitserve.ownership.redis_server import EmbeddedRedis
from splitserve.rpc import channel as open_channel
from splitserve.ownership.reader import AsyncOwnersReader
from splitserve.services.gateway.server import serve
from splitserve.config.gateway import GatewayConfig
from splitserve.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, prefill_pb2,
                           prefill_pb2_grpc)

BS, MAX_LEN, VOCAB, EOS = 16, 2048, 49152, 2
MODEL_ID = default_model_path().name
Code = grpc.StatusCode


def first_token(prompt) -> int:
    return sum(prompt) % 1000 + 1000


def fake_logprob(t: int) -> common_pb2.TokenLogprob:
    top = [common_pb2.TopLogprob(token_id=t, logprob=-0.25)]
    return common_pb2.TokenLogprob(token_id=t, logprob=-0.25, rank=1, top=top)


def load_response(worker_id: str, **fields) -> prefill_pb2.LoadResponse:
    return prefill_pb2.LoadResponse(worker_id=worker_id, model_id=MODEL_ID, block_size=BS, max_model_len=MAX_LEN,
                                    vocab_size=VOCAB, model_path=str(default_model_path()), num_free_blocks=1000,
                                    num_total_blocks=1000, **fields)


class FakePrefill(prefill_pb2_grpc.PrefillServicer):
    def __init__(self) -> None:
        self.port, self.queued_tokens, self.first_override, self.delay_s = 0, 0, None, 0.0
        self.put_s, self.die_after_first = 0.0, False  # the put: how long it takes, whether the worker dies in it
        self.first_sent: list[float] = []
        self.calls: list = []
        self.cancelled: list[str] = []
        self.seen: set[bytes] = set()  # its "prefix cache"

    @property
    def worker_id(self) -> str:
        return f"prefill:127.0.0.1:{self.port}"

    async def Prefill(self, request, context):
        ids = list(request.prompt_token_ids)
        self.calls.append(request)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise
        hashes = block_hashes(ids, BS, hash_namespace(MODEL_ID, request.cache_salt or None))
        hit = next((i for i, h in enumerate(hashes) if h not in self.seen), len(hashes))
        self.seen.update(hashes)
        cached = min(hit * BS, len(ids) - 1)
        first = first_token(ids) if self.first_override is None else self.first_override
        resp = prefill_pb2.PrefillResponse(
            request_id=request.request_id, first_token_id=first, num_cached_tokens=cached,
            num_computed_tokens=len(ids) - cached, worker_id=self.worker_id)
        if request.sampling.HasField("logprobs"):
            resp.first_logprob.CopyFrom(fake_logprob(first))
        yield resp  # the first token, then the put's result (prefill.proto)
        self.first_sent.append(time.monotonic())
        await asyncio.sleep(self.put_s)
        if self.die_after_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker lost during the put")
        yield prefill_pb2.PrefillResponse(request_id=request.request_id, block_hashes=hashes,
                                          kvstore_address="127.0.0.1:9")

    async def GetLoad(self, request, context):
        return load_response(self.worker_id, queued_tokens=self.queued_tokens)


class FakeDecode(decode_pb2_grpc.DecodeServicer):
    def __init__(self, fail: dict) -> None:
        self.port, self.delay_s, self.chunk, self.eos_at = 0, 0.0, 2, None  # eos_at: 1-based output position
        self.fail = fail  # shared by the fakes: {"armed": bool, "after": messages}
        self.calls: list = []
        self.cancelled: list[str] = []

    async def Decode(self, request, context):
        self.calls.append(request)
        p = request.sampling
        max_tokens = p.max_tokens if p.HasField("max_tokens") else 16
        out, sent = list(request.output_token_ids), 0
        try:
            while True:
                tokens, finish, stop_id = [], "", 0
                while len(tokens) < self.chunk and not finish:
                    t = EOS if self.eos_at == len(out) + 1 else out[-1] + 1
                    out.append(t)
                    tokens.append(t)
                    if t == EOS and not p.ignore_eos:
                        finish = "stop"
                    elif t in p.stop_token_ids:
                        finish, stop_id = "stop", t
                    elif len(out) >= max_tokens:
                        finish = "length"
                lps = [fake_logprob(t) for t in tokens] if p.HasField("logprobs") else []
                yield decode_pb2.DecodeResponse(token_ids=tokens, logprobs=lps, finish_reason=finish,
                                                stop_token_id=stop_id)
                sent += 1
                if finish:
                    return
                if self.fail["armed"] and sent >= self.fail["after"]:
                    self.fail["armed"] = False
                    await context.abort(Code.UNAVAILABLE, "fake decode worker crashed")
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise

    async def GetLoad(self, request, context):
        return load_response(f"decode:127.0.0.1:{self.port}")


class Env:
    """A loop thread holding the fakes and the gateway; the test thread calls run() into it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def start_fake(servicer, add) -> grpc.aio.Server:
    server = grpc.aio.server()
    add(servicer, server)
    servicer.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def env():
    e = Env()
    e.redis = EmbeddedRedis().start()
    e.fail = {"armed": False, "after": 2}
    e.prefills = [FakePrefill(), FakePrefill()]
    e.decodes = [FakeDecode(e.fail), FakeDecode(e.fail)]
    e.servers = [e.run(start_fake(p, prefill_pb2_grpc.add_PrefillServicer_to_server)) for p in e.prefills]
    e.servers += [e.run(start_fake(d, decode_pb2_grpc.add_DecodeServicer_to_server)) for d in e.decodes]
    config = GatewayConfig(port=0, http_port=0, prefill=",".join(f"127.0.0.1:{p.port}" for p in e.prefills),
                           decode=",".join(f"127.0.0.1:{d.port}" for d in e.decodes), redis_url=e.redis.url,
                           load_poll_interval_s=0.1, startup_timeout_s=20)
    e.gw = e.run(serve(config))
    e.tok = e.gw.service.tokenizer
    e.channel = open_channel(e.gw.address)
    yield e
    e.channel.close()
    e.run(e.gw.stop(grace_s=0))
    for s in e.servers:
        e.run(s.stop(0))
    e.redis.stop()
    e.close()


@pytest.fixture(autouse=True)
def reset_fakes(env):
    yield
    for p in env.prefills:
        p.queued_tokens, p.first_override, p.delay_s, p.put_s, p.die_after_first = 0, None, 0.0, 0.0, False
    for d in env.decodes:
        d.delay_s, d.chunk, d.eos_at = 0.0, 2, None
    env.fail["armed"] = False


def call(env, **kwargs):
    kwargs.setdefault("timeout_s", 10)
    return generate(env.gw.address, channel=env.channel, **kwargs)


def decode_calls(env, rid: str) -> list:
    return [c for d in env.decodes for c in d.calls if c.request_id.startswith(rid + "~")]


def test_health_is_serving(env):
    stub = health_pb2_grpc.HealthStub(env.channel)
    for service in ("", "splitserve.v1.Gateway"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_stream_relays_tokens_and_text_deltas(env):
    ids_in = env.tok.encode("Hello there")
    f = first_token(ids_in)
    msgs = list(stream_generate(env.gw.address, prompt="Hello there", channel=env.channel, timeout_s=10,
                                sampling={"max_tokens": 12, "logprobs": 1}, request_id="relay-1"))
    assert [list(m.token_ids) for m in msgs[:2]] == [[f], [f + 1, f + 2]]  # the first token alone, at once
    ids = [t for m in msgs for t in m.token_ids]
    assert ids == list(range(f, f + 12))
    assert "".join(m.text for m in msgs) == env.tok.decode(ids)
    assert [lp.token_id for m in msgs for lp in m.logprobs] == ids
    final = msgs[-1]
    assert all(not m.finish_reason for m in msgs[:-1]) and all(m.request_id == "relay-1" for m in msgs)
    assert (final.finish_reason, final.stop_reason) == ("length", "")
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (2, 12)
    t = final.timings
    assert 0 <= t.queue_s <= t.ttft_s <= t.e2e_s and t.prefill_s >= 0 and t.decode_s >= 0
    (dc,) = decode_calls(env, "relay-1")
    assert list(dc.output_token_ids) == [f] and list(dc.prompt_token_ids) == ids_in
    assert dc.kvstore_address == "127.0.0.1:9" and dc.sampling.max_tokens == 12


def test_chat_and_token_id_inputs(env):
    messages = [{"role": "user", "content": "hi"}]
    ids_in = env.tok.apply_chat_template(messages)
    ids, text, final = call(env, messages=messages, sampling={"max_tokens": 3})
    assert ids == [first_token(ids_in) + i for i in range(3)] and final.usage.prompt_tokens == len(ids_in)
    ids, text, final = call(env, token_ids=[5, 6, 7], sampling={"max_tokens": 4})
    assert ids == [1018, 1019, 1020, 1021] and text == env.tok.decode(ids)


def test_first_token_can_finish_the_request(env):
    n_decode = sum(len(d.calls) for d in env.decodes)
    ids, text, final = call(env, token_ids=[5, 6], sampling={"max_tokens": 1})
    assert (ids, final.finish_reason, final.usage.completion_tokens) == ([1011], "length", 1)
    for p in env.prefills:
        p.first_override = EOS
    ids, text, final = call(env, token_ids=[5, 6])
    assert (ids, text, final.finish_reason, final.stop_reason) == ([EOS], "", "stop", "")
    assert sum(len(d.calls) for d in env.decodes) == n_decode  # no decode call was made


def test_the_first_token_goes_on_before_the_put_ends(env):
    """The prefill worker's first message (its token) reaches the client at once; the decode starts
    when its second one (the put's result) arrives. A request the first token finishes has its
    answer at once too."""
    for p in env.prefills:
        p.put_s = 0.6
    start = time.monotonic()
    msgs = stream_generate(env.gw.address, token_ids=[5, 6, 7], channel=env.channel, timeout_s=10,
                           sampling={"max_tokens": 5}, request_id="early-1")
    first = next(msgs)
    first_at = time.monotonic() - start
    rest = list(msgs)
    assert list(first.token_ids) == [1018] and first_at < 0.4
    assert [t for m in rest for t in m.token_ids] == [1019, 1020, 1021, 1022]
    assert time.monotonic() - start >= 0.6  # the decode waited for the put's result
    (dc,) = decode_calls(env, "early-1")
    assert dc.kvstore_address == "127.0.0.1:9" and list(dc.output_token_ids) == [1018]
    start = time.monotonic()
    msgs = stream_generate(env.gw.address, token_ids=[5, 6, 8], channel=env.channel, timeout_s=10,
                           sampling={"max_tokens": 1})
    final = next(msgs)  # the answer at once; the stream ends with the put (the prefill's call is not cut)
    assert list(final.token_ids) == [1019] and final.finish_reason == "length"
    assert time.monotonic() - start < 0.4 and list(msgs) == [] and time.monotonic() - start >= 0.6


def test_a_prefill_worker_lost_during_its_put_is_a_failed_put(env):
    """After the first token went to the client the prefill is not retried: the decode recomputes
    the prompt (no kvstore address), and the client gets every token once."""
    n_prefill = sum(len(p.calls) for p in env.prefills)
    for p in env.prefills:
        p.die_after_first = True
    ids, _, final = call(env, token_ids=[5, 6, 9], sampling={"max_tokens": 4}, request_id="lost-put")
    assert ids == [1020, 1021, 1022, 1023] and final.finish_reason == "length"
    assert sum(len(p.calls) for p in env.prefills) == n_prefill + 1
    (dc,) = decode_calls(env, "lost-put")
    assert dc.kvstore_address == "" and list(dc.output_token_ids) == [1020]


def test_eos_and_stop_token_ids(env):
    for d in env.decodes:
        d.eos_at = 4
    ids, text, final = call(env, token_ids=[5, 6], sampling={"max_tokens": 50})
    assert (ids, final.finish_reason, final.stop_reason) == ([1011, 1012, 1013, EOS], "stop", "")
    assert text == env.tok.decode([1011, 1012, 1013])
    ids, text, final = call(env, token_ids=[5, 6], sampling={"max_tokens": 50, "stop_token_ids": [1013]})
    assert (ids, final.finish_reason, final.stop_reason) == ([1011, 1012, 1013], "stop", "1013")


def test_stop_string_cuts_text_and_cancels_decode(env):
    for d in env.decodes:
        d.delay_s = 0.02
    ids_in = env.tok.encode("Hello there")
    seq = list(range(first_token(ids_in), first_token(ids_in) + 40))
    head, stop = env.tok.decode(seq[:4]), env.tok.decode(seq[4:6])
    assert env.tok.decode(seq).find(stop) == len(head)  # the stop string first appears there
    ids, text, final = call(env, prompt="Hello there", sampling={"max_tokens": 200, "stop": [stop]},
                            request_id="stop-1")
    assert (ids, text, final.finish_reason, final.stop_reason) == (seq[:6], head, "stop", stop)
    (dc,) = decode_calls(env, "stop-1")
    assert wait_until(lambda: any(d.cancelled and d.cancelled[-1] == dc.request_id for d in env.decodes))


def test_client_cancel_cancels_decode(env):
    for d in env.decodes:
        d.delay_s = 0.05
    stream = stream_generate(env.gw.address, token_ids=[9, 9, 9], channel=env.channel, timeout_s=10,
                             sampling={"max_tokens": 500}, request_id="cancel-1")
    got = [next(stream) for _ in range(3)]
    assert [t for m in got for t in m.token_ids] == list(range(1027, 1032))
    stream.close()  # the client goes away mid-stream
    (dc,) = decode_calls(env, "cancel-1")
    assert wait_until(lambda: dc.request_id in {r for d in env.decodes for r in d.cancelled})
    router = env.gw.pool.router
    assert wait_until(lambda: env.gw.service.num_inflight == 0)
    assert all(w.inflight_requests == 0 for role in ("prefill", "decode") for w in router.workers(role))


def test_client_cancel_or_deadline_cancels_prefill(env):
    for p in env.prefills:
        p.delay_s = 5.0

    def prefill_cancelled(rid: str) -> bool:
        ids = [c.request_id for p in env.prefills for c in p.calls if c.request_id.startswith(rid + "~")]
        return bool(ids) and ids[0] in {r for p in env.prefills for r in p.cancelled}

    with pytest.raises(grpc.RpcError) as info:
        call(env, token_ids=[4, 4], request_id="deadline-1", timeout_s=0.3)
    assert info.value.code() == Code.DEADLINE_EXCEEDED
    assert wait_until(lambda: prefill_cancelled("deadline-1"), timeout_s=2)
    request = gateway_pb2.GenerateRequest(request_id="cancel-2", prompt_token_ids=gateway_pb2.TokenIds(ids=[4, 5]))
    stream = gateway_pb2_grpc.GatewayStub(env.channel).Generate(request, timeout=30)
    assert wait_until(lambda: any(c.request_id.startswith("cancel-2~") for p in env.prefills for c in p.calls))
    stream.cancel()  # the gateway's own deadline is 30 s away: only the cancel can stop the prefill now
    assert wait_until(lambda: prefill_cancelled("cancel-2"), timeout_s=2)


def test_routes_to_the_prefix_owner_in_redis(env):
    prompt = list(range(100, 148))  # 3 full blocks
    hashes = block_hashes(prompt, BS, hash_namespace(MODEL_ID))
    owner = max(env.prefills, key=lambda p: f"127.0.0.1:{p.port}")  # loses every tie on address
    registry = OwnershipRegistry(env.redis.url)
    registry.record(owner.worker_id, hashes)
    before = env.gw.pool.router.decisions[("prefill", "prefix")]
    for i in range(2):
        ids, _, final = call(env, token_ids=prompt, sampling={"max_tokens": 2}, request_id=f"prefix-{i}")
        assert owner.calls[-1].request_id.startswith(f"prefix-{i}~")
    assert final.usage.cached_tokens == 47  # the fake's own cache: 3 blocks, capped at prompt_len - 1
    assert env.gw.pool.router.decisions[("prefill", "prefix")] == before + 2
    # Another tenant's salt: other hashes, nobody owns them, the tie goes to the smaller address.
    call(env, token_ids=prompt, sampling={"max_tokens": 2}, cache_salt="tenant-b", request_id="salted")
    assert not owner.calls[-1].request_id.startswith("salted~")
    registry.close()


def test_routes_by_load_when_redis_knows_nothing(env):
    router = env.gw.pool.router
    for busy, idle in ((0, 1), (1, 0)):
        env.prefills[busy].queued_tokens, env.prefills[idle].queued_tokens = 4000, 0
        address = f"127.0.0.1:{env.prefills[busy].port}"
        assert wait_until(lambda: router.worker("prefill", address).queued_tokens == 4000)
        rid = f"load-{busy}"
        call(env, token_ids=[busy + 1, 77], sampling={"max_tokens": 2}, request_id=rid)
        assert env.prefills[idle].calls[-1].request_id.startswith(rid + "~")


def test_decode_failure_resumes_on_another_worker(env):
    env.fail.update(armed=True, after=2)
    ids, text, final = call(env, token_ids=[5, 6], sampling={"max_tokens": 12}, request_id="resume-1")
    assert ids == list(range(1011, 1023)) and text == env.tok.decode(ids) and final.finish_reason == "length"
    first, second = sorted(decode_calls(env, "resume-1"), key=lambda c: len(c.output_token_ids))
    assert list(second.output_token_ids) == list(range(1011, 1016))  # 1 + 2 messages of 2 tokens
    assert {d.port for d in env.decodes if first in d.calls} != {d.port for d in env.decodes if second in d.calls}


@pytest.mark.parametrize("kwargs, field", [
    (dict(), "input"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
    (dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=-1)), "sampling.temperature"),
    (dict(prompt="hi", sampling=common_pb2.SamplingParams(logprobs=21)), "sampling.logprobs"),
    (dict(prompt_token_ids=gateway_pb2.TokenIds(ids=[1, VOCAB])), "prompt_token_ids[1] = 49152"),
    (dict(prompt_token_ids=gateway_pb2.TokenIds(ids=[])), "prompt_token_ids is empty"),
    (dict(prompt_token_ids=gateway_pb2.TokenIds(ids=[7] * MAX_LEN)), "max_model_len"),
    (dict(prompt="hi", model="gpt-4"), "model"),
    (dict(chat=gateway_pb2.ChatMessages(messages=[gateway_pb2.ChatMessage(role="bot", content="x")])),
     "chat.messages[0].role"),
])
def test_invalid_requests_name_the_field(env, kwargs, field):
    request = gateway_pb2.GenerateRequest(**kwargs)
    if "prompt_token_ids" in kwargs:
        request.prompt_token_ids.SetInParent()
    with pytest.raises(grpc.RpcError) as info:
        list(gateway_pb2_grpc.GatewayStub(env.channel).Generate(request, timeout=10))
    # An unknown model is NOT_FOUND (HTTP 404), like OpenAI's model_not_found.
    assert info.value.code() == (Code.NOT_FOUND if field == "model" else Code.INVALID_ARGUMENT)
    assert field in info.value.details()


def test_unavailable_when_the_decode_worker_is_down(env):
    decode = FakeDecode({"armed": False})
    server = env.run(start_fake(decode, decode_pb2_grpc.add_DecodeServicer_to_server))
    config = GatewayConfig(port=0, http_port=0, prefill=f"127.0.0.1:{env.prefills[0].port}", decode=f"127.0.0.1:{decode.port}",
                           load_poll_interval_s=0.1, startup_timeout_s=20)
    gw = env.run(serve(config))
    try:
        env.run(server.stop(0))
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            generate(gw.address, token_ids=[5, 6], sampling={"max_tokens": 8}, timeout_s=10)
        assert info.value.code() == Code.UNAVAILABLE and "decode" in info.value.details()
        assert time.monotonic() - start < 5
    finally:
        env.run(gw.stop(grace_s=0))
    # Before any decode worker answers, the gateway is up but NOT_SERVING and answers UNAVAILABLE.
    gw = env.run(serve(config, wait_ready=False))
    try:
        with pytest.raises(grpc.RpcError) as info:
            generate(gw.address, token_ids=[5, 6], timeout_s=10)
        assert info.value.code() == Code.UNAVAILABLE and "not ready" in info.value.details()
        with open_channel(gw.address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        env.run(gw.stop(grace_s=0))


def test_redis_down_reads_as_no_owners(env):
    async def read():
        reader = AsyncOwnersReader("redis://127.0.0.1:1/0", timeout_s=0.2)
        try:
            return await reader.owners([b"\x01" * 32, b"\x02" * 32]), reader.available
        finally:
            await reader.close()

    assert env.run(read()) == ([set(), set()], False)


def test_the_owner_read_answers_every_block_in_order_and_survives_a_flushed_script(env):
    """One script call reads every block's owners from a real Redis, in the order asked (blocks
    nobody owns: empty sets); when Redis has lost the script (a restart, SCRIPT FLUSH) the next
    read loads it again instead of failing over to "no owners"."""
    from splitserve.ownership.registry import block_key

    client = redis.Redis.from_url(env.redis.url)
    owned = {bytes([i]) * 32: {f"prefill:h:{i % 3}", f"kvstore:h:{i}"} for i in range(1, 70, 2)}
    for h, ids in owned.items():
        client.sadd(block_key(h), *ids)
    hashes = [bytes([i]) * 32 for i in range(1, 71)]  # every other one owned

    async def read():
        reader = AsyncOwnersReader(env.redis.url, timeout_s=1.0)
        try:
            first = await reader.owners(hashes)
            client.script_flush()
            again = await reader.owners(list(reversed(hashes)))
            return first, again, await reader.owners([]), reader.available
        finally:
            await reader.close()

    try:
        first, again, empty, available = env.run(read())
    finally:
        client.delete(*[block_key(h) for h in owned])
        client.close()
    expected = [owned.get(h, set()) for h in hashes]
    assert first == expected and again == expected[::-1] and empty == [] and available


def test_redis_probe_runs_from_start_and_never_reports_an_unprobed_redis_ok(env):
    """The reader's probe starts with the gateway (`start`), not at the first status read or
    request: a dead Redis is "degraded" from the first answer, a live one turns "ok" by itself."""
    async def probe(url: str):
        reader = AsyncOwnersReader(url, timeout_s=0.2, probe_interval_s=0.1)
        try:
            first = reader.available  # before any probe: not "ok" on hope
            reader.start()
            await asyncio.sleep(0.6)  # no status read, no owners() call meanwhile
            return first, reader.available
        finally:
            await reader.close()

    assert env.run(probe("redis://127.0.0.1:1/0")) == (False, False)
    assert env.run(probe(env.redis.url)) == (False, True)
