"""BlockManager: exact block ids, refcounts, prefix hits and eviction order (block_size 4 throughout)."""
import pytest

from splitserve.engine.block_manager import BlockManager, PrefixCacheStats, PrefixMatch
from splitserve.engine.hashing import ROOT_HASH, block_hashes, hash_namespace

BS = 4
NS = hash_namespace("test-model")


def hashes(tokens):
    return block_hashes(tokens, BS, NS)


def refcounts(bm):
    return [bm.ref_count(b) for b in range(bm.num_blocks)]


def run_seq(bm, seq_id, tokens):
    """Admits a sequence the way the scheduler does: lookup, allocate, compute all, cache."""
    h = hashes(tokens)
    match = bm.find_cached_prefix(h, len(tokens))
    assert bm.allocate_slots(seq_id, len(tokens), match)
    bm.cache_full_blocks(seq_id, h, len(tokens))
    return match


def test_fresh_allocation_gives_ids_in_order():
    bm = BlockManager(num_blocks=10, block_size=BS)
    assert (bm.num_free_blocks, bm.usage) == (10, 0.0)
    assert bm.allocate_slots("a", 10)
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate_slots("a", 12)  # still fits in 3 blocks
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate_slots("a", 13)
    assert bm.block_table("a") == [0, 1, 2, 3]
    assert bm.allocate_slots("b", 4)
    assert bm.block_table("b") == [4]
    assert bm.allocate_slots("a", 5)  # never shrinks
    assert bm.num_blocks_of("a") == 4
    assert refcounts(bm) == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(0.5)
    table = bm.block_table("a")
    table.append(99)  # a copy: the manager's table is untouched
    assert bm.block_table("a") == [0, 1, 2, 3]


def test_shared_prefix_refcounts_and_stats():
    bm = BlockManager(10, BS)
    a = list(range(10))  # 2 full blocks + 2 tokens
    assert run_seq(bm, "a", a) == PrefixMatch([], 0, ())
    h = hashes(a)
    assert [bm.lookup(x) for x in h] == [0, 1]
    assert bm.num_cached_blocks == 2

    b = list(range(8)) + [100, 101, 102]  # same 2 full blocks, different tail
    match = bm.find_cached_prefix(hashes(b), len(b))
    assert (match.block_ids, match.num_cached_tokens) == ([0, 1], 8)
    assert bm.allocate_slots("b", len(b), match)
    assert bm.block_table("b") == [0, 1, 3]
    assert refcounts(bm)[:4] == [2, 2, 1, 1]
    assert bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(0.4)
    assert bm.stats == PrefixCacheStats(queries=10 + 11, hits=8)

    bm.free("a")
    assert refcounts(bm)[:4] == [1, 1, 0, 1]
    bm.free("b")
    assert refcounts(bm) == [0] * 10
    assert bm.usage == 0.0
    assert bm.num_free_blocks == 10


def test_prefix_hit_after_free_and_lru_eviction_order():
    bm = BlockManager(10, BS)
    a = list(range(13))  # blocks 0,1,2 full (cached), 3 partial
    b = list(range(100, 109))  # blocks 4,5 full (cached), 6 partial
    run_seq(bm, "a", a)
    run_seq(bm, "b", b)
    ha, hb = hashes(a), hashes(b)
    assert bm.block_table("a") == [0, 1, 2, 3] and bm.block_table("b") == [4, 5, 6]
    bm.free("a")
    bm.free("b")
    # Free queue (head first): never-used 7,8,9; then a reversed 3,2,1,0; then b reversed 6,5,4.
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    match = bm.find_cached_prefix(ha, len(a))
    assert (match.block_ids, match.num_cached_tokens) == ([0, 1, 2], 12)  # hit after free

    assert bm.allocate_slots("c", 4 * 4)  # pops 7,8,9 and a's unhashed partial block 3
    assert bm.block_table("c") == [7, 8, 9, 3]
    assert [bm.lookup(x) for x in ha + hb] == [0, 1, 2, 4, 5]

    assert bm.allocate_slots("d", 4)  # a's last full block goes first
    assert bm.block_table("d") == [2]
    assert [bm.lookup(x) for x in ha] == [0, 1, None]
    assert bm.find_cached_prefix(ha, len(a)).block_ids == [0, 1]

    assert bm.allocate_slots("e", 8)  # then 1, 0: a's prefix outlived its tail, a before b
    assert bm.block_table("e") == [1, 0]
    assert [bm.lookup(x) for x in ha + hb] == [None, None, None, 4, 5]

    assert bm.allocate_slots("f", 4)
    assert bm.block_table("f") == [6]
    assert bm.allocate_slots("g", 4)
    assert bm.block_table("g") == [5]
    assert [bm.lookup(x) for x in hb] == [4, None]
    assert bm.num_free_blocks == 1


