"""The kvstore's chunk protocol: how whole blocks are cut into BlockChunk messages and put back
together, for both ends of a stream (the store reassembles Put streams, the client Get streams).

A block travels as one or more BlockChunks in a row: the first carries block_hash and header (and,
on Put, lease_id/lease_ttl_s), later ones carry only payload slices, and the one with last=true
ends the block. Blocks follow one another in one stream; a block is never interleaved with another.
On Get, a chunk with missing=true stands for a block the store does not hold (and ends the useful
part of the answer: the reader wants a prefix).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from splitserve.transfer.block import BlockHeader, KVBlockError
from splitserve.v1 import kvstore_pb2

CHUNK_BYTES = 1 << 20  # about 1 MiB of payload per message


class ChunkError(ValueError):
    """A Put stream that breaks the chunk protocol; the message names the block and the problem."""


def short_hash(block_hash: bytes) -> str:
    """The first 16 hex digits of a hash, for messages."""
    return block_hash.hex()[:16] + "..." if block_hash else "(empty hash)"


def block_chunks(block_hash: bytes, header: bytes, payload: bytes, chunk_bytes: int = CHUNK_BYTES,
                 lease_id: str = "", lease_ttl_s: float = 0.0) -> Iterator[kvstore_pb2.BlockChunk]:
    """The BlockChunks of one block: header (and lease) on the first, payload slices of at most
    chunk_bytes, last=true on the final one (a block of ceil(len/chunk_bytes) chunks, at least 1)."""
    n = max(1, -(-len(payload) // chunk_bytes))
    view = memoryview(payload)
    for i in range(n):
        first = i == 0
        yield kvstore_pb2.BlockChunk(
            block_hash=block_hash, header=header if first else b"",
            data=payload if n == 1 else bytes(view[i * chunk_bytes:(i + 1) * chunk_bytes]), last=i == n - 1,
            lease_id=lease_id if first else "", lease_ttl_s=lease_ttl_s if first else 0.0,
        )


def missing_chunk(block_hash: bytes) -> kvstore_pb2.BlockChunk:
    """Get's answer for a block the store does not hold."""
    return kvstore_pb2.BlockChunk(block_hash=block_hash, missing=True)


@dataclass
class OpenBlock:
    """A Put block whose header chunk arrived, as the store's `open_block` accepted it."""

    block_hash: bytes
    header_bytes: bytes
    header: BlockHeader
    lease_id: str | None  # None: no lease
    lease_ttl_s: float | None  # None: the store's default
    parts: list[bytes] = field(default_factory=list)  # payload slices so far
    received: int = 0  # payload bytes so far; never above header.payload_size


def reassemble_put(chunks: Iterable, open_block: Callable[[object], OpenBlock]) -> Iterator[tuple[OpenBlock, bytes]]:
    """Yields (block, payload) for each block of a Put stream once its last chunk arrived.
    `open_block(chunk)` turns a header chunk into an OpenBlock (and may raise the store's own
    refusal, e.g. a header that does not parse). ChunkError on a chunk out of place; a block is
    yielded whole or not at all, so blocks completed before the error are the caller's to keep."""
    cur: OpenBlock | None = None
    for chunk in chunks:
        if chunk.missing:
            raise ChunkError("Put chunk has missing=true (a Get-only field)")
        if cur is None:
            if not chunk.header:
                raise ChunkError(f"data chunk for block {short_hash(chunk.block_hash)} without a preceding "
                                 "header chunk")
            cur = open_block(chunk)
        elif chunk.block_hash and chunk.block_hash != cur.block_hash:
            raise ChunkError(f"chunk for block {short_hash(chunk.block_hash)} arrived in the middle of block "
                             f"{short_hash(cur.block_hash)} (no chunk with last=true yet)")
        elif chunk.header:
            raise ChunkError(f"second header chunk for block {short_hash(cur.block_hash)} before its last chunk")
        cur.received += len(chunk.data)
        if cur.received > cur.header.payload_size:  # bounds what one block may buffer
            raise ChunkError(f"block {short_hash(cur.block_hash)}: received more than the header's "
                             f"payload_size of {cur.header.payload_size} bytes")
        cur.parts.append(chunk.data)
        if chunk.last:
            block, cur = cur, None
            yield block, b"".join(block.parts)
    if cur is not None:
        raise ChunkError(f"stream ended in the middle of block {short_hash(cur.block_hash)}: {cur.received} of "
                         f"{cur.header.payload_size} payload bytes received, no chunk with last=true")


def reassemble_get(chunks: Iterable, hashes: list[bytes]) -> list[tuple[BlockHeader, bytes]]:
    """The leading whole blocks of a Get answer to `hashes`, in order, up to the first missing one.
    KVBlockError when the answer is malformed: a block out of order or under another hash, a data
    chunk before its header, or a stream that ends inside a block."""
    out: list[tuple[BlockHeader, bytes]] = []
    header: BlockHeader | None = None
    parts: list[bytes] = []
    for chunk in chunks:
        if chunk.missing:
            break
        if header is None:
            if not chunk.header:
                raise KVBlockError("kvstore stream: a data chunk arrived before its block's header")
            header = BlockHeader.from_bytes(chunk.header)
            if len(out) >= len(hashes) or chunk.block_hash != hashes[len(out)] \
                    or header.block_hash != chunk.block_hash:
                raise KVBlockError("kvstore stream: blocks arrived out of order or under the wrong hash")
        parts.append(chunk.data)
        if chunk.last:
            out.append((header, b"".join(parts)))
            header, parts = None, []
    if header is not None:
        raise KVBlockError("kvstore stream ended inside a block (truncated)")
    return out
