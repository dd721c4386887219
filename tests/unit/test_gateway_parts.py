"""The gateway's small pure parts: a request's trace, rejection reasons, and the owner read's key
building and reply parsing (shared by the registry and the gateway's async reader)."""
from __future__ import annotations

import grpc
import pytest

from splitserve.gateway.context import RouteTrace, StageTimes
from splitserve.gateway.errors import reject_reason
from splitserve.ownership.registry import block_key, owner_sets, queue_owner_reads

Code = grpc.StatusCode


def test_stage_times_give_each_stage_its_duration():
    t = StageTimes(arrival=10.0, prefill=10.5, prefilled=11.25, first=11.5).timings(end=14.0)
    assert (t.queue_s, t.prefill_s, t.ttft_s, t.decode_s, t.e2e_s) == (0.5, 0.75, 1.5, 2.5, 4.0)


def test_route_trace_logs_the_fields_set_sorted_by_name():
    route = RouteTrace(prefill_worker="127.0.0.1:1", prefill_reason="prefix")
    assert route.log_fields() == "prefill_reason=prefix prefill_worker=127.0.0.1:1"
    route.decode_worker, route.decode_reason = "127.0.0.1:2", "load"
    route.imported_blocks, route.local_hit_blocks, route.recomputed = 3, 0, False
    assert route.log_fields() == ("decode_reason=load decode_worker=127.0.0.1:2 imported_blocks=3 "
                                  "local_hit_blocks=0 prefill_reason=prefix prefill_worker=127.0.0.1:1 "
                                  "recomputed=False")
    assert RouteTrace().log_fields() == ""


def test_rejection_reasons_by_status():
    assert [reject_reason(c) for c in (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.UNAVAILABLE,
                                       Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED, Code.CANCELLED,
                                       Code.UNAUTHENTICATED, Code.INTERNAL)] == \
        ["invalid", "unknown_model", "unavailable", "queue_full", "deadline", "cancelled", "unauthenticated", "error"]


class RecordingPipe:
    def __init__(self) -> None:
        self.commands: list[tuple[str, str]] = []

    def smembers(self, key: str) -> None:
        self.commands.append(("smembers", key))


def test_owner_read_queues_one_smembers_per_block_and_parses_the_replies():
    pipe = RecordingPipe()
    queue_owner_reads(pipe, [b"\x01\x02", bytearray(b"\xff")])
    assert pipe.commands == [("smembers", "ss:blk:0102"), ("smembers", "ss:blk:ff")]
    assert owner_sets([{b"prefill:h:1", b"kvstore:h:2"}, set()]) == [{"prefill:h:1", "kvstore:h:2"}, set()]
    for bad in (b"", "0102", None):
        with pytest.raises(ValueError, match="block hash must be non-empty bytes"):
            block_key(bad)


def test_failover_retries_what_another_worker_may_answer_within_the_budget():
    from splitserve.gateway.failover import may_retry

    for code in (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.CANCELLED):
        assert may_retry(code, 0, 2) and may_retry(code, 1, 2) and not may_retry(code, 2, 2)
    for code in (Code.INVALID_ARGUMENT, Code.DEADLINE_EXCEEDED, Code.INTERNAL, Code.NOT_FOUND):
        assert not may_retry(code, 0, 2)
    assert not may_retry(Code.UNAVAILABLE, 0, 0)  # --max-retries 0: the first failure ends the request


def test_a_decode_request_continues_from_every_token_streamed_and_drops_a_stale_rng_state():
    from types import SimpleNamespace

    from splitserve.gateway.context import RequestContext
    from splitserve.gateway.failover import decode_request
    from splitserve.gateway.prepare import PreparedRequest
    from splitserve.sampling_params import SamplingParams
    from splitserve.v1 import common_pb2, prefill_pb2

    req = PreparedRequest("r", "r~1", [5, 6, 7], SamplingParams(seed=1), common_pb2.SamplingParams(seed=1), "salt",
                          [b"\x01" * 32])
    ctx = RequestContext(req, deadline=0.0, times=StageTimes(arrival=0.0))
    first = prefill_pb2.PrefillResponse(kvstore_address="kv:1", rng_state=b"state")
    fresh = decode_request(ctx, first, SimpleNamespace(token_ids=[9]))
    assert (fresh.request_id, list(fresh.prompt_token_ids), list(fresh.output_token_ids)) == ("r~1", [5, 6, 7], [9])
    assert (fresh.cache_salt, list(fresh.block_hashes), fresh.kvstore_address) == ("salt", [b"\x01" * 32], "kv:1")
    assert fresh.rng_state == b"state" and fresh.sampling.seed == 1
    resumed = decode_request(ctx, first, SimpleNamespace(token_ids=[9, 10, 11]))
    assert list(resumed.output_token_ids) == [9, 10, 11] and resumed.rng_state == b""
