"""End to end: `splitserve up` as real processes, real gRPC on loopback, a real Redis.

1. 1 prefill + 1 decode worker, float32: greedy outputs equal `LLM(dtype="float32").generate`,
   one of them read as a stream chunk by chunk; 16 concurrent streams in one continuous batch;
   cancelling mid-stream frees the decode worker's blocks.
2. 2 prefill workers: a request sharing a long prefix goes to the worker that holds it, which
   computes only the suffix, and the decode worker fetches only the blocks it lacks.
"""
from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from services_fixture import start_long_stream
from splitserve import SamplingParams
from splitserve.client import generate, stream_generate
from splitserve.ownership.registry import OwnershipRegistry
from splitserve.v1 import prefill_pb2, prefill_pb2_grpc
from splitserve.rpc import channel
from splitserve.wire import sampling_to_proto

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a faraway kingdom,",
    "La tour Eiffel est",
    "1, 2, 3, 5, 8,",
    "Water boils at a temperature of",
    "The three primary colors are",
]
MAX_TOKENS = 16


def _greedy(n: int = MAX_TOKENS) -> dict:
    return {"max_tokens": n, "temperature": 0.0}


@pytest.fixture(scope="module")
def stack(http_stack):
    return http_stack  # the session's `splitserve up --dtype float32`, 1 prefill + 1 decode worker


@pytest.fixture(scope="module")
def references(llm_f32):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return {p: out for p, out in zip(PROMPTS, llm_f32.generate(PROMPTS, params))}


def test_greedy_outputs_equal_offline_engine(stack, references):
    for prompt in PROMPTS[:-1]:
        ids, text, final = generate(stack.gateway, prompt=prompt, sampling=_greedy(), timeout_s=120)
        ref = references[prompt]
        assert ids == ref.token_ids, prompt
        assert text == ref.text
        assert final.finish_reason == ref.finish_reason
        assert final.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert final.usage.completion_tokens == len(ref.token_ids)


def test_streamed_chunks_arrive_one_by_one(stack, references):
    prompt = PROMPTS[-1]
    chunks = list(stream_generate(stack.gateway, prompt=prompt, sampling=_greedy(), timeout_s=120))
    assert len(chunks) >= 4, "the answer must arrive as a stream, not in one message"
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == references[prompt].token_ids
    assert "".join(c.text for c in chunks) == references[prompt].text
    assert chunks[-1].finish_reason and not any(c.finish_reason for c in chunks[:-1])
    assert chunks[-1].timings.ttft_s > 0 and chunks[-1].timings.e2e_s >= chunks[-1].timings.ttft_s


def test_sixteen_concurrent_streams_share_one_batch(stack, llm_f32):
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]
    # Long enough that the first stream is still decoding when the last prefill returns.
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    refs = llm_f32.generate(prompts, params)
    sampling = {"max_tokens": 48, "temperature": 0.0, "ignore_eos": True}
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: generate(stack.gateway, prompt=p, sampling=sampling, timeout_s=300), prompts))
    for (ids, text, final), ref in zip(results, refs):
        assert ids == ref.token_ids
        assert final.finish_reason == "length"
    assert stack.decode_load().max_batch_size == 16


def test_cancel_mid_stream_frees_decode_blocks(stack):
    def usage():
        return stack.decode_load().kv_cache_usage

    before = usage()
    stream = start_long_stream(stack.gateway, "Tell me a very long story about dragons.")
    busy = usage()
    stream.close()  # cancels the call
    deadline = time.monotonic() + 20
    while usage() != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert busy > before, "the decode worker held blocks for the running request"
    assert usage() == before


def test_a_request_leaves_no_kvstore_lease_behind(stack):
    """A put's lease lasts until the decode worker fetched under it; a request of one token (no
    decode follows) has its lease released by the prefill worker, not left to its TTL. (A caller
    gone before the put's result reached the gateway has it released too; one gone after, while
    the decode call was being opened, can leave it to the TTL: that race is not asserted here.)"""
    from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

    def leases() -> int:
        with channel(stack.roles["kvstore"]) as ch:
            return kvstore_pb2_grpc.KVStoreStub(ch).Stats(kvstore_pb2.StatsRequest(), timeout=10).num_leases

    def settled(expected: int) -> int:
        deadline = time.monotonic() + 10
        while leases() != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return leases()

    before = leases()
    words = "lease " * 60  # several full blocks to put
    for i, n in enumerate((1, 3)):
        got = generate(stack.gateway, prompt=f"{i} {words}", timeout_s=60, sampling=_greedy(n))
        assert len(got.token_ids) == n
        assert settled(before) == before, n
    # a conversation's next turn: the prefill puts the block its last answer filled, which the
    # decode worker (that decoded the answer) holds already and so does not fetch
    turn = [21000 + 3 * i for i in range(80)]  # 5 full blocks of ids no other test of the shared stack sends
    got = generate(stack.gateway, token_ids=turn, timeout_s=60, sampling=dict(_greedy(20), ignore_eos=True))
    assert len(got.token_ids) == 20  # the answer fills block 5 (tokens 80-95)
    assert settled(before) == before
    got = generate(stack.gateway, token_ids=turn + got.token_ids, timeout_s=60, sampling=_greedy(3))
    assert got.final.usage.cached_tokens >= 80
    assert settled(before) == before


