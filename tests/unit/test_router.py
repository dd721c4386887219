"""Routing policy: exact costs, prefix runs, busy skipping, ties and reasons (pure, no I/O)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from splitserve.gateway.router import DECODE, PREFILL, NoWorkerAvailable, Router, WorkerState, prefix_hit_blocks
from splitserve.config.gateway import RouterConfig

BS = 16
HASHES = [bytes([i]) * 32 for i in range(4)]  # 4 full blocks: a prompt of 64..79 tokens


def load(worker_id: str, **fields) -> SimpleNamespace:
    base = dict(num_running=0, num_waiting=0, queued_tokens=0, kv_cache_usage=0.0, num_free_blocks=1000,
                num_total_blocks=1000)
    base.update(fields)
    return SimpleNamespace(worker_id=worker_id, **base)


def make_router(prefill=("a:1", "b:2"), decode=("c:3", "d:4"), **cfg) -> Router:
    router = Router(RouterConfig(**cfg), BS, list(prefill), list(decode))
    for role, addresses in ((PREFILL, prefill), (DECODE, decode)):
        for a in addresses:
            router.observe_load(role, a, load(f"{role}:{a}"))
    return router


def owners_of(*runs: set[str]) -> list[set[str]]:
    return [set(r) for r in runs]


def test_prefix_hit_is_the_leading_run_only():
    owners = owners_of({"x"}, {"x", "y"}, {"y"}, {"x"})
    assert prefix_hit_blocks(owners, "x") == 2  # block 2 breaks x's run; block 3 does not count
    assert prefix_hit_blocks(owners, "y") == 0
    assert prefix_hit_blocks(owners, "") == 0
    assert prefix_hit_blocks([], "x") == 0


def test_prefill_cost_is_uncached_blocks_plus_queued_blocks():
    r = make_router()
    a, b = r.worker(PREFILL, "a:1"), r.worker(PREFILL, "b:2")
    a.queued_tokens, b.queued_tokens = 8, 40
    owners = owners_of({"prefill:a:1", "prefill:b:2"}, {"prefill:a:1"}, {"prefill:a:1"}, set())
    d = r.pick_prefill(HASHES, owners, prompt_len=70)  # ceil(70/16) = 5 prompt blocks
    # a: 1.0 * (5 - 3) + 8/16 = 2.5 ; b: 1.0 * (5 - 1) + 40/16 = 6.5
    assert (d.worker.address, d.hit_blocks, d.cost, d.reason) == ("a:1", 3, 2.5, "prefix")


def test_load_beats_prefix_when_the_owner_is_loaded():
    r = make_router(overlap_weight=2.0)
    r.worker(PREFILL, "a:1").queued_tokens = 16 * 10
    owners = owners_of({"prefill:a:1"}, {"prefill:a:1"}, {"prefill:a:1"}, {"prefill:a:1"})
    d = r.pick_prefill(HASHES, owners, prompt_len=64)
    # a: 2 * (4 - 4) + 160/16 = 10 ; b: 2 * 4 + 0 = 8
    assert (d.worker.address, d.hit_blocks, d.cost, d.reason) == ("b:2", 0, 8.0, "load")


def test_prefill_ties_go_to_fewest_inflight_then_address():
    r = make_router(prefill=("b:2", "a:1", "c:5"))
    owners = owners_of(set(), set(), set(), set())
    d = r.pick_prefill(HASHES, owners, prompt_len=64)
    assert (d.worker.address, d.cost, d.reason) == ("a:1", 4.0, "load")  # all cost 4: smallest address
    r.begin(r.worker(PREFILL, "a:1"), tokens=0)  # one request in flight, no queued tokens
    assert r.pick_prefill(HASHES, owners, 64).worker.address == "b:2"
    r.end(r.worker(PREFILL, "a:1"), tokens=0)
    assert r.pick_prefill(HASHES, owners, 64).worker.address == "a:1"


def test_inflight_tokens_count_when_the_report_lags():
    r = make_router()
    a = r.worker(PREFILL, "a:1")
    r.begin(a, tokens=64)  # this gateway sent 64 uncached tokens; a's report still says 0
    assert a.effective_queued_tokens == 64
    d = r.pick_prefill(HASHES, owners_of(set(), set(), set(), set()), prompt_len=64)
    assert (d.worker.address, d.cost) == ("b:2", 4.0)  # a would cost 4 + 64/16 = 8
    a.queued_tokens = 100  # a fresh report that includes ours: max, not sum
    assert a.effective_queued_tokens == 100


def test_busy_workers_are_skipped_unless_all_are():
    r = make_router(busy_queued_tokens=100)
    a, b = r.worker(PREFILL, "a:1"), r.worker(PREFILL, "b:2")
    a.queued_tokens = 101  # over the threshold, despite holding the whole prefix
    owners = owners_of(*[{"prefill:a:1"}] * 4)
    d = r.pick_prefill(HASHES, owners, prompt_len=64)
    assert (d.worker.address, d.cost, d.reason) == ("b:2", 4.0, "load")
    b.queued_tokens = 480  # both busy: least cost among all, a fallback
    d = r.pick_prefill(HASHES, owners, prompt_len=64)
    # a: 0 + 101/16 = 6.3125 ; b: 4 + 480/16 = 34
    assert (d.worker.address, d.cost, d.reason) == ("a:1", 6.3125, "fallback")
    a.queued_tokens = 100  # at the threshold is not over it
    assert r.pick_prefill(HASHES, owners, 64).reason == "prefix"


def test_busy_threshold_zero_never_skips():
    r = make_router(busy_queued_tokens=0)
    r.worker(PREFILL, "a:1").queued_tokens = 10**6
    r.worker(PREFILL, "b:2").queued_tokens = 10**6 + 16
    assert r.pick_prefill(HASHES, owners_of(*[set()] * 4), 64).reason == "load"


def test_only_unhealthy_and_excluded_workers():
    r = make_router()
    r.observe_failure(PREFILL, "b:2", "GetLoad failed")
    d = r.pick_prefill(HASHES, owners_of(*[{"prefill:b:2"}] * 4), 64)
    assert (d.worker.address, d.hit_blocks, d.reason) == ("a:1", 0, "only")
    r.observe_load(PREFILL, "b:2", load("prefill:b:2"))  # healed by a good poll
    d = r.pick_prefill(HASHES, owners_of(*[set()] * 4), 64, exclude={"a:1"})
    assert (d.worker.address, d.reason) == ("b:2", "fallback")  # a retry after a failure
    with pytest.raises(NoWorkerAvailable, match=r"no prefill worker available: none of 2 is healthy \(2 tried\)"):
        r.pick_prefill(HASHES, owners_of(*[set()] * 4), 64, exclude={"a:1", "b:2"})
    fresh = Router(RouterConfig(), BS, ["x:1"], [])
    with pytest.raises(NoWorkerAvailable, match="none of 1 is healthy"):  # never answered
        fresh.pick_prefill([], [], 3)
    with pytest.raises(NoWorkerAvailable, match="no decode worker available: none configured"):
        fresh.pick_decode([], [])


def test_decode_cost_prefers_held_blocks_few_sequences_free_cache():
    r = make_router()
    c, d_ = r.worker(DECODE, "c:3"), r.worker(DECODE, "d:4")
    c.num_running, c.kv_cache_usage = 3, 0.25
    d_.num_running, d_.num_waiting, d_.kv_cache_usage = 1, 0, 0.5
    owners = owners_of({"decode:c:3", "prefill:a:1"}, {"decode:c:3"}, {"kvstore:k:9"}, set())
    dec = r.pick_decode(HASHES, owners, num_tokens=65)
    # c: 1 * (4 - 2) + 1 * 3 + 16 * 0.25 = 9 ; d: 1 * 4 + 1 * 1 + 16 * 0.5 = 13
    assert (dec.worker.address, dec.hit_blocks, dec.cost, dec.reason) == ("c:3", 2, 9.0, "prefix")
    c.num_running = 8  # c: 2 + 8 + 4 = 14 > 13
    dec = r.pick_decode(HASHES, owners, num_tokens=65)
    assert (dec.worker.address, dec.hit_blocks, dec.cost, dec.reason) == ("d:4", 0, 13.0, "load")


def test_decode_busy_on_kv_usage_or_too_few_free_blocks():
    r = make_router(decode_busy_kv_usage=0.9)
    c, d_ = r.worker(DECODE, "c:3"), r.worker(DECODE, "d:4")
    c.kv_cache_usage = 0.9  # at the threshold: busy
    d_.num_running = 10
    assert r.pick_decode(HASHES, owners_of(*[set()] * 4), 65).worker.address == "d:4"
    d_.num_free_blocks = 4  # 65 tokens need 5 blocks: d is short too, so both busy
    dec = r.pick_decode(HASHES, owners_of(*[set()] * 4), 65)
    # c: 4 + 0 + 16 * 0.9 = 18.4 ; d: 4 + 10 + 0 = 14
    assert (dec.worker.address, dec.cost, dec.reason) == ("d:4", 14.0, "fallback")
    d_.num_free_blocks = 3  # holding 2 of the blocks, d needs only 3 more
    dec = r.pick_decode(HASHES, owners_of({"decode:d:4"}, {"decode:d:4"}, set(), set()), 65)
    assert (dec.worker.address, dec.reason) == ("d:4", "prefix")


def test_decisions_are_counted_by_target_and_reason():
    r = make_router()
    empty = owners_of(*[set()] * 4)
    r.pick_prefill(HASHES, empty, 64)
    r.pick_prefill(HASHES, owners_of(*[{"prefill:b:2"}] * 4), 64)
    r.pick_decode(HASHES, empty, 64)
    r.observe_failure(DECODE, "d:4", "down")
    r.pick_decode(HASHES, empty, 64)
    assert dict(r.decisions) == {("prefill", "load"): 1, ("prefill", "prefix"): 1, ("decode", "load"): 1,
                                 ("decode", "only"): 1}


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="overlap_weight"):
        RouterConfig(overlap_weight=-1.0)
    with pytest.raises(ValueError, match="decode_busy_kv_usage"):
        RouterConfig(decode_busy_kv_usage=0.0)
    with pytest.raises(ValueError, match="listed twice"):
        Router(RouterConfig(), BS, ["a:1", "a:1"], [])
    r = make_router()
    with pytest.raises(ValueError, match="owners has 3 entries for 4 block hashes"):
        r.pick_prefill(HASHES, owners_of(set(), set(), set()), 64)
    with pytest.raises(ValueError, match="4 full blocks do not fit in 63 tokens"):
        r.pick_prefill(HASHES, owners_of(*[set()] * 4), 63)
    with pytest.raises(ValueError, match="role"):
        r.workers("kvstore")
    assert [w.address for w in r.workers(PREFILL)] == ["a:1", "b:2"]
    assert isinstance(r.workers(DECODE)[0], WorkerState)


def test_owners_matter_only_where_a_role_has_two_routable_workers():
    """The gateway reads a prompt's Redis owners only when they can change a pick."""
    one = make_router(prefill=("a:1",), decode=("c:3",))
    assert not one.owners_matter()  # `splitserve up`: every pick is the only worker
    # and the pick with unknown owners is the one the owners would give
    assert one.pick_prefill(HASHES, [set()] * 4, prompt_len=64).worker.address == "a:1"
    two = make_router()
    assert two.owners_matter()
    two.worker(PREFILL, "b:2").draining = True
    two.worker(DECODE, "d:4").healthy = False
    assert not two.owners_matter()  # one routable worker a role again
    two.worker(DECODE, "d:4").healthy = True
    assert two.owners_matter()
