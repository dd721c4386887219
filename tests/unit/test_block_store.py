"""BlockStore: exact LRU order, leases, TTL on a fake clock, validation, corruption, stats."""
from __future__ import annotations

import hashlib
import random
import threading

import pytest

from splitserve.transfer.block import LAYOUT_VERSION, BlockHeader, KVBlockError, payload_checksum
from splitserve.kvstore.block_store import BlockStore, StoreFullError

PAYLOAD = 4096  # bytes per test block


def make_block(name: str, payload_size: int = PAYLOAD) -> tuple[bytes, bytes, bytes]:
    """(hash, header bytes, payload) of a valid block with seeded random contents."""
    block_hash = hashlib.sha256(name.encode()).digest()
    payload = random.Random(name).randbytes(payload_size)
    header = BlockHeader(
        block_hash=block_hash, model_id="test-model", num_layers=1, num_kv_heads=1,
        head_dim=payload_size // 64, block_size=16, dtype="float32", layout_version=LAYOUT_VERSION,
        checksum=payload_checksum(payload), payload_size=payload_size,
    ).to_bytes()
    return block_hash, header, payload


BLOCKS = {name: make_block(name) for name in "ABCDEFG"}
H = {name: blk[0] for name, blk in BLOCKS.items()}
NBYTES = len(BLOCKS["A"][1]) + PAYLOAD
assert all(len(hdr) + len(p) == NBYTES for _, hdr, p in BLOCKS.values())  # equal sizes keep counts exact


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def new_store(num_blocks: int, **kwargs) -> tuple[BlockStore, list[list[bytes]]]:
    evictions: list[list[bytes]] = []
    store = BlockStore(num_blocks * NBYTES, on_evict=evictions.append, **kwargs)
    return store, evictions


def put(store: BlockStore, name: str, **kwargs):
    return store.put(*BLOCKS[name], **kwargs)


def resident(store: BlockStore) -> str:
    """Resident blocks, least recently used first, as a string of names."""
    names = {h: n for n, h in H.items()}
    return "".join(names[h] for h in store.hashes())


def test_lru_eviction_order_counts_puts_and_gets_as_uses():
    store, evictions = new_store(3)
    for name in "ABC":
        assert put(store, name) == (True, False, [])
    assert store.get(H["A"]) == (BLOCKS["A"][1], BLOCKS["A"][2])  # A becomes most recent
    assert resident(store) == "BCA"
    assert put(store, "D").evicted == [H["B"]]
    assert put(store, "C") == (False, True, [])  # already present: a use, nothing stored
    assert resident(store) == "ADC"
    assert put(store, "E").evicted == [H["A"]]
    assert store.contains([H[n] for n in "ABCDE"]) == [False, False, True, True, True]
    assert store.contains([H["D"]]) and resident(store) == "DCE"  # contains is not a use
    assert evictions == [[H["B"]], [H["A"]]]
    assert store.stats().num_evictions == 2


def test_big_block_evicts_several_oldest_at_once():
    store, evictions = new_store(3)
    for name in "ABC":
        put(store, name)
    big = make_block("big", payload_size=2 * NBYTES - 200)  # needs two blocks' room
    assert len(big[1]) + len(big[2]) <= 2 * NBYTES
    result = store.put(*big)
    assert result.stored and result.evicted == [H["A"], H["B"]]
    assert evictions == [[H["A"], H["B"]]]


def test_pinned_blocks_are_never_evicted_and_release_unpins():
    store, _ = new_store(3)
    put(store, "A", lease_id="L1")
    put(store, "B")
    put(store, "C")
    assert put(store, "D").evicted == [H["B"]]  # A is older but pinned
    assert put(store, "E").evicted == [H["C"]]
    assert resident(store) == "ADE"
    stats = store.stats()
    assert (stats.num_leases, stats.num_pinned_blocks) == (1, 1)
    assert store.release("L1") == 1
    assert store.release("L1") == 0 and store.release("unknown") == 0
    assert store.stats().num_pinned_blocks == 0
    assert put(store, "F").evicted == [H["A"]]  # unpinning keeps A's place in the LRU order


