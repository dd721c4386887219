"""A bounded run of the protobuf fuzzer (splitserve.bench.grpc_fuzz) against every gRPC service of
the shared stack: random, truncated, bit-flipped and field-mutated messages and valid ones with
extreme values. No message may get INTERNAL or UNKNOWN, no process may die, and a valid request
is served afterwards. benchmarks/fuzz_grpc.py runs 10,000 messages per service."""
from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.bench import grpc_fuzz as gf
from splitserve.client import generate
from splitserve.rpc import channel
from splitserve.sampling_params import SamplingParams

# Messages per service: what a valid request costs sets the count (a gateway Generate runs prefill
# and decode; the kvstore and health answers take a millisecond).
COUNTS = {"gateway": 100, "prefill": 150, "decode": 150, "kvstore": 400, "health": 400}


def test_fuzzed_messages_never_get_internal_or_unknown_nor_kill_a_role(http_stack, llm_f32):
    roles = http_stack.roles
    pids = {name: http_stack.pid(name) for name in roles}
    info = gf.stack_info(http_stack.gateway, roles["prefill-0"], roles["decode-0"], roles["kvstore"])
    reports = gf.fuzz(gf.targets(info), COUNTS, seed=18, timeout_s=20.0)

    assert {name: r.messages for name, r in reports.items()} == COUNTS
    assert {name: r.bad for name, r in reports.items() if r.num_bad} == {}
    for name, r in reports.items():  # the fuzz reached the handlers: some refused, some served
        assert r.codes["INVALID_ARGUMENT"] > 0 and r.codes["OK"] > 0, (name, r.codes)
    assert {name: http_stack.pid(name) for name in roles} == pids  # nothing died (and was restarted)
    for address in (info.gateway, info.prefill, info.decode, info.kvstore):
        with channel(address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, address
    prompt = "The capital of France is"
    ref = llm_f32.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    got = generate(http_stack.gateway, prompt=prompt, timeout_s=60,
                   sampling={"max_tokens": 6, "temperature": 0.0, "ignore_eos": True})
    assert list(got.token_ids) == list(ref.token_ids)
