"""KV blocks in and out of the paged cache: which of a finished prefill's blocks are read out
(`blocks_to_export`, `read_blocks`), and writing received blocks into free pages registered in the
prefix cache (`import_blocks`). The engine calls these on its loop thread; they touch the cache
and the block manager only through the block manager's import API (allocate_cached_block /
release_block), so no other code handles free lists or refcounts.
"""
from __future__ import annotations

import logging
from collections.abc import Container
from typing import TYPE_CHECKING

from splitserve.transfer.block import BlockHeader, KVBlockError, encode_block, import_block

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
