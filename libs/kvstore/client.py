"""Client of the kvstore role: chunked streaming put and get of KV blocks."""
from __future__ import annotations

from typing import Iterable, Iterator

import grpc

from splitserve.engine.kv_block import BlockHeader, KVBlockError
from splitserve.rpc import DEFAULT_MAX_MESSAGE_BYTES, channel
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

CHUNK_BYTES = 1 << 20  # about 1 MiB of payload per message


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
            data=bytes(view[i * chunk_bytes:(i + 1) * chunk_bytes]), last=i == n - 1,
            lease_id=lease_id if first else "", lease_ttl_s=lease_ttl_s if first else 0.0,
        )


class KVStoreClient:
    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 chunk_bytes: int = CHUNK_BYTES, timeout_s: float = 30.0) -> None:
        self.address = address
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self._channel = channel(address, max_message_bytes)
        self._stub = kvstore_pb2_grpc.KVStoreStub(self._channel)

    def contains(self, hashes: list[bytes]) -> list[bool]:
        if not hashes:
            return []
        resp = self._stub.Contains(kvstore_pb2.ContainsRequest(block_hashes=hashes), timeout=self.timeout_s)
        return list(resp.present)

    def put(self, blocks: Iterable[tuple[BlockHeader, bytes]], lease_id: str = "",
            lease_ttl_s: float = 0.0) -> kvstore_pb2.PutResponse:
        """Streams the blocks in one call, each pinned under `lease_id` for at most lease_ttl_s."""
        def chunks():
            for header, payload in blocks:
                yield from block_chunks(header.block_hash, header.to_bytes(), payload, self.chunk_bytes,
                                        lease_id, lease_ttl_s)
        return self._stub.Put(chunks(), timeout=self.timeout_s)

    def get(self, hashes: list[bytes], release_lease_id: str = "") -> list[tuple[BlockHeader, bytes]]:
        """The leading blocks of `hashes` the store has, reassembled, in order; stops at the first
        missing one. KVBlockError when the stream is malformed (the caller recomputes)."""
        if not hashes:
            return []
        out: list[tuple[BlockHeader, bytes]] = []
        header: BlockHeader | None = None
        parts: list[bytes] = []
        stream = self._stub.Get(kvstore_pb2.GetRequest(block_hashes=hashes, release_lease_id=release_lease_id),
                                timeout=self.timeout_s)
        try:
            for chunk in stream:
                if chunk.missing:
                    break
                if header is None:
                    if not chunk.header:
                        raise KVBlockError("kvstore stream: a data chunk arrived before its block's header")
                    header = BlockHeader.from_bytes(chunk.header)
                    if chunk.block_hash != hashes[len(out)] or header.block_hash != chunk.block_hash:
                        raise KVBlockError("kvstore stream: blocks arrived out of order or under the wrong hash")
                parts.append(chunk.data)
                if chunk.last:
                    out.append((header, b"".join(parts)))
                    header, parts = None, []
        finally:
            stream.cancel()  # no-op when complete; stops the server at once when we broke off
        if header is not None:
            raise KVBlockError("kvstore stream ended inside a block (truncated)")
        return out

    def release(self, lease_id: str) -> int:
        return self._stub.Release(kvstore_pb2.ReleaseRequest(lease_id=lease_id), timeout=self.timeout_s).num_released

    def close(self) -> None:
        self._channel.close()