def test_block_pinned_by_two_leases_needs_both_released():
    store, _ = new_store(2)
    put(store, "A", lease_id="L1")
    put(store, "A", lease_id="L2")  # already present: pinned again under a second lease
    put(store, "B")
    assert store.release("L1") == 1
    assert put(store, "C").evicted == [H["B"]]
    assert store.release("L2") == 1
    assert put(store, "D").evicted == [H["A"]]


def test_one_lease_pins_many_blocks():
    store, _ = new_store(3)
    for name in "AB":
        put(store, name, lease_id="req-1")
    put(store, "C")
    assert put(store, "D").evicted == [H["C"]]
    assert store.stats().num_pinned_blocks == 2
    assert store.release("req-1") == 2
    assert put(store, "E").evicted == [H["A"]]


def test_lease_expires_on_the_clock():
    clock = FakeClock()
    store, _ = new_store(2, clock=clock, default_lease_ttl_s=60.0)
    put(store, "A", lease_id="L1", lease_ttl_s=10.0)
    put(store, "B", lease_id="L2")  # default TTL: 60 s
    clock.now = 9.999
    with pytest.raises(StoreFullError):
        put(store, "C")
    clock.now = 10.0  # a lease lasts [start, start + ttl)
    stats = store.stats()
    assert (stats.num_leases, stats.num_pinned_blocks) == (1, 1)
    assert put(store, "C").evicted == [H["A"]]
    assert store.release("L1") == 0  # already expired
    clock.now = 60.0
    assert put(store, "D").evicted == [H["B"]]


def test_a_later_put_under_the_same_lease_extends_it():
    clock = FakeClock()
    store, _ = new_store(3, clock=clock)
    put(store, "A", lease_id="L", lease_ttl_s=10.0)
    clock.now = 5.0
    put(store, "B", lease_id="L", lease_ttl_s=10.0)  # the lease now ends at 15 s, for A too
    put(store, "C")
    clock.now = 12.0
    assert put(store, "D").evicted == [H["C"]]
    assert store.stats().num_pinned_blocks == 2
    clock.now = 15.0
    assert put(store, "E").evicted == [H["A"]]


def test_store_full_when_everything_else_is_pinned_evicts_nothing():
    store, evictions = new_store(2)
    put(store, "A", lease_id="L1")
    put(store, "B", lease_id="L2")
    with pytest.raises(StoreFullError, match="pinned"):
        put(store, "C")
    assert store.contains([H["A"], H["B"], H["C"]]) == [True, True, False]
    assert evictions == [] and store.stats().num_evictions == 0


def test_store_full_is_checked_before_evicting():
    store, evictions = new_store(3)
    put(store, "A", lease_id="L")
    put(store, "B", lease_id="L")
    put(store, "C")
    big = make_block("big", payload_size=2 * NBYTES - 200)  # would need C and one pinned block
    with pytest.raises(StoreFullError, match="no room"):
        store.put(*big)
    assert resident(store) == "ABC" and evictions == []


def test_block_bigger_than_the_whole_store():
    store, _ = new_store(1)
    with pytest.raises(StoreFullError, match="exceeds the store's whole capacity"):
        store.put(*make_block("huge", payload_size=2 * PAYLOAD))


@pytest.mark.parametrize("damage, message", [
    (lambda h, hdr, p: (h, b"\xc1garbage", p), "not valid msgpack"),
    (lambda h, hdr, p: (h, BLOCKS["B"][1], p), "block_hash mismatch"),
    (lambda h, hdr, p: (h, hdr, p[:-1]), "payload size mismatch: received 4095 bytes, header says 4096"),
    (lambda h, hdr, p: (h, hdr, bytes([p[0] ^ 1]) + p[1:]), "checksum mismatch"),
])
def test_invalid_blocks_are_rejected_naming_the_problem(damage, message):
    store, _ = new_store(2)
    with pytest.raises(KVBlockError, match=message):
        store.put(*damage(*BLOCKS["A"]))
    assert store.stats().num_blocks == 0 and store.stats().used_bytes == 0


