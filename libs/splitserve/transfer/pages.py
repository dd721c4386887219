"""KV blocks in and out of the paged cache: which of a finished prefill's blocks are read out
(`blocks_to_export`, `read_blocks`, or left pinned in their pages for the caller to write out:
`PinnedExport`), and writing received blocks into free pages registered in the prefix cache
(`import_blocks`, or `PageImport`: the pages first, the payloads read or written into them off the
loop thread). The engine makes these on its loop thread; they touch the cache and the block manager
only through the block manager's import and pin API (allocate_cached_block / release_block, pin /
unpin), so no other code handles free lists or refcounts.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

from splitserve.transfer.block import (BlockHeader, KVBlockError, PagePayload, check_block, check_header, encode_block,
                                      import_block)

if TYPE_CHECKING:
    from splitserve.engine.block_manager import BlockManager
    from splitserve.engine.kv_cache import KVCache

logger = logging.getLogger(__name__)

Block = tuple[BlockHeader, bytes]  # one block as it travels: header, payload


def blocks_to_export(prompt_hashes: list[bytes], num_prompt_tokens: int, num_computed_tokens: int,
                     block_size: int, skip: Container[bytes]) -> tuple[list[tuple[int, bytes]], list[bytes]]:
    """(the (index in the block table, hash) of each computed full prompt block whose hash is not in
    `skip`, in order; the hashes of all computed full prompt blocks). A block is full once all its
    block_size tokens are computed; the tokens after the prompt (the outputs) are never exported."""
    n = min(num_prompt_tokens, num_computed_tokens) // block_size
    hashes = list(prompt_hashes[:n])
    return [(i, h) for i, h in enumerate(hashes) if h not in skip], hashes


def read_blocks(cache: "KVCache", block_table: list[int], selected: list[tuple[int, bytes]],
                model_id: str) -> list[Block]:
    """The header and payload of each selected block (index into `block_table`, hash), in order;
    read before the sequence's pages are freed."""
    return [encode_block(cache, block_table[i], h, model_id) for i, h in selected]


class PinnedExport:
    """A finished prefill's exported blocks left in its cache's pages, pinned (BlockManager.pin),
    instead of copied out on the loop thread: the caller encodes them (`blocks`: the checksums read
    the pages, the payloads alias them) on its own thread, puts them, then gives the pages back with
    `release`, whatever happened to the put. Made on the engine's thread; `release` may run on any
    thread: the unpin goes through `defer` (EngineLoop: run on the loop thread between two steps;
    None: at once, for a caller on the engine's thread). An export nobody released (its request's
    caller went away before reading it) is released when it is collected.
    A cache off the CPU has no page slices to alias: its blocks are copied out here, as
    `read_blocks` does, and nothing is pinned."""

    def __init__(self, cache: "KVCache", block_manager: "BlockManager", block_table: list[int],
                 selected: list[tuple[int, bytes]], model_id: str,
                 defer: Callable[[Callable[[], None]], object] | None = None) -> None:
        self._cache, self._block_manager, self._model_id, self._defer = cache, block_manager, model_id, defer
        self._lock = threading.Lock()
        self._ids = [(block_table[i], h) for i, h in selected]
        self._copied: list[Block] | None = None
        self._pinned: list[int] | None = []
        if self._ids and cache.block_parts(0) is None:  # off the CPU
            self._copied = [encode_block(cache, b, h, model_id) for b, h in self._ids]
        else:
            self._pinned = [b for b, _ in self._ids]
            block_manager.pin(self._pinned)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def hashes(self) -> list[bytes]:
        """The pinned blocks' hashes, in order."""
        return [h for _, h in self._ids]

    def blocks(self, skip: Container[bytes] = ()) -> list[Block]:
        """Each block's header and payload (a PagePayload over the pinned pages), in order, less
        those whose hash is in `skip`; any thread, before `release`."""
        if self._copied is not None:
            return [blk for blk in self._copied if blk[0].block_hash not in skip]
        if self._pinned is None:
            raise RuntimeError("the exported blocks were released: their pages may hold other KV now")
        return [encode_block(self._cache, b, h, self._model_id, copy=False) for b, h in self._ids if h not in skip]

    def release(self) -> None:
        """Unpins the pages (through `defer`: the block manager is the engine thread's); the first
        call only."""
        with self._lock:
            pinned, self._pinned = self._pinned, None
        if pinned:
            block_manager = self._block_manager
            if self._defer is None:
                block_manager.unpin(pinned)
            else:
                self._defer(lambda: block_manager.unpin(pinned))

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the pool goes with the process
            pass


