"""Client of the kvstore role: chunked streaming put and get of KV blocks."""
from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Iterable, Iterator

import grpc

from splitserve.engine.kv_block import BlockHeader, KVBlockError
from splitserve.kvstore import shm
from splitserve.rpc import DEFAULT_MAX_MESSAGE_BYTES, channel
from splitserve.v1 import kvstore_pb2, kvstore_pb2_grpc

CHUNK_BYTES = 1 << 20  # about 1 MiB of payload per message
SHM_BATCH_BLOCKS = 32  # blocks per PutFile call: writing one batch overlaps the store checking the last
log = logging.getLogger(__name__)


def _add_counts(total: kvstore_pb2.PutResponse, part: kvstore_pb2.PutResponse) -> None:
    total.num_stored += part.num_stored
    total.num_already_present += part.num_already_present
    total.num_bytes += part.num_bytes


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


class KVStoreClient:
    """put/get of whole blocks. With use_shm (the default) the client asks the store for its
    shared-memory directory once; when it can read the store's probe token there (same host, same
    user) payloads travel through files (PutFile/GetFile), otherwise through the gRPC streams."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 chunk_bytes: int = CHUNK_BYTES, timeout_s: float = 30.0, use_shm: bool = True,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.use_shm = use_shm
        self._shm_dir: str | None = None  # the store's directory once probed and readable
        self._probed = False
        self._lock = threading.Lock()
        self._channel = channel(address, max_message_bytes, credentials=credentials)
        self._stub = kvstore_pb2_grpc.KVStoreStub(self._channel)

    @property
    def transport(self) -> str:
        """"shm" or "grpc": the path the next put/get takes (probes the store on first use)."""
        return "shm" if self._shm() else "grpc"

    def _shm(self) -> str | None:
        if not self.use_shm:
            return None
        with self._lock:
            if self._probed and self._shm_dir is not None and \
                    not os.path.exists(os.path.join(self._shm_dir, shm.PROBE_NAME)):
                # The store restarted (a new process has a new directory): ask it again.
                log.info("kvstore %s: its shared-memory directory is gone, asking the store again", self.address)
                self._probed = False
            if not self._probed:
                self._shm_dir = self._probe()
                self._probed = True
            return self._shm_dir

    def _probe(self) -> str | None:
        try:
            info = self._stub.Info(kvstore_pb2.InfoRequest(), timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older store: streams only
                return None
            raise
        if not info.shm_dir or not info.shm_token:
            return None
        try:
            with open(os.path.join(info.shm_dir, shm.PROBE_NAME), "rb") as f:
                if secrets.compare_digest(f.read(64), info.shm_token):
                    log.info("kvstore %s: same host, payloads go through %s", self.address, info.shm_dir)
                    return info.shm_dir
        except OSError:
            pass
        return None  # another host or container: the directory is not ours to see

    def _disable_shm(self, why: object) -> None:
        """This call streams; the next one asks the store for its directory again (it may have
        restarted, or tmpfs had no room for a moment)."""
        log.warning("kvstore %s: shared-memory path failed, streaming this call: %s", self.address, why)
        with self._lock:
            self._shm_dir, self._probed = None, False

    def contains(self, hashes: list[bytes]) -> list[bool]:
        if not hashes:
            return []
        resp = self._stub.Contains(kvstore_pb2.ContainsRequest(block_hashes=hashes), timeout=self.timeout_s)
        return list(resp.present)

    def put(self, blocks: Iterable[tuple[BlockHeader, bytes]], lease_id: str = "",
            lease_ttl_s: float = 0.0) -> kvstore_pb2.PutResponse:
        """Stores the blocks in one call, each pinned under `lease_id` for at most lease_ttl_s."""
        blocks = list(blocks)
        done = kvstore_pb2.PutResponse()
        directory = self._shm()
        if directory is not None and blocks:
            sent = self._put_files(directory, blocks, lease_id, lease_ttl_s, done)
            if sent == len(blocks):
                return done
            blocks = blocks[sent:]  # the directory failed part-way: stream the rest

        def chunks():
            for header, payload in blocks:
                yield from block_chunks(header.block_hash, header.to_bytes(), payload, self.chunk_bytes,
                                        lease_id, lease_ttl_s)
        _add_counts(done, self._stub.Put(chunks(), timeout=self.timeout_s))
        return done

    def _put_files(self, directory: str, blocks: list, lease_id: str, lease_ttl_s: float,
                   done: kvstore_pb2.PutResponse) -> int:
        """Puts blocks through the shared-memory directory, SHM_BATCH_BLOCKS per PutFile call, writing
        the next batch's files while the store checks the previous one (two cores, both busy).
        Returns how many leading blocks were put; fewer than all only when writing a file failed
        (the shared-memory path is then turned off). RpcError from the store propagates."""
        written: list[str] = []
        pending = None  # the PutFile call in flight
        put = 0
        try:
            for start in range(0, len(blocks), SHM_BATCH_BLOCKS):
                batch = blocks[start:start + SHM_BATCH_BLOCKS]
                names = []
                try:
                    for _, payload in batch:
                        names.append(shm.new_file_name("put"))
                        written.append(os.path.join(directory, names[-1]))
                        shm.write_file(written[-1], payload)
                except OSError as e:  # the directory went away or tmpfs is full
                    self._disable_shm(e)
                    break
                call = self._stub.PutFile.future(kvstore_pb2.PutFileRequest(
                    lease_id=lease_id, lease_ttl_s=lease_ttl_s,
                    blocks=[kvstore_pb2.FileBlock(block_hash=h.block_hash, header=h.to_bytes(), file_name=n)
                            for (h, _), n in zip(batch, names)]), timeout=self.timeout_s)
                if pending is not None:
                    _add_counts(done, pending[0].result())
                    put += pending[1]
                pending = (call, len(batch))
            if pending is not None:
                call, pending = pending, None
                _add_counts(done, call[0].result())
                put += call[1]
        finally:
            if pending is not None:
                pending[0].cancel()
            for path in written:  # the store took or removed them, unless a call never arrived
                shm.remove_quietly(path)
        return put

    def get(self, hashes: list[bytes], release_lease_id: str = "") -> list[tuple[BlockHeader, bytes]]:
        """The leading blocks of `hashes` the store has, in order; stops at the first missing one.
        A payload is bytes (streams) or a read-only mmap of the block's file (same host), a buffer
        the importer reads once. KVBlockError when what arrived is malformed (the caller recomputes)."""
        if not hashes:
            return []
        request = kvstore_pb2.GetRequest(block_hashes=hashes, release_lease_id=release_lease_id)
        directory = self._shm()
        if directory is not None:
            try:
                reply = self._stub.GetFile(request, timeout=self.timeout_s)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                log.warning("kvstore %s: GetFile refused (%s), streaming instead", self.address, e.details())
            else:
                try:
                    return self._read_file(directory, reply, hashes)
                except FileNotFoundError as e:  # the store's directory went away under us
                    self._disable_shm(e)
        return self._get_stream(request, hashes)

    def _read_file(self, directory: str, reply, hashes: list[bytes]) -> list[tuple[BlockHeader, bytes]]:
        """Maps each block's file (read-only: the payload is the mapping, no copy) and deletes it."""
        out: list[tuple[BlockHeader, bytes]] = []
        paths: list = []  # each block's path, or the ShmNameError of a name that is not ours to open
        for block in reply.blocks:
            try:
                paths.append(os.path.join(directory, shm.check_name(block.file_name, "get")))
            except shm.ShmNameError as e:
                paths.append(e)
        try:
            for i, (block, path) in enumerate(zip(reply.blocks, paths)):
                if isinstance(path, Exception):
                    raise KVBlockError(f"kvstore reply: {path}")
                header = BlockHeader.from_bytes(block.header)
                if i >= len(hashes) or block.block_hash != hashes[i] or header.block_hash != block.block_hash:
                    raise KVBlockError("kvstore reply: blocks arrived out of order or under the wrong hash")
                try:
                    payload = shm.map_file(path, header.payload_size)
                except FileNotFoundError:
                    raise
                except (OSError, ValueError) as e:
                    raise KVBlockError(f"kvstore transfer file {block.file_name}: {e}") from None
                out.append((header, payload))
        finally:
            for path in paths:
                if isinstance(path, str):
                    shm.remove_quietly(path)
        return out

    def _get_stream(self, request, hashes: list[bytes]) -> list[tuple[BlockHeader, bytes]]:
        out: list[tuple[BlockHeader, bytes]] = []
        header: BlockHeader | None = None
        parts: list[bytes] = []
        stream = self._stub.Get(request, timeout=self.timeout_s)
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
