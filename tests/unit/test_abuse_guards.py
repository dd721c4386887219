"""Pure parts of the abuse guards (issue 18): the disconnect watch of non-streamed HTTP requests,
an aborted engine request waking the thread that waits on it, and the protobuf fuzzer's messages."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest
from google.protobuf.message import DecodeError

from splitserve.bench import grpc_fuzz as gf
from splitserve.engine.engine_loop import RequestAborted, RequestStream
from splitserve.gateway.disconnect import ClientDisconnected, until_disconnect
from splitserve.v1 import common_pb2, prefill_pb2


def _receive(disconnect_after_s: float | None):
    async def receive():
        if disconnect_after_s is None:
            await asyncio.Event().wait()  # the client stays
        await asyncio.sleep(disconnect_after_s)
        return {"type": "http.disconnect"}
    return receive


def test_until_disconnect_returns_the_work_while_the_client_stays():
    async def work():
        await asyncio.sleep(0.01)
        return 7
    assert asyncio.run(until_disconnect(_receive(None), work())) == 7


def test_until_disconnect_cancels_the_work_when_the_client_goes():
    state = {}

    async def work():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    async def main():
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(ClientDisconnected):
            await until_disconnect(_receive(0.05), work())
        return asyncio.get_running_loop().time() - t0

    assert asyncio.run(main()) < 1.0 and state == {"cancelled": True}


def test_until_disconnect_passes_the_works_error_on():
    async def work():
        raise KeyError("boom")
    with pytest.raises(KeyError):
        asyncio.run(until_disconnect(_receive(None), work()))


class _Loop:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def test_abort_wakes_a_thread_blocked_on_the_next_output():
    loop = _Loop()
    stream = RequestStream("r1", loop)
    got = []
    reader = threading.Thread(target=lambda: got.append(list(stream)))  # iteration ends quietly
    getter_errors = []

    def get():
        try:
            RequestStream.get(stream2)
        except RequestAborted as exc:
            getter_errors.append(exc)

    stream2 = RequestStream("r2", loop)
    getter = threading.Thread(target=get)
    reader.start()
    getter.start()
    stream.abort()
    stream2.abort()
    reader.join(2)
    getter.join(2)
    assert not reader.is_alive() and not getter.is_alive()
    assert got == [[]] and len(getter_errors) == 1 and "r2" in str(getter_errors[0])
    assert loop.aborted == ["r1", "r2"]


@pytest.mark.parametrize("kind", gf.KINDS)
def test_fuzz_messages_are_deterministic_per_seed(kind):
    seed = prefill_pb2.PrefillRequest(request_id="x", prompt_token_ids=[1, 2, 3],
                                      sampling=common_pb2.SamplingParams(max_tokens=2, stop=["a"]))
    a = gf.make_message(seed, kind, random.Random(5))
    b = gf.make_message(seed, kind, random.Random(5))
    assert a == b and isinstance(a, bytes)


def test_fuzz_mutations_reach_nested_fields_and_make_unparsable_bytes():
    seed = prefill_pb2.PrefillRequest(request_id="x", prompt_token_ids=[1, 2, 3],
                                      sampling=common_pb2.SamplingParams(max_tokens=2, stop=["a"]))
    method = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].methods_by_name["Prefill"]
    parsed = broken = nested_changed = 0
    for i in range(300):
        raw = gf.make_message(seed, "mutated", random.Random(i))
        try:
            msg = gf.parse_check(method, raw)
        except DecodeError:
            broken += 1
            continue
        parsed += 1
        nested_changed += msg.sampling != seed.sampling
    assert parsed > 100 and broken > 10 and nested_changed > 10


def test_generated_stubs_are_not_registered_so_unimplemented_calls_log_nothing():
    from grpc_health.v1 import health

    from splitserve.rpc import _implementation

    for servicer in (health.HealthServicer(), health.aio.HealthServicer()):
        assert _implementation(servicer, "List") is None  # grpcio's stub: raises and logs per call
        assert _implementation(servicer, "Check") is not None and _implementation(servicer, "Watch") is not None
    assert _implementation(object(), "Check") is None