def test_hit_revives_block_from_free_queue():
    bm = BlockManager(6, BS)
    run_seq(bm, "a", list(range(9)))  # blocks 0,1 cached, 2 partial
    bm.free("a")  # free queue: 3,4,5,2,1,0
    run_seq(bm, "b", list(range(8)) + [7])
    assert bm.block_table("b") == [0, 1, 3]
    assert refcounts(bm) == [1, 1, 0, 1, 0, 0]
    assert bm.allocate_slots("c", 12)  # 4,5,2: revived blocks 0,1 are no longer in the queue
    assert bm.block_table("c") == [4, 5, 2]
    assert bm.num_free_blocks == 0


def test_at_least_one_token_left_to_compute():
    bm = BlockManager(10, BS)
    run_seq(bm, "a", list(range(12)))  # 3 full blocks cached
    h = hashes(list(range(12)))
    bm.free("a")
    m = bm.find_cached_prefix(h, 12)  # every block hits: drop the last
    assert (m.block_ids, m.num_cached_tokens) == ([0, 1], 8)
    m = bm.find_cached_prefix(h, 13)
    assert (m.block_ids, m.num_cached_tokens) == ([0, 1, 2], 12)
    m = bm.find_cached_prefix(h, 4)  # one block of tokens: nothing may be skipped
    assert (m.block_ids, m.num_cached_tokens) == ([], 0)
    m = bm.find_cached_prefix(h, 6)  # hashes past num_tokens are ignored
    assert m.block_ids == [0]
    assert bm.stats == PrefixCacheStats(queries=12 + 12 + 13 + 4 + 6, hits=8 + 12 + 0 + 4)


def test_miss_in_the_middle_stops_the_run():
    bm = BlockManager(10, BS)
    run_seq(bm, "a", list(range(12)))
    other = list(range(4)) + [50, 51, 52, 53] + list(range(8, 13))
    m = bm.find_cached_prefix(hashes(other), len(other))
    assert m.block_ids == [0]


def test_failed_allocation_changes_nothing():
    bm = BlockManager(4, BS)
    run_seq(bm, "a", list(range(10)))  # blocks 0,1 cached, 2 partial
    bm.free("a")  # free queue: 3,2,1,0
    h = hashes(list(range(20)))
    match = bm.find_cached_prefix(h, 20)
    assert match.block_ids == [0, 1]
    # 5 blocks needed: 2 revived from the free queue + 3 fresh > 4 free.
    assert not bm.allocate_slots("b", 20, match)
    assert not bm.has_seq("b")
    assert bm.num_free_blocks == 4
    assert refcounts(bm) == [0, 0, 0, 0]
    assert [bm.lookup(x) for x in h[:2]] == [0, 1]
    # 4 blocks fit exactly: 0,1 revived, then 3,2 from the unchanged queue.
    assert bm.allocate_slots("b", 16, match)
    assert bm.block_table("b") == [0, 1, 3, 2]
    assert not bm.allocate_slots("b", 17)
    assert bm.block_table("b") == [0, 1, 3, 2]
    assert not bm.allocate_slots("c", 1)
    assert not bm.has_seq("c")


