"""KV transfer without gRPC: which blocks a prefill exports, which a decode fetches, imports or
recomputes, against fake stores with exact answers (block hashes, block ids, counts, metrics)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
import torch

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.hashing import block_hashes, hash_namespace
from splitserve.engine.kv_cache import KVCache
from splitserve.transfer.block import KVBlockError, encode_block
from splitserve.transfer.export import BlockExporter
from splitserve.transfer.fetch import NOTHING_FETCHED, BlockFetcher, Fetched, FetchBuffer, FetchPlan, fetch, settle
from splitserve.transfer.pages import blocks_to_export, import_blocks, read_blocks

BS = 4
MODEL = "test-model"
H = block_hashes(list(range(6 * BS)), BS, hash_namespace(MODEL))  # 6 full blocks: H[0] .. H[5]


class FakeMetrics:
    def __init__(self):
        self.calls = []

    def touch(self, *names, **labels):
        pass

    def kv_transfer(self, direction, nbytes, seconds):
        self.calls.append(("bytes", direction, nbytes))

    def kv_transfer_failed(self, direction):
        self.calls.append(("failed", direction))


class Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection refused"


def cache_with_blocks(num_blocks: int, seed: int = 0) -> KVCache:
    cache = KVCache(num_layers=2, num_kv_heads=1, head_dim=4, block_size=BS, num_blocks=num_blocks,
                    dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for t in cache.k_caches + cache.v_caches:
        t.copy_(torch.randn(t.shape, generator=gen))
    return cache


def wire_blocks(hashes, seed: int = 0):
    """One encoded block per hash, block i of a seeded cache under hashes[i]."""
    cache = cache_with_blocks(max(1, len(hashes)), seed)
    return [encode_block(cache, i, h, MODEL) for i, h in enumerate(hashes)]


# ------------------------------------------------------------------ export (prefill side)
def test_export_selects_computed_full_prompt_blocks_not_skipped():
    # 22 prompt tokens: 5 full blocks; all computed; the store holds blocks 1 and 3.
    selected, hashes = blocks_to_export(H, num_prompt_tokens=22, num_computed_tokens=23, block_size=BS,
                                        skip={H[1], H[3]})
    assert hashes == H[:5]
    assert selected == [(0, H[0]), (2, H[2]), (4, H[4])]
    # Only 9 tokens computed (an aborted chunked prefill): the 2 full blocks so far.
    selected, hashes = blocks_to_export(H, 22, 9, BS, skip=())
    assert (selected, hashes) == ([(0, H[0]), (1, H[1])], H[:2])


def test_read_blocks_reads_the_pages_of_the_block_table():
    cache = cache_with_blocks(6)
    blocks = read_blocks(cache, block_table=[5, 2, 0], selected=[(0, H[0]), (2, H[2])], model_id=MODEL)
    assert [h.block_hash for h, _ in blocks] == [H[0], H[2]]
    assert [p for _, p in blocks] == [cache.read_block(5), cache.read_block(0)]


class FakeSink:
    address = "kv:1"

    def __init__(self, present=(), fail=False, contains_error=None):
        self.present, self.fail, self.puts, self.asked = set(present), fail, [], []
        self.contains_error = contains_error

    def contains_future(self, hashes):
        self.asked.append(list(hashes))
        future = concurrent.futures.Future()
        if self.contains_error is not None:
            future.set_exception(self.contains_error)
        else:
            future.set_result(SimpleNamespace(present=[h in self.present for h in hashes]))
        return future

    def put(self, blocks, lease_id="", lease_ttl_s=0.0):
        if self.fail:
            raise Unavailable()
        self.puts.append(([h.block_hash for h, _ in blocks], lease_id, lease_ttl_s))


def test_export_asks_the_kvstore_once_and_puts_only_what_it_lacks():
    """With a kvstore the engine skips nothing (every full block is exported, pinned); `export`
    asks which of them the kvstore holds, after the first token, and puts the others."""
    sink = FakeSink(present={H[0], H[2]})
    exporter = BlockExporter(sink, FakeMetrics(), lambda hashes: None, 30.0)
    assert not any(h in exporter.skip for h in H)
    assert exporter.export("r", H[:4], wire_blocks(H[:4])) == ("kv:1", 2, 2, "")
    assert sink.asked == [H[:4]] and sink.puts == [([H[1], H[3]], "r", 30.0)]
    assert (exporter.num_blocks_put, exporter.num_blocks_skipped) == (2, 2)


@pytest.mark.parametrize("answer", ["failed", "late"])
def test_export_puts_every_block_when_the_contains_call_failed_or_came_late(answer):
    class Silent(FakeSink):  # answers after the exporter stopped waiting
        def contains_future(self, hashes):
            self.asked.append(list(hashes))
            self.future = concurrent.futures.Future()
            return self.future

    sink = FakeSink(present=set(H), contains_error=Unavailable()) if answer == "failed" else Silent(present=set(H))
    exporter = BlockExporter(sink, FakeMetrics(), lambda hashes: None, 30.0, contains_wait_s=0.05)
    t0 = time.monotonic()
    assert exporter.export("r", H[:2], wire_blocks(H[:2])) == ("kv:1", 2, 0, "")
    assert sink.puts == [(H[:2], "r", 30.0)]
    if answer == "late":
        assert 0.04 < time.monotonic() - t0 < 5 and sink.future.cancelled()


def test_without_a_kvstore_every_block_is_skipped_and_nothing_put():
    exporter = BlockExporter(None, FakeMetrics(), lambda hashes: None, 30.0)
    assert all(h in exporter.skip for h in H) and b"any hash" in exporter.skip
    assert exporter.export("r1", H[:3], []) == ("", 0, 3, "")


def test_export_puts_the_missing_blocks_under_the_request_lease_and_records_all():
    sink, metrics, recorded = FakeSink(), FakeMetrics(), []
    exporter = BlockExporter(sink, metrics, recorded.extend, lease_ttl_s=30.0)
    blocks = wire_blocks([H[1], H[2]])
    result = exporter.export("req-7", H[:3], blocks)
    assert result == ("kv:1", 2, 1, "")
    assert sink.puts == [([H[1], H[2]], "req-7", 30.0)]
    assert recorded == H[:3]  # ownership names every prompt block, exported or not
    assert metrics.calls == [("bytes", "put", 2 * len(blocks[0][1]))]
    assert (exporter.num_blocks_put, exporter.num_blocks_skipped) == (2, 1)


def test_a_failed_put_answers_no_address_so_decode_recomputes():
    metrics, recorded = FakeMetrics(), []
    exporter = BlockExporter(FakeSink(fail=True), metrics, recorded.extend, 30.0)
    assert exporter.export("req-8", H[:2], wire_blocks(H[:2])) == ("", 0, 0, "UNAVAILABLE")
    assert recorded == H[:2] and metrics.calls == [("failed", "put")]
    assert exporter.num_blocks_put == 0


class BrokenSink(FakeSink):
    def put(self, blocks, lease_id="", lease_ttl_s=0.0):
        raise OSError("the store's directory went away")


@pytest.mark.parametrize("sink", ["ok", "failing", "broken", "none"])
def test_a_pinned_export_is_put_from_its_pages_and_released_whatever_the_put_did(sink):
    """The exporter puts a pinned export's blocks as its pages' slices (the headers made on the
    handler's thread), and unpins the pages after the put: also when it failed, raised, or there
    was no kvstore to put into."""
    from splitserve.transfer.block import PagePayload
    from splitserve.transfer.pages import PinnedExport

    cache, bm = cache_with_blocks(6), BlockManager(6, BS)
    assert bm.allocate_slots("s", 3 * BS)
    table = bm.block_table("s")
    pinned = PinnedExport(cache, bm, table, [(0, H[0]), (2, H[2])], MODEL)
    bm.free("s")
    assert bm.num_pinned_blocks == 2 and bm.num_free_blocks == 4
    got = []
    store = {"ok": FakeSink(), "failing": FakeSink(fail=True), "broken": BrokenSink(), "none": None}[sink]
    if store is not None:
        put = store.put
        store.put = lambda blocks, **kw: (got.extend(blocks), put(blocks, **kw))
    if store is not None:
        store.present = {H[1]}  # not among the pinned ones: both are put
    exporter = BlockExporter(store, FakeMetrics(), lambda hashes: None, 30.0)
    if sink == "broken":
        with pytest.raises(OSError):
            exporter.export("r", H[:3], pinned)
    else:
        assert exporter.export("r", H[:3], pinned).num_put == (2 if sink == "ok" else 0)
    assert bm.num_pinned_blocks == 0 and bm.num_free_blocks == 6
    if store is not None:
        assert [h.block_hash for h, _ in got] == [H[0], H[2]]
        assert all(isinstance(p, PagePayload) for _, p in got)
        assert [p.tobytes() for _, p in got] == [cache.read_block(table[0]), cache.read_block(table[2])]


def test_a_pinned_export_puts_only_the_blocks_the_kvstore_lacks_and_unpins_them_all():
    from splitserve.transfer.pages import PinnedExport

    cache, bm = cache_with_blocks(6), BlockManager(6, BS)
    assert bm.allocate_slots("s", 3 * BS)
    table = bm.block_table("s")
    pinned = PinnedExport(cache, bm, table, [(0, H[0]), (1, H[1]), (2, H[2])], MODEL)
    bm.free("s")
    assert pinned.hashes == H[:3] and [h.block_hash for h, _ in pinned.blocks({H[1]})] == [H[0], H[2]]
    sink = FakeSink(present={H[0], H[2]})
    got = []
    put = sink.put
    sink.put = lambda blocks, **kw: (got.extend(blocks), put(blocks, **kw))
    exporter = BlockExporter(sink, FakeMetrics(), lambda hashes: None, 30.0)
    assert exporter.export("r", H[:3], pinned) == ("kv:1", 1, 2, "")
    assert sink.asked == [H[:3]] and [h.block_hash for h, _ in got] == [H[1]]
    assert [p.tobytes() for _, p in got] == [cache.read_block(table[1])]
    assert bm.num_pinned_blocks == 0 and bm.num_free_blocks == 6  # the stored ones' pages too


def test_a_page_import_reads_into_its_pages_and_keeps_the_good_leading_blocks():
    """begin gives each block not cached a page (lookup sees it, a prefix match not yet), up to the
    first without one; payloads land in place (a same-host read) or are written from bytes (a
    stream); place stops at the first bad block; finish keeps the good leading ones cached and frees
    the others' pages; an import never finished is finished with nothing kept when collected."""
    import gc

    from splitserve.transfer.block import PagePayload
    from splitserve.transfer.pages import PageImport

    source = cache_with_blocks(6, seed=3)
    wire = [encode_block(source, i, H[i], MODEL) for i in range(5)]
    cache, bm = cache_with_blocks(6, seed=4), BlockManager(6, BS)
    cached = bm.allocate_cached_block(H[1])  # H[1] is cached already
    bm.release_block(cached)
    assert bm.allocate_slots("busy", 2 * BS)  # 2 pages taken: 3 left for the import
    imp = PageImport(cache, bm, MODEL, H[:5])
    assert imp.hashes == H[:4] and imp.ids[1] is None and None not in (imp.ids[0], imp.ids[2], imp.ids[3])
    assert bm.lookup(H[0]) == imp.ids[0] and bm.find_cached_prefix(H[:1] + [b"x"], 2 * BS).num_cached_tokens == 0
    arrived = []
    for i, (header, payload) in enumerate(wire[:4]):
        dest = imp.into(i, header)
        if i == 2:  # came through a stream: bytes, written by place
            arrived.append((header, payload))
            continue
        if dest is None:
            arrived.append((header, payload))
            continue
        flat = memoryview(payload)
        at = 0
        for part in dest:  # what the kvstore client's read does
            part[:] = flat[at:at + part.nbytes]
            at += part.nbytes
        arrived.append((header, PagePayload(dest)))
    damaged = bytearray(wire[3][1])
    damaged[5] ^= 1
    assert imp.place(arrived[:3] + [(wire[3][0], bytes(damaged))]) == 3  # the 4th fails its checksum
    assert imp.finish() == 3 and imp.finish() == 0  # once
    assert [bm.lookup(h) is not None for h in H[:4]] == [True, True, True, False]
    assert [cache.read_block(bm.lookup(H[i])) for i in (0, 2)] == [wire[0][1], wire[2][1]]  # H[1] was there
    assert bm.num_free_blocks == 6 - 2  # the busy sequence's; the imported pages are cached, evictable

    lost = PageImport(cache, bm, MODEL, [H[3], H[4]])
    taken = [b for b in lost.ids]
    del lost
    gc.collect()
    assert [bm.lookup(h) for h in (H[3], H[4])] == [None, None] and all(bm.ref_count(b) == 0 for b in taken)


# ------------------------------------------------------------------ fetch (decode side)
class FakeSource:
    def __init__(self, blocks=(), error=None):
        self.blocks, self.error, self.asked = {h.block_hash: (h, p) for h, p in blocks}, error, []
        self.released = []

    def release(self, lease_id):
        self.released.append(lease_id)
        return 1

    def get(self, hashes, release_lease_id="", into=None):  # another host's: `into` unused
        self.asked.append((list(hashes), release_lease_id))
        if self.error is not None:
            raise self.error
        out = []
        for h in hashes:  # the leading blocks held, as the store answers
            if h not in self.blocks:
                break
            out.append(self.blocks[h])
        return out


class SameHostSource(FakeSource):
    """A same-host kvstore: payloads read where `into` says (as KVStoreClient.get does)."""

    transport = "shm"

    def get(self, hashes, release_lease_id="", into=None):
        from splitserve.transfer.block import PagePayload

        out = []
        for i, (header, payload) in enumerate(super().get(hashes, release_lease_id)):
            dest = into(i, header) if into is not None else None
            if dest is None:
                out.append((header, payload))
                continue
            flat, at = memoryview(payload), 0
            for part in dest:
                part[:] = flat[at:at + part.nbytes]
                at += part.nbytes
            out.append((header, PagePayload(dest)))
        return out


@pytest.mark.parametrize("same_host", [True, False])
def test_fetch_parts_into_pages(same_host):
    """With the engine's page imports: from a same-host kvstore one part of every block, read into
    its pages, the fetch buffer untouched; from another host, parts within the buffer, each with its
    pages (the payloads written by place; no part's pages are evicted for the next's while none is
    finished). A part some blocks found no page for is the last, failed, and releases the prefill's
    lease."""
    from splitserve.transfer.pages import PageImport

    source_cache = cache_with_blocks(6, seed=5)
    blocks = [encode_block(source_cache, i, H[i], MODEL) for i in range(6)]
    size = len(blocks[0][1])
    source = (SameHostSource if same_host else FakeSource)(blocks)
    fetcher = BlockFetcher({"kv:1": source}.__getitem__, FakeMetrics(), buffer_bytes=2 * size)
    cache, bm = cache_with_blocks(6, seed=6), BlockManager(6, BS)
    assert bm.allocate_slots("busy", BS)  # 5 pages left for 6 blocks
    held = []
    begin = lambda hashes: PageImport(cache, bm, MODEL, hashes)  # noqa: E731
    imports = []  # finished together, at the end (the decode server: right before admission)
    for part, last, pages in fetcher.fetch_parts(FetchPlan(H[:6], 0, "kv:1"), "req", size, begin=begin):
        held.append(fetcher.buffer.held)
        assert pages.place(part.blocks) == part.num_blocks
        imports.append(pages)
        if last:
            assert part.failed  # the 6th block had no page
            break
    assert sum(pages.finish() for pages in imports) == 5
    assert [bm.lookup(h) is not None for h in H[:6]] == [True] * 5 + [False]
    assert [cache.read_block(bm.lookup(H[i])) for i in range(5)] == [p for _, p in blocks[:5]]
    if same_host:
        assert source.asked == [(H[:5], "req")] and held == [0]
    else:
        assert source.asked == [(H[:2], ""), (H[2:4], ""), (H[4:5], "req")] and held == [2 * size] * 3
    assert fetcher.buffer.held == 0 and source.released == []
    # no free page at all: nothing is asked for, and the prefill's lease is dropped all the same
    full = BlockManager(2, BS)
    assert full.allocate_slots("busy", 2 * BS)
    begin = lambda hashes: PageImport(cache, full, MODEL, hashes)  # noqa: E731
    gets = len(source.asked)
    ((part, last, pages),) = fetcher.fetch_parts(FetchPlan(H[:6], 0, "kv:1"), "req-2", size, begin=begin)
    assert (part.num_blocks, part.failed, last, pages.hashes) == (0, True, True, [])
    assert source.released == ["req-2"] and len(source.asked) == gets


def test_plan_fetches_what_follows_the_local_prefix():
    plan = FetchPlan(H[:5], num_local=2, kvstore_address="kv:1")
    assert plan.to_fetch == H[2:5] and plan.fetching
    assert FetchPlan(H[:5], 5, "kv:1").to_fetch == []  # all local
    assert FetchPlan(H[:5], 0, "").to_fetch == []  # the prefill's put failed: nowhere to fetch from


def test_all_blocks_fetched_and_imported_is_no_recompute():
    plan = FetchPlan(H[:4], 1, "kv:1")
    source = FakeSource(wire_blocks(H[:4]))
    fetched = fetch(plan, source, lease_id="req-1")
    assert source.asked == [(H[1:4], "req-1")]
    assert [h.block_hash for h, _ in fetched.blocks] == H[1:4] and not fetched.failed
    assert settle(plan, fetched, num_imported=3) == (1, 3, False, False)


def test_an_evicted_block_fetches_the_prefix_before_it_and_recomputes():
    plan = FetchPlan(H[:4], 0, "kv:1")
    fetched = fetch(plan, FakeSource(wire_blocks([H[0], H[1], H[3]])), "req-2")  # H[2] was evicted
    assert [h.block_hash for h, _ in fetched.blocks] == H[:2] and fetched.failed and fetched.error == ""
    assert settle(plan, fetched, 2) == (0, 2, True, True)


def test_kvstore_down_or_a_malformed_answer_fetches_nothing_and_recomputes():
    plan = FetchPlan(H[:3], 1, "kv:1")
    down = fetch(plan, FakeSource(error=Unavailable()), "req-3")
    assert (down.blocks, down.failed, down.error) == ([], True, "UNAVAILABLE: connection refused")
    bad = fetch(plan, FakeSource(error=KVBlockError("kvstore stream ended inside a block (truncated)")), "req-3")
    assert (bad.blocks, bad.failed, bad.error) == ([], True, "kvstore stream ended inside a block (truncated)")
    assert settle(plan, down, 0) == (1, 0, True, True)


def test_a_block_that_fails_import_is_recomputed():
    plan = FetchPlan(H[:3], 0, "kv:1")
    fetched = fetch(plan, FakeSource(wire_blocks(H[:3])), "req-4")
    assert not fetched.failed
    assert settle(plan, fetched, num_imported=1) == (0, 1, True, True)  # block 1 failed its checksum


def test_nothing_to_fetch_is_no_failure():
    assert fetch(FetchPlan(H[:3], 3, "kv:1"), FakeSource(), "r") == NOTHING_FETCHED
    assert settle(FetchPlan(H[:3], 3, "kv:1"), NOTHING_FETCHED, 0) == (3, 0, False, False)
    # No kvstore address (the put failed): the engine computes the prompt; no fetch failed.
    assert settle(FetchPlan(H[:3], 0, ""), NOTHING_FETCHED, 0) == (0, 0, False, False)


def test_fetcher_counts_and_records_metrics_per_call():
    metrics, sources = FakeMetrics(), {"kv:1": FakeSource(wire_blocks(H[:2])), "kv:2": FakeSource(error=Unavailable())}
    fetcher = BlockFetcher(sources.__getitem__, metrics)
    ok_plan = FetchPlan(H[:2], 0, "kv:1")
    ((ok, last, _),) = fetcher.fetch_parts(ok_plan, "a", block_bytes=1)  # a buffer of 32 MiB: one part
    assert last and not ok.failed
    fetcher.settle(ok_plan, ok, 2)
    down_plan = FetchPlan(H[:2], 0, "kv:2")
    ((down, last, _),) = fetcher.fetch_parts(down_plan, "b", block_bytes=1)
    assert last and down.failed and down.error
    fetcher.settle(down_plan, down, 0)
    payload = len(ok.blocks[0][1])
    assert metrics.calls == [("bytes", "get", 2 * payload), ("failed", "get")]
    assert (fetcher.num_imported_blocks, fetcher.num_recomputed) == (2, 1)
    assert fetcher.source("kv:1") is sources["kv:1"]


def test_fetch_parts_stay_within_the_buffer_and_only_the_last_releases_the_lease():
    blocks = wire_blocks(H[:6])
    size = len(blocks[0][1])
    source, metrics = FakeSource(blocks), FakeMetrics()
    fetcher = BlockFetcher({"kv:1": source}.__getitem__, metrics, buffer_bytes=2 * size + 1)
    plan = FetchPlan(H[:6], 1, "kv:1")
    seen = []
    with contextlib.closing(fetcher.fetch_parts(plan, "req-9", size)) as parts:
        for part, last, _ in parts:
            seen.append(([h.block_hash for h, _ in part.blocks], last, fetcher.buffer.held))
    assert seen == [(H[1:3], False, 2 * size), (H[3:5], False, 2 * size), (H[5:6], True, size)]
    assert source.asked == [(H[1:3], ""), (H[3:5], ""), (H[5:6], "req-9")]  # the lease goes with the last
    assert fetcher.buffer.held == 0
    assert metrics.calls == [("bytes", "get", 2 * size), ("bytes", "get", 2 * size), ("bytes", "get", size)]
    total = Fetched.total([p for p, _ in [(fetch(FetchPlan(H[:2], 0, "kv:1"), source, ""), 0)]] * 2)
    assert (total.blocks, total.num_blocks, total.failed, total.num_bytes) == ([], 4, False, 4 * size)
    assert Fetched.total([]) == NOTHING_FETCHED


def test_a_short_part_is_the_last_and_a_closed_iteration_gives_its_room_back():
    blocks = wire_blocks(H[:6])
    size = len(blocks[0][1])
    source = FakeSource([b for b in blocks if b[0].block_hash != H[3]])  # H[3] was evicted
    fetcher = BlockFetcher({"kv:1": source}.__getitem__, FakeMetrics(), buffer_bytes=2 * size)
    parts = list(fetcher.fetch_parts(FetchPlan(H[:6], 0, "kv:1"), "r", size))
    assert [([h.block_hash for h, _ in p.blocks], last, p.failed) for p, last, _ in parts] == \
        [(H[:2], False, False), (H[2:3], True, True)]
    assert source.asked == [(H[:2], ""), (H[2:4], "")]  # nothing asked after the short part
    summary = Fetched.total([p for p, _, _ in parts])
    assert settle(FetchPlan(H[:6], 0, "kv:1"), summary, 3) == (0, 3, True, True)
    it = fetcher.fetch_parts(FetchPlan(H[:6], 0, "kv:1"), "r", size)
    next(it)
    assert fetcher.buffer.held == 2 * size
    it.close()  # the caller stopped after a part (its import fell short): the room goes back
    assert fetcher.buffer.held == 0


def test_the_fetch_buffer_makes_callers_wait_for_room_and_lets_a_gone_caller_go():
    buffer = FetchBuffer(100)
    assert buffer.acquire(60)
    assert not buffer.acquire(60, is_active=lambda: False)  # would wait; the caller is gone
    got = []
    waiter = threading.Thread(target=lambda: got.append(buffer.acquire(60)))
    waiter.start()
    time.sleep(0.2)
    assert got == [] and buffer.held == 60  # waiting for room
    buffer.release(60)
    waiter.join(5)
    assert got == [True] and buffer.held == 60
    buffer.release(60)
    assert buffer.acquire(500) and buffer.held == 500  # larger than the buffer: let in alone
    buffer.release(500)
    with pytest.raises(ValueError, match="at least one byte"):
        FetchBuffer(0)


# ------------------------------------------------------------------ import into the paged cache
def test_import_writes_free_pages_in_order_and_caches_them():
    bm, cache = BlockManager(num_blocks=4, block_size=BS), cache_with_blocks(4, seed=1)
    blocks = wire_blocks(H[:3], seed=2)
    assert import_blocks(bm, cache, MODEL, blocks) == 3
    assert [bm.lookup(h) for h in H[:3]] == [0, 1, 2]
    assert [cache.read_block(i) for i in range(3)] == [p for _, p in blocks]
    assert import_blocks(bm, cache, MODEL, blocks) == 3  # already cached: counted, not written again
    assert bm.num_free_blocks == 4  # imported blocks are cached, unreferenced (evictable)


def test_import_stops_at_a_damaged_block_and_frees_its_page():
    bm, cache = BlockManager(num_blocks=4, block_size=BS), cache_with_blocks(4, seed=1)
    blocks = wire_blocks(H[:3], seed=2)
    damaged = bytearray(blocks[1][1])
    damaged[0] ^= 0xFF
    assert import_blocks(bm, cache, MODEL, [blocks[0], (blocks[1][0], bytes(damaged)), blocks[2]]) == 1
    assert [bm.lookup(h) for h in H[:3]] == [0, None, None]


def test_import_stops_when_no_page_is_free():
    bm, cache = BlockManager(num_blocks=2, block_size=BS), cache_with_blocks(2)
    assert bm.allocate_slots("busy", 2 * BS)  # both pages referenced by a running sequence
    assert import_blocks(bm, cache, MODEL, wire_blocks(H[:1])) == 0
    assert bm.lookup(H[0]) is None


def test_import_refuses_a_block_of_another_model():
    bm, cache = BlockManager(num_blocks=2, block_size=BS), cache_with_blocks(2)
    assert import_blocks(bm, cache, "other-model", wire_blocks(H[:1])) == 0
    assert bm.lookup(H[0]) is None and bm.num_free_blocks == 2


@pytest.mark.parametrize("num_local", [0, 2])
def test_plan_over_a_real_prefix_cache(num_local):
    """The decode worker's plan end to end without gRPC: local prefix, fetch, import, settle."""
    bm, cache = BlockManager(num_blocks=8, block_size=BS), cache_with_blocks(8)
    import_blocks(bm, cache, MODEL, wire_blocks(H[:num_local], seed=3))
    local = next((i for i, h in enumerate(H[:5]) if bm.lookup(h) is None), 5)
    plan = FetchPlan(H[:5], local, "kv:1")
    fetched = fetch(plan, FakeSource(wire_blocks(H[:5], seed=3)), "r")
    outcome = settle(plan, fetched, import_blocks(bm, cache, MODEL, fetched.blocks))
    assert outcome == (num_local, 5 - num_local, False, False)
    assert [bm.lookup(h) is not None for h in H[:5]] == [True] * 5


def test_a_cache_off_the_cpu_copies_its_exports_and_writes_its_imports_on_the_engines_thread(monkeypatch):
    """No page slices to alias (a GPU cache: block_parts is None): a pinned export copies its blocks
    out at once and pins nothing; a page import reads into buffers and writes the pages in finish."""
    from splitserve.transfer.pages import PageImport, PinnedExport

    cache, bm = cache_with_blocks(6, seed=7), BlockManager(6, BS)
    monkeypatch.setattr(cache, "block_parts", lambda block_id: None)
    assert bm.allocate_slots("s", 2 * BS)
    table = bm.block_table("s")
    exported = PinnedExport(cache, bm, table, [(0, H[0]), (1, H[1])], MODEL)
    assert bm.num_pinned_blocks == 0
    assert [p for _, p in exported.blocks()] == [cache.read_block(b) for b in table]
    exported.release()
    bm.free("s")
    wire = [encode_block(cache_with_blocks(2, seed=8), i, H[2 + i], MODEL) for i in range(2)]
    imp = PageImport(cache, bm, MODEL, H[2:4])
    assert [imp.into(i, h) for i, (h, _) in enumerate(wire)] == [None, None]
    assert imp.place(wire) == 2
    assert [cache.read_block(b) for b in imp.ids] != [p for _, p in wire]  # not written yet
    assert imp.finish() == 2
    assert [cache.read_block(bm.lookup(h)) for h in H[2:4]] == [p for _, p in wire]
