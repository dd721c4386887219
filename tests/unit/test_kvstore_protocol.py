"""The kvstore's chunk protocol on its own: cutting blocks into chunks and putting Put and Get
streams back together, with the exact chunk counts and the error each malformed stream gets."""
from __future__ import annotations

import pytest

from splitserve.kvstore.protocol import (
    ChunkError,
    OpenBlock,
    block_chunks,
    missing_chunk,
    reassemble_get,
    reassemble_put,
)
from splitserve.transfer.block import LAYOUT_VERSION, BlockHeader, KVBlockError, payload_checksum
from splitserve.v1 import kvstore_pb2


def block(tag: int, size: int = 10):
    """(hash, header bytes, payload) of a made-up block."""
    h, payload = bytes([tag]) * 32, bytes(range(tag, tag + size))
    header = BlockHeader(block_hash=h, model_id="m", num_layers=1, num_kv_heads=1, head_dim=1, block_size=1,
                         dtype="float32", layout_version=LAYOUT_VERSION, checksum=payload_checksum(payload),
                         payload_size=size)
    return h, header.to_bytes(), payload


def open_block(chunk) -> OpenBlock:
    return OpenBlock(chunk.block_hash, chunk.header, BlockHeader.from_bytes(chunk.header),
                     chunk.lease_id or None, chunk.lease_ttl_s or None)


def test_block_chunks_cut_the_payload_and_carry_header_and_lease_on_the_first():
    h, hdr, p = block(1, size=10)
    chunks = list(block_chunks(h, hdr, p, chunk_bytes=4, lease_id="L", lease_ttl_s=3.0))
    assert [c.data for c in chunks] == [p[0:4], p[4:8], p[8:10]]
    assert [c.last for c in chunks] == [False, False, True]
    assert [(c.header, c.lease_id, c.lease_ttl_s) for c in chunks] == [(hdr, "L", 3.0), (b"", "", 0.0), (b"", "", 0.0)]
    assert len(list(block_chunks(h, hdr, b"", chunk_bytes=4))) == 1  # an empty payload is still one chunk


def test_put_stream_yields_each_block_whole_with_its_lease():
    a, b = block(1, 10), block(2, 7)
    stream = [*block_chunks(*a, chunk_bytes=3, lease_id="L", lease_ttl_s=2.0), *block_chunks(*b, chunk_bytes=3)]
    out = [(blk.block_hash, blk.lease_id, blk.lease_ttl_s, payload) for blk, payload in reassemble_put(stream, open_block)]
    assert out == [(a[0], "L", 2.0, a[2]), (b[0], None, None, b[2])]


@pytest.mark.parametrize("make, message", [
    (lambda h, hdr, p: [kvstore_pb2.BlockChunk(block_hash=h, data=p, last=True)], "without a preceding header"),
    (lambda h, hdr, p: [kvstore_pb2.BlockChunk(block_hash=h, header=hdr, data=p[:4])], "stream ended in the middle"),
    (lambda h, hdr, p: [kvstore_pb2.BlockChunk(block_hash=h, header=hdr, data=p[:4]),
                        kvstore_pb2.BlockChunk(block_hash=b"\x09" * 32, data=p[4:], last=True)],
     "arrived in the middle of block"),
    (lambda h, hdr, p: [kvstore_pb2.BlockChunk(block_hash=h, header=hdr, data=p[:4]),
                        kvstore_pb2.BlockChunk(block_hash=h, header=hdr, data=p[4:], last=True)],
     "second header chunk"),
    (lambda h, hdr, p: list(block_chunks(h, hdr, p + b"\0", chunk_bytes=4)), "more than the header's payload_size"),
    (lambda h, hdr, p: [missing_chunk(h)], "missing=true"),
])
def test_malformed_put_streams_keep_the_blocks_before_the_error(make, message):
    good, bad = block(1), block(2)
    blocks = reassemble_put([*block_chunks(*good), *make(*bad)], open_block)
    first, payload = next(blocks)
    assert (first.block_hash, payload) == (good[0], good[2])
    with pytest.raises(ChunkError, match=message):
        next(blocks)


def test_get_stream_gives_the_leading_blocks_up_to_the_first_missing():
    a, b, c = block(1), block(2), block(3)
    stream = [*block_chunks(*a, chunk_bytes=4), *block_chunks(*b, chunk_bytes=4), missing_chunk(c[0])]
    out = reassemble_get(stream, [a[0], b[0], c[0]])
    assert [(h.block_hash, p) for h, p in out] == [(a[0], a[2]), (b[0], b[2])]


@pytest.mark.parametrize("cut, message", [
    (lambda chunks: chunks[:-1], "ended inside a block"),
    (lambda chunks: chunks[1:], "data chunk arrived before its block's header"),
])
def test_malformed_get_streams_are_block_errors(cut, message):
    a = block(1)
    with pytest.raises(KVBlockError, match=message):
        reassemble_get(cut(list(block_chunks(*a, chunk_bytes=4))), [a[0]])


def test_a_get_answer_out_of_order_or_beyond_the_request_is_refused():
    a, b = block(1), block(2)
    with pytest.raises(KVBlockError, match="out of order"):
        reassemble_get([*block_chunks(*b), *block_chunks(*a)], [a[0], b[0]])
    with pytest.raises(KVBlockError, match="out of order"):
        reassemble_get([*block_chunks(*a), *block_chunks(*b)], [a[0]])