def test_referenced_prefix_blocks_consume_no_free_blocks():
    bm = BlockManager(4, BS)
    run_seq(bm, "a", list(range(10)))  # a keeps 0,1,2; only 3 is free
    match = bm.find_cached_prefix(hashes(list(range(9))), 9)
    assert bm.allocate_slots("b", 9, match)
    assert bm.block_table("b") == [0, 1, 3]
    assert refcounts(bm) == [2, 2, 1, 1]
    assert bm.usage == 1.0


def test_free_is_idempotent():
    bm = BlockManager(4, BS)
    bm.allocate_slots("a", 8)
    bm.free("a")
    bm.free("a")
    bm.free("never-seen")
    assert not bm.has_seq("a")
    assert bm.block_table("a") == [] and bm.num_blocks_of("a") == 0
    assert refcounts(bm) == [0, 0, 0, 0]
    assert bm.num_free_blocks == 4


def test_duplicate_hash_keeps_first_mapping():
    bm = BlockManager(10, BS)
    tokens = list(range(9))
    h = hashes(tokens)
    # Two sequences compute the same prompt concurrently: neither hits.
    for seq in ("a", "b"):
        assert bm.find_cached_prefix(h, 9).block_ids == []
        assert bm.allocate_slots(seq, 9)
    assert bm.block_table("a") == [0, 1, 2] and bm.block_table("b") == [3, 4, 5]
    bm.cache_full_blocks("a", h, 9)
    bm.cache_full_blocks("b", h, 9)
    assert [bm.lookup(x) for x in h] == [0, 1]
    assert bm.num_cached_blocks == 2
    bm.free("a")
    bm.free("b")
    # b's duplicates are plain free blocks: evicting them costs no cache entry.
    assert bm.allocate_slots("c", 4 * 7)  # 6..9, then a's 2, 1, 0 ... (queue: 6-9, 2,1,0, 5,4,3)
    assert bm.block_table("c") == [6, 7, 8, 9, 2, 1, 0]
    assert bm.num_cached_blocks == 0


def test_cache_full_blocks_is_incremental():
    bm = BlockManager(10, BS)
    tokens = list(range(12))
    h = hashes(tokens)
    bm.allocate_slots("a", 12)
    bm.cache_full_blocks("a", h, 3)  # chunked prefill: no block complete yet
    assert bm.num_cached_blocks == 0
    bm.cache_full_blocks("a", h, 7)
    assert [bm.lookup(x) for x in h] == [0, None, None]
    bm.cache_full_blocks("a", h[:2], 12)  # only hashes that exist count
    assert [bm.lookup(x) for x in h] == [0, 1, None]
    bm.cache_full_blocks("a", h, 12)
    assert [bm.lookup(x) for x in h] == [0, 1, 2]
    bm.cache_full_blocks("zz", h, 12)  # freed by an abort meanwhile: no-op
    assert bm.num_cached_blocks == 3 and not bm.has_seq("zz")
    with pytest.raises(ValueError, match="owns only 3 blocks"):
        bm.cache_full_blocks("a", hashes(list(range(16))), 16)


def test_import_path():
    bm = BlockManager(3, BS)
    tokens = list(range(9))
    h = hashes(tokens)
    assert bm.allocate_cached_block(h[0]) == 0
    assert bm.allocate_cached_block(h[1]) == 1
    assert refcounts(bm) == [1, 1, 0] and bm.usage == pytest.approx(2 / 3)
    assert bm.lookup(h[0]) == 0
    assert bm.find_cached_prefix(h, 9).block_ids == []  # KV not written yet: invisible
    with pytest.raises(ValueError, match="already cached in block 0"):
        bm.allocate_cached_block(h[0])
    bm.release_block(0)
    bm.release_block(1)
    assert refcounts(bm) == [0, 0, 0] and bm.num_free_blocks == 3
    match = bm.find_cached_prefix(h, 9)
    assert (match.block_ids, match.num_cached_tokens) == ([0, 1], 8)
    assert bm.allocate_slots("a", 9, match)
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate_cached_block(b"\x01" * 32) is None  # nothing free
    with pytest.raises(ValueError, match="holds no allocate_cached_block reference"):
        bm.release_block(0)