# --------------------------------------------------------------------------- two prefill workers


@pytest.fixture(scope="module")
def stack2(two_prefill_stack):
    return two_prefill_stack


def test_shared_prefix_goes_to_its_owner(stack2, llm_f32):
    tok = llm_f32.tokenizer
    prefix = tok.encode(
        "You are a meticulous assistant. Read the following notes carefully before answering. "
        "The warehouse opens at seven, the trucks leave at nine, and inventory is counted every Friday "
        "by the night shift, who report to the logistics manager on the second floor. Deliveries that "
        "arrive late are logged in the blue binder, and damaged goods are photographed before storage."
    )[:64]  # four full blocks
    assert len(prefix) == 64
    first = prefix + tok.encode(" Question one: when do the trucks leave?")
    second = prefix + tok.encode(" Question two: who counts the inventory?")
    third = prefix + tok.encode(" Question three: where is the logistics manager?")
    owner = sorted(stack2.roles[n] for n in ("prefill-0", "prefill-1"))[1]  # not the tie-break's pick
    other = next(a for n, a in stack2.roles.items() if n.startswith("prefill") and a != owner)
    stub = prefill_pb2_grpc.PrefillStub(channel(owner))
    *_, warm = stub.Prefill(prefill_pb2.PrefillRequest(  # the first token, then the put's result
        request_id="warm", prompt_token_ids=first,
        sampling=sampling_to_proto(SamplingParams(temperature=0, max_tokens=1))), timeout=60)
    registry = OwnershipRegistry(stack2.redis_url)
    prefix_hashes = list(warm.block_hashes)[:4]
    for owners in registry.owners(prefix_hashes):
        assert f"prefill:{owner}" in owners and f"prefill:{other}" not in owners

    def load(addr):
        return prefill_pb2_grpc.PrefillStub(channel(addr)).GetLoad(prefill_pb2.LoadRequest(), timeout=10)

    # The warm-up bypassed the gateway, which polls loads every 0.5 s: let it see the owner idle
    # again, or the owner's queue from a stale poll can outweigh its prefix.
    time.sleep(1.5)
    owner_before, other_before = load(owner), load(other)
    ids, _, final = generate(stack2.gateway, token_ids=second, sampling=_greedy(8), timeout_s=120)
    owner_after, other_after = load(owner), load(other)
    assert final.usage.cached_tokens == 64
    assert owner_after.prompt_tokens_computed - owner_before.prompt_tokens_computed == len(second) - 64
    # the kvstore holds the prefix's blocks already (the Contains call that ran during the prefill
    # said so): only the new full blocks were put
    assert owner_after.num_blocks_put - owner_before.num_blocks_put == len(second) // 16 - 4
    assert other_after.prompt_tokens_computed == other_before.prompt_tokens_computed  # never asked
    (ref,) = llm_f32.generate([second], SamplingParams(temperature=0, max_tokens=8))
    assert ids == ref.token_ids
    for owners in registry.owners(prefix_hashes):
        assert {f"prefill:{owner}", f"decode:{stack2.roles['decode-0']}"} <= owners
        assert any(o.startswith("kvstore:") for o in owners)

    # The decode worker now holds the prefix: for a third request it imports only the new blocks.
    dec_before = stack2.decode_load()
    generate(stack2.gateway, token_ids=third, sampling=_greedy(4), timeout_s=120)
    dec_after = stack2.decode_load()
    new_full_blocks = len(third) // 16 - 4
    assert dec_after.num_imported_blocks - dec_before.num_imported_blocks == new_full_blocks
    assert dec_after.num_recomputed == dec_before.num_recomputed


def _decode_gauge(stack, name: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.metrics["decode-0"], timeout=30) as resp:
        text = resp.read().decode()
    return next((s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name), None)