def test_corrupted_block_in_memory_is_dropped_on_get():
    store, evictions = new_store(2)
    put(store, "A", lease_id="L")
    put(store, "B")
    entry = store._blocks[H["A"]]  # simulate a bit flip in host memory
    entry.payload = bytes([entry.payload[0] ^ 0x80]) + entry.payload[1:]
    assert store.get(H["A"]) is None
    assert store.contains([H["A"], H["B"]]) == [False, True]
    assert evictions == [[H["A"]]]
    stats = store.stats()
    assert (stats.num_blocks, stats.used_bytes, stats.num_pinned_blocks, stats.num_corrupt) == (1, NBYTES, 0, 1)
    assert stats.num_evictions == 0
    assert store.release("L") == 0  # the lease lost its only block


def test_stats_count_bytes_exactly():
    store, _ = new_store(2)
    put(store, "A", lease_id="L")
    put(store, "A")
    put(store, "B")
    store.get(H["B"])
    store.get(H["B"])
    assert store.get(H["C"]) is None
    put(store, "C")  # evicts B (A is pinned)
    s = store.stats()
    assert (s.num_blocks, s.used_bytes, s.capacity_bytes) == (2, 2 * NBYTES, 2 * NBYTES)
    assert (s.num_leases, s.num_pinned_blocks, s.num_evictions) == (1, 1, 1)
    assert (s.bytes_in, s.bytes_out, s.num_corrupt) == (3 * NBYTES, 2 * NBYTES, 0)


def test_concurrent_puts_gets_and_releases_keep_the_accounting_consistent():
    store, _ = new_store(8)
    blocks = [make_block(f"c{i}") for i in range(32)]

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            blk = rng.choice(blocks)
            op = rng.random()
            if op < 0.5:
                try:
                    store.put(*blk, lease_id=f"l{seed}" if op < 0.1 else None)
                except StoreFullError:
                    pass
            elif op < 0.9:
                got = store.get(blk[0])
                assert got is None or got == (blk[1], blk[2])
            else:
                store.release(f"l{seed}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = store.stats()
    assert s.used_bytes == s.num_blocks * NBYTES <= s.capacity_bytes
    pinned = sum(1 for e in store._blocks.values() if e.leases)
    assert s.num_pinned_blocks == pinned


@pytest.mark.parametrize("kv_dtype, fits", [("bfloat16", 7), ("int8", 15), ("fp8_e4m3", 15)])
def test_the_budget_counts_a_kv_dtype_s_real_bytes(kv_dtype, fits):
    """Blocks of the default model's shape, encoded from real caches: a store sized for 4 float32
    blocks (headers included) holds 7 bfloat16 ones (their headers take the eighth's room), and 15
    of int8 or fp8 (1 byte a value plus a float32 scale per token and kv head: 68 of float32's 256
    bytes per head and token)."""
    from splitserve.engine import memory
    from splitserve.engine.kv_cache import KV_TORCH_DTYPES, KVCache
    from splitserve.transfer.block import encode_block

    def blocks(dtype: str, n: int):
        cache = KVCache(30, 3, 64, 16, n, KV_TORCH_DTYPES[dtype])
        out = []
        for i in range(n):
            block_hash = hashlib.sha256(f"{dtype}{i}".encode()).digest()
            header, payload = encode_block(cache, i, block_hash, "m")
            out.append((block_hash, header.to_bytes(), payload))
        return out

    (f32,) = blocks("float32", 1)
    store = BlockStore(capacity_bytes=4 * (len(f32[1]) + len(f32[2])))
    ours = blocks(kv_dtype, 16)
    for block_hash, header, payload in ours:
        store.put(block_hash, header, payload)
        assert len(payload) == memory.kv_block_bytes(30, 3, 64, 16, kv_dtype)
    stats = store.stats()
    assert stats.num_blocks == fits == store.capacity_bytes // (len(ours[0][1]) + len(ours[0][2]))
    assert stats.used_bytes == fits * (len(ours[0][1]) + len(ours[0][2])) <= store.capacity_bytes