def test_failed_import_drops_hash_and_block_is_reused_first():
    bm = BlockManager(3, BS)
    bm.allocate_slots("a", 4)  # block 0
    bm.free("a")  # queue: 1, 2, 0
    block = bm.allocate_cached_block(b"\x07" * 32)
    assert block == 1
    bm.release_block(block, keep_cached=False)
    assert bm.lookup(b"\x07" * 32) is None
    assert bm.allocate_slots("b", 4)
    assert bm.block_table("b") == [1]


def test_reset_prefix_cache():
    bm = BlockManager(10, BS)
    run_seq(bm, "a", list(range(9)))
    run_seq(bm, "b", list(range(100, 109)))
    bm.free("a")
    assert not bm.reset_prefix_cache()  # b still holds its cached blocks
    assert bm.lookup(hashes(list(range(9)))[0]) is None
    assert [bm.lookup(x) for x in hashes(list(range(100, 109)))] == [3, 4]
    bm.free("b")
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 10


def test_prefix_caching_disabled():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    run_seq(bm, "a", list(range(9)))
    bm.free("a")
    assert bm.find_cached_prefix(hashes(list(range(9))), 9) == PrefixMatch([], 0)
    assert bm.num_cached_blocks == 0
    assert bm.stats == PrefixCacheStats(0, 0)
    with pytest.raises(ValueError, match="prefix caching is disabled"):
        bm.allocate_cached_block(b"\x01" * 32)


def test_misuse_raises_named_errors():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, BS)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    bm = BlockManager(10, BS)
    run_seq(bm, "a", list(range(9)))
    match = bm.find_cached_prefix(hashes(list(range(9))), 9)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.allocate_slots("b", -1)
    with pytest.raises(ValueError, match="num_tokens"):
        bm.find_cached_prefix([], 0)
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate_slots("a", 12, match)
    with pytest.raises(ValueError, match="more than num_tokens"):
        bm.allocate_slots("b", 4, match)
    with pytest.raises(ValueError, match="num_cached_tokens 5"):
        bm.allocate_slots("b", 9, PrefixMatch([0, 1], 5))
    with pytest.raises(ValueError, match="outside"):
        bm.ref_count(10)
    # Stale: the matched blocks are evicted between lookup and allocation.
    bm.free("a")
    bm.reset_prefix_cache()
    with pytest.raises(ValueError, match="evicted after find_cached_prefix"):
        bm.allocate_slots("b", 9, match)
    assert not bm.has_seq("b")


# ----------------------------------------------------------------------------- partial hits
class Copies:
    """The KV copy hook: records (src, dst, n) and what src cached at the time of the copy."""

    def __init__(self):
        self.bm = None
        self.calls = []

    def __call__(self, src, dst, n):
        self.calls.append((src, dst, n, self.bm._block_hash[src]))


def partial_manager(num_blocks):
    copies = Copies()
    bm = BlockManager(num_blocks, BS, copy_tokens=copies)
    copies.bm = bm
    return bm, copies


def run_tokens(bm, seq_id, tokens):
    """Like run_seq, with the tokens given to the lookup and the cache (what the scheduler does)."""
    h = hashes(tokens)
    match = bm.find_cached_prefix(h, len(tokens), token_ids=tokens)
    assert bm.allocate_slots(seq_id, len(tokens), match)
    bm.cache_full_blocks(seq_id, h, len(tokens), tokens)
    return match