class PageImport:
    """Fetched blocks written straight into the pages they will live in, so that neither their bytes
    nor the copy into the cache weigh on the engine's thread:
    - `begin` (on the engine's thread) gives each block not cached yet a page
      (BlockManager.allocate_cached_block: lookup() sees it, find_cached_prefix not before `finish`),
      in order, stopping at the first that finds none; `hashes` are the blocks to fetch;
    - the caller's thread reads a same-host payload straight into its page (`into`, the kvstore
      client's destination; the read is checked against the header's checksum), then `place`s the
      blocks: checks each header, writes a payload that arrived as bytes into its page (on the
      engine's thread, in `finish`, for a cache off the CPU) and counts the leading good ones;
    - `finish` (on the engine's thread) keeps that many leading blocks cached and frees the others'
      pages. An import never finished (its caller failed in between) is finished with nothing kept
      when `abandon`ed or collected (through `defer`, as PinnedExport's release)."""

    def __init__(self, cache: "KVCache", block_manager: "BlockManager", model_id: str, hashes: list[bytes],
                 defer: Callable[[Callable[[], None]], object] | None = None) -> None:
        self._cache, self._block_manager, self._model_id, self._defer = cache, block_manager, model_id, defer
        self._lock = threading.Lock()
        self._finished = False
        self._on_host = cache.block_parts(0) is not None  # payloads can be written into the pages here
        self._pending: list[tuple[int, int, Block]] = []  # (index, page, block) to write on the engine's thread
        self._dest: dict[int, list[memoryview]] = {}  # block index -> the page slices `into` gave
        self._good = 0
        self.ids: list[int | None] = []  # per fetched block: its page, None when it was cached already
        self._cached: list[int] = []  # the pages of those, pinned meanwhile: no later page evicts them
        for h in hashes:
            cached = block_manager.lookup(h)
            if cached is not None:
                block_manager.pin([cached])
                self._cached.append(cached)
                self.ids.append(None)
                continue
            block_id = block_manager.allocate_cached_block(h)
            if block_id is None:
                break
            self.ids.append(block_id)
        self.hashes = list(hashes[:len(self.ids)])

    def into(self, i: int, header: BlockHeader) -> list[memoryview] | None:
        """Where block i's payload goes when read (its page's slices), or None: read it into a
        buffer (it was cached already, or the cache is off the CPU)."""
        block_id = self.ids[i] if i < len(self.ids) else None
        parts = None if block_id is None else self._cache.block_parts(block_id)
        if parts is not None:
            self._dest[i] = parts
        return parts

    def place(self, blocks: list[Block]) -> int:
        """How many leading `blocks` (what the fetch of `hashes` delivered, in order) are good: each
        header matches this cache and the block it was asked for, and its payload is in its page, or
        written there now. Stops at the first that is not (logged)."""
        good = 0
        for i, (header, payload) in enumerate(blocks[:len(self.ids)]):
            block_id = self.ids[i]
            try:
                if block_id is None:  # cached already (another request imported it meanwhile)
                    check_header(header, self._cache, self._model_id, self.hashes[i])
                elif isinstance(payload, PagePayload) and payload.parts is self._dest.get(i):
                    check_header(header, self._cache, self._model_id, self.hashes[i])  # read in place, checked
                elif not self._on_host:  # written on the engine's thread
                    check_block(header, payload, self._cache, self._model_id, self.hashes[i])
                    self._pending.append((i, block_id, (header, payload)))
                else:
                    import_block(self._cache, block_id, header, payload, self._model_id, self.hashes[i])
            except KVBlockError as exc:
                logger.warning("KV block import failed, the rest is recomputed: %s", exc)
                break
            good += 1
        self._good = good
        return good

    def finish(self, num_good: int | None = None) -> int:
        """On the engine's thread: keeps the leading `num_good` (default: what `place` found) blocks
        cached and frees the rest's pages; the first call only. Returns the blocks kept."""
        with self._lock:
            if self._finished:
                return 0
            self._finished = True
        keep = self._good if num_good is None else num_good
        for i, block_id, (_, payload) in self._pending:
            if i < keep:
                self._cache.write_block(block_id, payload)
        self._pending = []
        for i, block_id in enumerate(self.ids):
            if block_id is not None:
                self._block_manager.release_block(block_id, keep_cached=i < keep)
        self._block_manager.unpin(self._cached)
        return keep

    def abandon(self) -> None:
        """From any thread: finish with nothing kept, on the engine's thread (no-op once finished)."""
        if self._finished:
            return
        if self._defer is None:
            self.finish(0)
        else:
            self._defer(lambda: self.finish(0))

    def __del__(self) -> None:
        try:
            self.abandon()
        except Exception:  # interpreter shutdown
            pass


def import_blocks(block_manager: "BlockManager", cache: "KVCache", model_id: str, blocks: list[Block]) -> int:
    """Writes received blocks into free pages and registers them in the prefix cache, in order,
    stopping at the first that is invalid or finds no free page; blocks already cached are skipped.
    Returns how many leading blocks are now cached. Nothing half-written is kept: a block that
    fails its checks gives its page back uncached."""
    done = 0
    for header, payload in blocks:
        if block_manager.lookup(header.block_hash) is not None:
            done += 1
            continue
        block_id = block_manager.allocate_cached_block(header.block_hash)
        if block_id is None:
            break
        try:
            import_block(cache, block_id, header, payload, model_id, header.block_hash)
        except KVBlockError as exc:
            logger.warning("KV block import failed, the rest is recomputed: %s", exc)
            block_manager.release_block(block_id, keep_cached=False)
            break
        block_manager.release_block(block_id)
        done += 1
    return done
