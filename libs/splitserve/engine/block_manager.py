"""The block manager: sole owner of KV block ids, refcounts, the free queue and the prefix cache.

State and its invariants (nothing else in the code base touches these):
- `_ref_counts[b]`: sequences (plus importers, see `allocate_cached_block`, and pins, see `pin`)
  holding block b.
- `_free`: exactly the blocks with refcount 0, least recently freed first (the LRU head is evicted
  first). A block in `_free` may still carry a hash: its KV stays valid until the block is popped.
- `_hash_to_block` and `_block_hash` are inverse maps: `_hash_to_block[h] == b` iff
  `_block_hash[b] == h`. A block whose hash is already held by another block stays unhashed.
- `_tables[seq]`: the block ids of a sequence, in token order; token t lives in block t // block_size.
- Partial hits: a block cached by `cache_full_blocks` with its tokens also keeps those tokens
  (`_block_tokens`) under `_children[(parent hash, first token)]`, so a prompt that diverges inside a
  block can still reuse the block's leading tokens (copied into a block of its own, see
  `find_cached_prefix`). An entry leaves `_children` exactly when its block's hash leaves the cache.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from splitserve.engine.hashing import ROOT_HASH


@dataclass(frozen=True)
class PrefixMatch:
    """The cached prefix of a sequence, as found by `BlockManager.find_cached_prefix`: its leading
    full blocks, then possibly the leading tokens of one more cached block (a partial hit).

    Valid only until the next call that can evict blocks (`allocate_slots`, `allocate_cached_block`,
    `reset_prefix_cache`): pass it to `allocate_slots` right after the lookup.
    """

    block_ids: list[int]
    num_cached_tokens: int  # len(block_ids) * block_size + partial_tokens
    block_hashes: tuple[bytes, ...] = ()  # the hashes looked up; lets allocate_slots detect staleness
    partial_block: int | None = None  # a cached block whose first partial_tokens tokens the sequence shares
    partial_tokens: int = 0
    partial_hash: bytes | None = None  # partial_block's hash at lookup (staleness check)


@dataclass
class PrefixCacheStats:
    """Cumulative prefix-cache counters, in tokens (the `prefix_cache_queries/hits` metrics)."""

    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found cached


class BlockManager:
    """Allocates fixed-size KV blocks to sequences and keeps freed full blocks as a prefix cache.

    All operations are O(1) per block. Methods that can fail for lack of blocks return False/None
    and then leave the state unchanged; misuse (bad ids, stale prefixes) raises ValueError.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 copy_tokens: Callable[[int, int, int], None] | None = None):
        """`copy_tokens(src, dst, n)` copies the KV of the first n token slots of block src into
        block dst (the engine passes `KVCache.copy_tokens`). Without it there are no partial hits:
        only whole blocks are shared."""
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        # Keys only; insertion order is the eviction order (head = least recently freed).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        # Leading blocks of each sequence already offered to the prefix cache by cache_full_blocks.
        self._num_cache_checked: dict[str, int] = {}
        # Blocks holding the one reference taken by allocate_cached_block, not yet released.
        self._importing: set[int] = set()
        self._pins: Counter[int] = Counter()  # block -> references taken by `pin`, not yet given back
        self._stats = PrefixCacheStats()
        self.track_evictions = False  # a worker turns this on to keep Redis ownership in step
        self.evicted_hashes: list[bytes] = []
        self._copy_tokens = copy_tokens
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._block_parent: list[bytes | None] = [None] * num_blocks
        self._children: dict[tuple[bytes, int], set[int]] = {}

    # ----- counters -----

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: never used or unreferenced (cached ones are evicted on demand)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks holding at least one reference (0.0 when idle)."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    @property
    def stats(self) -> PrefixCacheStats:
        """Cumulative counters (a copy)."""
        return PrefixCacheStats(self._stats.queries, self._stats.hits)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    num_pinned_blocks = property(lambda self: len(self._pins))  # blocks held by `pin` now

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[self._check_block_id(block_id)]

    # ----- sequences -----

    def find_cached_prefix(self, block_hashes: list[bytes], num_tokens: int, record: bool = True,
                           token_ids: Sequence[int] | None = None) -> PrefixMatch:
        """The longest cached prefix of a sequence; takes no references.
        First the longest run of leading blocks whose hashes are cached, capped at
        (num_tokens - 1) // block_size blocks, so at least one token is left to compute (the model
        needs the last token's logits) and hashes past num_tokens are ignored. A block still being
        imported (allocate_cached_block, not yet released) ends the run.
        Then, given the sequence's `token_ids` (and a `copy_tokens` hook), a partial hit: among the
        cached blocks that follow the same parent block, the one sharing the most leading tokens
        with the sequence's next block (still leaving one token to compute). `allocate_slots` copies
        those tokens' KV into the sequence's own block, so a prompt that diverges in the middle of a
        block, or a repeated prompt, recomputes only what is new (a prompt sharing a 1,000-token
        prefix computes its own suffix, not the prefix's last 8 tokens as well).
        Counts queries += num_tokens and hits += num_cached_tokens (nothing when caching is
        disabled), unless `record` is False: a caller that may not use the match (admission can
        fail) records it with `record_prefix_query` once it does."""
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
        if not self.enable_prefix_caching:
            return PrefixMatch([], 0)
        bs = self.block_size
        max_blocks = min(len(block_hashes), (num_tokens - 1) // bs)
        block_ids: list[int] = []
        for h in block_hashes[:max_blocks]:
            block_id = self._hash_to_block.get(h)
            if block_id is None or block_id in self._importing:
                break
            block_ids.append(block_id)
        k = len(block_ids)
        partial_block, partial = None, 0
        if token_ids is not None and self._copy_tokens is not None and self._children:
            start = k * bs
            want = token_ids[start:start + min(bs - 1, num_tokens - 1 - start)]
            if want:
                parent = block_hashes[k - 1] if k else ROOT_HASH
                for b in self._children.get((parent, want[0]), ()):
                    n = _common_prefix(self._block_tokens[b], want)
                    if n > partial:
                        partial_block, partial = b, n
        num_cached = k * bs + partial
        if record:
            self.record_prefix_query(num_tokens, num_cached)
        return PrefixMatch(block_ids, num_cached, tuple(block_hashes[:k]), partial_block, partial,
                           None if partial_block is None else self._block_hash[partial_block])

    def record_prefix_query(self, num_tokens: int, num_cached_tokens: int) -> None:
        """Counts one prefix-cache query of num_tokens tokens of which num_cached_tokens hit."""
        if self.enable_prefix_caching:
            self._stats.queries += num_tokens
            self._stats.hits += num_cached_tokens

    def allocate_slots(self, seq_id: str, num_tokens: int, prefix: PrefixMatch | None = None) -> bool:
        """Ensures seq_id owns ceil(num_tokens / block_size) blocks; never shrinks a table.
        On the first call (seq_id unknown) the prefix blocks come first: refcount +1, out of the free
        queue if they were unreferenced. Then fresh blocks are popped from the free-queue head, which
        evicts their hashes. With a partial hit, the first fresh block receives the shared tokens'
        KV from the prefix's partial block (held meanwhile, so the pops cannot evict it). Returns
        False, changing nothing, when too few blocks are free. A prefix is only accepted on the first
        call and must be fresh (see PrefixMatch); else ValueError."""
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative integer, got {num_tokens!r}")
        table = self._tables.get(seq_id)
        prefix_ids = self._check_prefix(seq_id, table, num_tokens, prefix)
        partial = None if prefix_ids is None else prefix.partial_block
        prefix_ids = prefix_ids or []
        have = len(table) if table is not None else 0
        num_fresh = max(0, -(-num_tokens // self.block_size) - have - len(prefix_ids))
        # Unreferenced prefix blocks (and the partial hit's source) leave the free queue too.
        num_revived = sum(1 for b in prefix_ids if self._ref_counts[b] == 0)
        if partial is not None and self._ref_counts[partial] == 0:
            num_revived += 1
        if num_fresh + num_revived > len(self._free):
            return False
        if table is None:
            table = self._tables[seq_id] = []
            self._num_cache_checked[seq_id] = 0
        if partial is not None:
            self._take_ref(partial)
        for b in prefix_ids:
            self._take_ref(b)
            table.append(b)
        for _ in range(num_fresh):
            table.append(self._pop_free())
        if partial is not None:
            try:
                self._copy_tokens(partial, table[len(prefix_ids)], prefix.partial_tokens)
            finally:
                self._drop_ref(partial)  # back to the free-queue tail: just used
        return True

    def trim(self, seq_id: str, num_tokens: int) -> None:
        """Gives back the sequence's trailing blocks past ceil(num_tokens / block_size) (slots taken
        for speculative tokens that were rejected). Such blocks are its own, fresh and unhashed:
        they return to the free-queue head in the order they were popped, so the queue is as if
        they had never been taken."""
        table = self._tables.get(seq_id)
        if table is None:
            return
        keep = -(-num_tokens // self.block_size)
        while len(table) > keep:
            block_id = table[-1]
            if self._ref_counts[block_id] != 1 or self._block_hash[block_id] is not None:
                break  # shared or cached: not a block speculation took (cannot happen; kept safe)
            table.pop()
            self._ref_counts[block_id] = 0
            self._free[block_id] = None
            self._free.move_to_end(block_id, last=False)

    def block_table(self, seq_id: str) -> list[int]:
        """A copy of the sequence's block ids in token order ([] for an unknown sequence)."""
        return list(self._tables.get(seq_id, ()))

    def num_blocks_of(self, seq_id: str) -> int:
        return len(self._tables.get(seq_id, ()))

    def has_seq(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def cache_full_blocks(self, seq_id: str, block_hashes: list[bytes], num_computed_tokens: int,
                          token_ids: Sequence[int] | None = None) -> None:
        """Registers the sequence's fully computed blocks (i < num_computed_tokens // block_size and
        i < len(block_hashes)) in the prefix cache; with the sequence's `token_ids`, each newly
        registered block also becomes a candidate for partial hits (find_cached_prefix).
        A block already registered is skipped. If another block already holds the hash (two sequences
        computed the same block concurrently), the existing mapping stays and this block stays
        unhashed: it is freed as an ordinary block. Each block is considered once. An unknown
        (already freed) seq_id is a no-op, like free()."""
        table = self._tables.get(seq_id)
        if table is None:  # freed meanwhile (abort): its blocks are no longer its to cache
            return
        num_full = min(num_computed_tokens // self.block_size, len(block_hashes))
        if num_full > len(table):
            raise ValueError(
                f"cache_full_blocks: {num_full} full blocks computed but seq_id {seq_id!r} "
                f"owns only {len(table)} blocks"
            )
        if not self.enable_prefix_caching:
            return
        for i in range(self._num_cache_checked[seq_id], num_full):
            block_id, h = table[i], block_hashes[i]
            current = self._block_hash[block_id]
            if current is not None:
                if current != h:
                    raise ValueError(
                        f"cache_full_blocks: block {block_id} (index {i} of {seq_id!r}) is cached under "
                        "a different hash; the sequence's block hashes changed"
                    )
            elif h not in self._hash_to_block:
                self._block_hash[block_id] = h
                self._hash_to_block[h] = block_id
                if token_ids is not None and self._copy_tokens is not None:
                    tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
                    parent = block_hashes[i - 1] if i else ROOT_HASH
                    self._block_tokens[block_id], self._block_parent[block_id] = tokens, parent
                    self._children.setdefault((parent, tokens[0]), set()).add(block_id)
        self._num_cache_checked[seq_id] = max(self._num_cache_checked[seq_id], num_full)

    def free(self, seq_id: str) -> None:
        """Drops the sequence's references; idempotent (an unknown seq_id is a no-op). Blocks reaching
        refcount 0 join the free-queue tail in reverse table order, so a sequence's last blocks are
        evicted before its first ones and a shared prefix stays cached longest."""
        table = self._tables.pop(seq_id, None)
        self._num_cache_checked.pop(seq_id, None)
        for block_id in reversed(table or ()):
            self._drop_ref(block_id)

    # ----- prefix cache -----

    def lookup(self, block_hash: bytes) -> int | None:
        """The block caching block_hash (referenced or not), or None."""
        return self._hash_to_block.get(block_hash)

    def allocate_cached_block(self, block_hash: bytes) -> int | None:
        """A fresh block registered under block_hash, holding one reference, for KV imported from
        elsewhere; None if no block is free.
        The reference keeps the block from eviction while the caller writes its KV. Until
        release_block, lookup() sees the block (so it is not imported twice) but find_cached_prefix
        does not (its KV is not written yet). Call release_block(block_id) once the KV is written, or
        release_block(block_id, keep_cached=False) if the import failed.
        Raises ValueError if block_hash is already cached (check lookup() first) or caching is off."""
        if not self.enable_prefix_caching:
            raise ValueError("allocate_cached_block: prefix caching is disabled")
        if not isinstance(block_hash, bytes) or not block_hash:
            raise ValueError(f"allocate_cached_block: block_hash must be non-empty bytes, got {block_hash!r}")
        existing = self._hash_to_block.get(block_hash)
        if existing is not None:
            raise ValueError(f"allocate_cached_block: hash already cached in block {existing}")
        if not self._free:
            return None
        block_id = self._pop_free()
        self._block_hash[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id
        self._importing.add(block_id)
        return block_id

    def release_block(self, block_id: int, keep_cached: bool = True) -> None:
        """Drops the reference taken by allocate_cached_block. With keep_cached the block stays
        cached (evictable at refcount 0); without it the hash is dropped and, if unreferenced, the
        block goes to the free-queue head (for a failed import)."""
        if block_id not in self._importing:
            raise ValueError(f"release_block: block {block_id!r} holds no allocate_cached_block reference")
        self._importing.remove(block_id)
        if not keep_cached:
            self._unhash(block_id)
        self._drop_ref(block_id)
        if not keep_cached and self._ref_counts[block_id] == 0:
            self._free.move_to_end(block_id, last=False)  # its KV is garbage: reuse it first

    def pin(self, block_ids: list[int]) -> None:
        """A reference on each block (held or cached now) until `unpin`: none is freed, evicted or
        written meanwhile (a prefill's exported blocks read from their pages: PinnedExport)."""
        if any(self._ref_counts[self._check_block_id(b)] == 0 and self._block_hash[b] is None for b in block_ids):
            raise ValueError(f"pin: a block of {block_ids} is neither held nor cached")
        self._pins.update(block_ids)
        for block_id in block_ids:
            self._take_ref(block_id)

    def unpin(self, block_ids: list[int]) -> None:
        """Gives back the references `pin` took."""
        if Counter(block_ids) - self._pins:
            raise ValueError(f"unpin: {sorted(Counter(block_ids) - self._pins)} not pinned that often")
        self._pins = self._pins - Counter(block_ids)
        for block_id in block_ids:
            self._drop_ref(block_id)

    def reset_prefix_cache(self) -> bool:
        """Drops the hashes of all unreferenced blocks. Returns True if the cache is now empty,
        False if referenced blocks keep theirs (they become evictable once freed)."""
        for block_id in self._free:
            self._unhash(block_id)
        return not self._hash_to_block

    # ----- internals -----

    def _check_block_id(self, block_id: int) -> int:
        if not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} is outside [0, {self.num_blocks})")
        return block_id

    def _check_prefix(
        self, seq_id: str, table: list[int] | None, num_tokens: int, prefix: PrefixMatch | None
    ) -> list[int] | None:
        """The prefix's full block ids ([] for none), or None when it has no blocks and no partial hit."""
        if prefix is None or (not prefix.block_ids and prefix.partial_block is None):
            return None
        if table is not None:
            raise ValueError(f"allocate_slots: prefix given for {seq_id!r}, which already has blocks")
        ids = prefix.block_ids
        if prefix.num_cached_tokens != len(ids) * self.block_size + prefix.partial_tokens:
            raise ValueError(
                f"allocate_slots: prefix num_cached_tokens {prefix.num_cached_tokens} != "
                f"{len(ids)} blocks * block_size {self.block_size} + {prefix.partial_tokens} partial tokens"
            )
        if prefix.num_cached_tokens > num_tokens:
            raise ValueError(
                f"allocate_slots: prefix covers {prefix.num_cached_tokens} tokens, "
                f"more than num_tokens {num_tokens}"
            )
        if prefix.partial_block is not None:
            b = self._check_block_id(prefix.partial_block)
            if not 0 < prefix.partial_tokens < self.block_size:
                raise ValueError(f"allocate_slots: partial_tokens must be in [1, {self.block_size}), "
                                 f"got {prefix.partial_tokens}")
            if prefix.num_cached_tokens >= num_tokens:
                raise ValueError("allocate_slots: a partial hit needs a token to compute after it "
                                 f"(num_tokens {num_tokens}, cached {prefix.num_cached_tokens})")
            if self._block_hash[b] is None or self._block_hash[b] != prefix.partial_hash:
                raise ValueError(
                    f"allocate_slots: partial-hit block {b} was evicted after find_cached_prefix; "
                    "look the prefix up again right before allocating"
                )
        if len(set(ids)) != len(ids):
            raise ValueError(f"allocate_slots: prefix repeats a block id: {ids}")
        for i, b in enumerate(ids):
            self._check_block_id(b)
            h = self._block_hash[b]
            if h is None or (prefix.block_hashes and prefix.block_hashes[i] != h):
                raise ValueError(
                    f"allocate_slots: prefix block {b} was evicted after find_cached_prefix; "
                    "look the prefix up again right before allocating"
                )
        return list(ids)

    def _pop_free(self) -> int:
        # Takes the LRU head; its KV is about to be overwritten, so its hash leaves the cache.
        block_id, _ = self._free.popitem(last=False)
        self._unhash(block_id)
        self._ref_counts[block_id] = 1
        return block_id

    def _take_ref(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            del self._free[block_id]
        self._ref_counts[block_id] += 1

    def _drop_ref(self, block_id: int) -> None:
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            self._free[block_id] = None  # tail: evicted last

    def _unhash(self, block_id: int) -> None:
        h = self._block_hash[block_id]
        if h is not None:
            self._block_hash[block_id] = None
            del self._hash_to_block[h]
            tokens = self._block_tokens[block_id]
            if tokens is not None:
                key = (self._block_parent[block_id], tokens[0])
                siblings = self._children[key]
                siblings.discard(block_id)
                if not siblings:
                    del self._children[key]
                self._block_tokens[block_id] = self._block_parent[block_id] = None
            if self.track_evictions:
                self.evicted_hashes.append(h)

    def take_evicted(self) -> list[bytes]:
        """The hashes that left the prefix cache since the last call (when track_evictions is on);
        a worker removes them from its Redis ownership."""
        out, self.evicted_hashes = self.evicted_hashes, []
        return out

    def cached_hashes(self) -> list[bytes]:
        """Every hash in the prefix cache now (a worker's ownership snapshot)."""
        return list(self._hash_to_block)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading elements a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