def test_partial_hit_copies_the_shared_tokens_of_the_diverging_block():
    bm, copies = partial_manager(10)
    a = list(range(12))  # 3 full blocks: [0-3] [4-7] [8-11]
    run_tokens(bm, "a", a)
    assert bm.block_table("a") == [0, 1, 2]
    b = list(range(10)) + [500, 501, 502]  # shares blocks 0 and 1, then 2 tokens of block 2
    match = run_tokens(bm, "b", b)
    # block 0 and 1 whole (8 tokens), then 2 of block 2's tokens
    assert (match.block_ids, match.partial_block, match.partial_tokens, match.num_cached_tokens) == ([0, 1], 2, 2, 10)
    assert bm.block_table("b") == [0, 1, 3, 4]
    assert copies.calls == [(2, 3, 2, hashes(a)[2])]  # into b's own block, while block 2 still held its KV
    assert refcounts(bm)[:5] == [2, 2, 1, 1, 1]  # the source is not b's: its reference was temporary
    assert bm.stats == PrefixCacheStats(len(a) + len(b), 10)


def test_partial_hit_on_the_first_block_and_on_a_repeated_prompt():
    bm, copies = partial_manager(10)
    run_tokens(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8])  # exactly 2 blocks
    bm.free("a")
    m = bm.find_cached_prefix(hashes([1, 2, 9]), 3, token_ids=[1, 2, 9])  # diverges inside block 0
    assert (m.block_ids, m.partial_block, m.partial_tokens) == ([], 0, 2)
    # The same prompt again: one whole block (the cap leaves a token to compute), then 3 of the second.
    m = bm.find_cached_prefix(hashes([1, 2, 3, 4, 5, 6, 7, 8]), 8, token_ids=[1, 2, 3, 4, 5, 6, 7, 8])
    assert (m.block_ids, m.partial_block, m.partial_tokens, m.num_cached_tokens) == ([0], 1, 3, 7)
    assert bm.allocate_slots("again", 8, m)
    assert copies.calls[-1][:3] == (1, bm.block_table("again")[1], 3)
    # A prompt that is one token of block 0: nothing is left to compute after a hit, so no hit.
    assert bm.find_cached_prefix(hashes([1]), 1, token_ids=[1]).num_cached_tokens == 0


def test_partial_hit_source_survives_the_allocation_that_would_evict_it():
    bm, copies = partial_manager(3)
    run_tokens(bm, "a", [1, 2, 3, 4, 5, 6, 7, 8])  # blocks 0, 1
    bm.free("a")  # free queue: 2, 1, 0 (1 is evicted before 0)
    b = [1, 2, 3, 4, 5, 6, 9, 9, 9]
    m = bm.find_cached_prefix(hashes(b), len(b), token_ids=b)
    assert (m.block_ids, m.partial_block, m.partial_tokens) == ([0], 1, 2)
    # b needs 2 fresh blocks and block 0; only 2 and 1 are left, so the source (1) counts against them
    assert not bm.allocate_slots("b", len(b), m)
    assert copies.calls == [] and not bm.has_seq("b")
    c = [1, 2, 3, 4, 5, 6, 9]  # 2 blocks: block 0 and one fresh one (2, not the source)
    m = bm.find_cached_prefix(hashes(c), len(c), token_ids=c)
    assert bm.allocate_slots("c", len(c), m)
    assert bm.block_table("c") == [0, 2]
    assert copies.calls == [(1, 2, 2, hashes([1, 2, 3, 4, 5, 6, 7, 8])[1])]
    assert bm.lookup(hashes([1, 2, 3, 4, 5, 6, 7, 8])[1]) == 1  # still cached, now the most recently used


def test_partial_candidates_leave_with_their_hash():
    bm, copies = partial_manager(2)
    run_tokens(bm, "a", [1, 2, 3, 4])
    bm.free("a")
    run_tokens(bm, "x", [7, 7, 7, 7, 7])  # takes both blocks: block 0 (a's) is evicted
    bm.free("x")
    assert bm.find_cached_prefix(hashes([1, 2, 9]), 3, token_ids=[1, 2, 9]).num_cached_tokens == 0
    assert bm._children.keys() == {(ROOT_HASH, 7)}  # x's block only
    m = bm.find_cached_prefix(hashes([7, 7, 1]), 3, token_ids=[7, 7, 1])
    bm.reset_prefix_cache()
    assert bm._children == {} and bm.find_cached_prefix(hashes([7, 7, 1]), 3, token_ids=[7, 7, 1]).num_cached_tokens == 0
    with pytest.raises(ValueError, match="partial-hit block 1 was evicted"):  # stale match
        bm.allocate_slots("y", 3, m)
    assert not bm.has_seq("y")