def _decode_gets(stack) -> float:
    """The decode worker's kv_transfer_seconds_count{direction="get"}: its get calls that answered."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(stack.metrics["decode-0"], timeout=30) as resp:
        text = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "splitserve_kv_transfer_seconds_count" and s.labels.get("direction") == "get")


def test_a_prompt_over_the_fetch_buffer_is_read_straight_into_its_pages(stack2, llm_f32):
    """The decode worker's fetch buffer holds two blocks (conftest: two_prefill_stack), but the
    kvstore is on the same host: a prompt of 13 full blocks is read from its slots straight into
    the pages the engine gave them, in one get and outside the buffer, every block imported,
    nothing recomputed, the output the offline engine's; sixteen such requests at once all answer.
    (From a kvstore on another host the payloads travel as bytes, in parts of at most the buffer:
    tests/unit/test_transfer.py, and tests/e2e/test_multihost.py through a network.)"""
    from services_fixture import FETCH_BUFFER_MB

    assert int(FETCH_BUFFER_MB * 2**20 // (16 * 30 * 2 * 3 * 64 * 4)) == 2  # blocks a part
    prompts = [[(7919 * (i + 1) * j) % 40000 + 100 for j in range(13 * 16 + 5)] for i in range(17)]
    refs = llm_f32.generate(prompts, SamplingParams(temperature=0, max_tokens=4))
    before, gets_before = stack2.decode_load(), _decode_gets(stack2)
    ids, _, final = generate(stack2.gateway, token_ids=prompts[0], sampling=_greedy(4), timeout_s=120)
    after = stack2.decode_load()
    assert ids == refs[0].token_ids and final.usage.cached_tokens == 0
    assert after.num_imported_blocks - before.num_imported_blocks == 13
    assert _decode_gets(stack2) - gets_before == 1
    assert after.num_recomputed == before.num_recomputed
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: generate(stack2.gateway, token_ids=p, sampling=_greedy(4), timeout_s=300),
                                prompts[1:]))
    assert [r[0] for r in results] == [r.token_ids for r in refs[1:]]
    end = stack2.decode_load()
    assert end.num_imported_blocks - after.num_imported_blocks == 16 * 13
    assert end.num_recomputed == before.num_recomputed


def test_callers_that_give_up_at_any_point_leave_no_fetch_buffer_room_held(stack2, llm_f32):
    """Sixteen requests of 13-block prompts whose callers give up after 20 ms to 1 s (before their
    prefill, while their blocks are fetched, while they decode): afterwards a prompt that needs the
    whole fetch buffer is answered right and no worker holds blocks for the abandoned ones (a page
    import, or a prefill's pinned export, left behind by a gone caller)."""
    import grpc

    prompts = [[(104729 * (i + 3) * j) % 40000 + 100 for j in range(13 * 16 + 3)] for i in range(17)]
    before = stack2.decode_load()
    prefills = [name for name in stack2.roles if name.startswith("prefill")]
    prefill_free = [stack2.prefill_load(name).num_free_blocks for name in prefills]

    def abandon(i: int) -> None:
        try:
            for _ in stream_generate(stack2.gateway, token_ids=prompts[i], timeout_s=0.02 + 0.065 * i,
                                     sampling={"max_tokens": 64, "temperature": 0.0, "ignore_eos": True}):
                pass
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(abandon, range(16)))
    (ref,) = llm_f32.generate([prompts[16]], SamplingParams(temperature=0, max_tokens=4))
    ids, _, _ = generate(stack2.gateway, token_ids=prompts[16], sampling=_greedy(4), timeout_s=60)
    assert ids == ref.token_ids
    deadline = time.monotonic() + 20
    while stack2.decode_load().num_running and time.monotonic() < deadline:
        time.sleep(0.2)
    after = stack2.decode_load()
    assert after.num_running == 0 and after.num_waiting == 0
    assert after.num_free_blocks == before.num_free_blocks  # cached blocks count as free: nothing held
    assert _decode_gauge(stack2, "splitserve_kv_fetch_buffer_bytes") == 0  # and no payload
    # nor do the prefill workers: no exported block stays pinned for an answer nobody read
    assert [stack2.prefill_load(name).num_free_blocks for name in prefills] == prefill_free


@pytest.mark.parametrize("kvstore", ["live", "down"])
def test_decode_recomputes_when_import_fails(stack2, llm_f32, kvstore):
    """Blocks the kvstore does not have, or a kvstore that is down: the decode worker recomputes."""
    from splitserve.v1 import decode_pb2, decode_pb2_grpc

    text = f"A prompt no prefill worker has seen ({kvstore}): mountains, rivers, glaciers and the open sea."
    ids = llm_f32.tokenizer.encode(text)
    assert len(ids) >= 16
    (ref,) = llm_f32.generate([ids], SamplingParams(temperature=0, max_tokens=8))
    address = stack2.roles["kvstore"] if kvstore == "live" else "127.0.0.1:1"
    before = stack2.decode_load()
    stub = decode_pb2_grpc.DecodeStub(channel(stack2.roles["decode-0"]))
    msgs = list(stub.Decode(decode_pb2.DecodeRequest(
        request_id=f"orphan-{kvstore}", prompt_token_ids=ids, output_token_ids=ref.token_ids[:1],
        sampling=sampling_to_proto(SamplingParams(temperature=0, max_tokens=8)), kvstore_address=address,
    ), timeout=60))
    assert msgs[0].recomputed and msgs[0].num_imported_blocks == 0
    assert ref.token_ids[:1] + [t for m in msgs for t in m.token_ids] == ref.token_ids
    assert msgs[-1].finish_reason == ref.finish_reason
    assert stack2.decode_load().num_recomputed == before.num_recomputed + 1