def test_no_partial_hits_without_a_copy_hook_or_tokens():
    bm = BlockManager(10, BS)
    run_tokens(bm, "a", list(range(8)))
    assert bm.find_cached_prefix(hashes([0, 1, 2, 3, 4, 9]), 6, token_ids=[0, 1, 2, 3, 4, 9]).num_cached_tokens == 4
    bm, _ = partial_manager(10)
    run_seq(bm, "a", list(range(8)))  # cached without its tokens: whole-block hits only
    assert bm.find_cached_prefix(hashes([0, 1, 2, 3, 4, 9]), 6, token_ids=[0, 1, 2, 3, 4, 9]).num_cached_tokens == 4
    bm, _ = partial_manager(10)
    run_tokens(bm, "a", list(range(8)))
    assert bm.find_cached_prefix(hashes([0, 1, 2, 3, 4, 9]), 6).num_cached_tokens == 4  # no tokens given
    assert bm.find_cached_prefix(hashes([0, 1, 2, 3, 4, 9]), 6, token_ids=[0, 1, 2, 3, 4, 9]).num_cached_tokens == 5


def test_partial_prefix_misuse():
    bm, _ = partial_manager(10)
    run_tokens(bm, "a", list(range(8)))
    with pytest.raises(ValueError, match="partial_tokens must be in"):
        bm.allocate_slots("b", 9, PrefixMatch([0], 8, (), 1, 4, hashes(list(range(8)))[1]))
    with pytest.raises(ValueError, match="needs a token to compute"):
        bm.allocate_slots("b", 6, PrefixMatch([0], 6, (), 1, 2, hashes(list(range(8)))[1]))
    with pytest.raises(ValueError, match=r"4 blocks|1 blocks \* block_size 4 \+ 2"):
        bm.allocate_slots("b", 9, PrefixMatch([0], 5, (), 1, 2, hashes(list(range(8)))[1]))
    assert not bm.has_seq("b")


def test_pinned_blocks_outlive_their_sequence_until_unpinned():
    """A finished prefill's exported blocks stay out of the free queue while pinned (nothing evicts
    or overwrites them), and become the cache's again, evictable, once unpinned."""
    bm = BlockManager(num_blocks=4, block_size=BS)
    run_seq(bm, "a", list(range(8)))  # blocks 0, 1: full and cached
    bm.pin([0, 1, 1])  # block 1 twice: two exports of it
    bm.free("a")
    assert (bm.num_free_blocks, bm.num_pinned_blocks) == (2, 2)
    assert refcounts(bm) == [1, 2, 0, 0]
    assert not bm.allocate_slots("b", 12)  # 3 blocks wanted, only the 2 unpinned ones are free
    assert bm.allocate_slots("b", 8) and bm.block_table("b") == [2, 3]
    bm.free("b")
    bm.unpin([0, 1])
    assert refcounts(bm) == [0, 1, 0, 0] and bm.num_pinned_blocks == 1
    with pytest.raises(ValueError, match="not pinned that often"):
        bm.unpin([1, 1])
    bm.unpin([1])
    assert (bm.num_free_blocks, bm.num_pinned_blocks) == (4, 0)
    match = bm.find_cached_prefix(hashes(list(range(9))), 9)  # still cached: a hit
    assert match.num_cached_tokens == 8
    bm.pin([1])  # cached, unreferenced: its KV is valid, and now kept (a page import's cached block)
    assert bm.num_free_blocks == 3 and not bm.allocate_slots("c", 16)
    bm.unpin([1])
    with pytest.raises(ValueError, match="neither held nor cached"):
        bm.pin([2])  # a free block without a hash: its KV may be overwritten at any time
    with pytest.raises(ValueError, match="outside"):
        bm.pin([7])
    assert refcounts(bm) == [0, 0, 0, 0]
