"""The prefill side of KV transfer: which of a prompt's full blocks need no export (the kvstore
holds them already), putting the exported ones into the kvstore under a lease named after the
request, and recording in Redis that this worker's prefix cache holds all of them.

Once the prompt is queued, one Contains call asks the kvstore which of its full blocks it already
holds; it runs during the prefill (`StoredBlocks`), so on a prefix-cache hit, where nearly every
block is stored, the hit costs the suffix's compute and little more. (Sent before the prompt was
queued, its start delayed the prefill by ~0.7 ms of a 1K-token hit's ~30 ms TTFT.) The engine pins the other
blocks' pages before the sequence is freed (splitserve.transfer.pages.PinnedExport): their payloads
go from the pages straight into the kvstore's slots (no copy on the loop thread, none held in the
worker), and the pages are unpinned once the put is over.

Metrics, per export: kv_transfer_bytes/seconds{direction="put"} (payload bytes of the blocks put,
duration of the put call), kv_transfer_failures{direction="put"} when the kvstore could not take them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Container
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

import grpc

from splitserve.transfer.pages import Block, PinnedExport

logger = logging.getLogger(__name__)


class BlockSink(Protocol):
    """The part of a kvstore client the prefill side uses (splitserve.kvstore.client.KVStoreClient)."""

    address: str

    def release(self, lease_id: str) -> int:
        """Ends a lease; the number of blocks it held."""

    def contains_future(self, hashes: list[bytes]) -> Any:
        """A grpc.Future whose result has `present`, one flag per hash."""

    def put(self, blocks: list[Block], lease_id: str = "", lease_ttl_s: float = 0.0) -> Any:
        """Stores the blocks (payloads bytes-like or PagePayload) under the lease; grpc.RpcError when
        the store cannot."""


class StoredBlocks:
    """The engine's `export_skip` for one prompt: the hashes of its full blocks the kvstore already
    holds, from a Contains call sent (`ask`: a grpc.Future of it) once the prompt is queued, by
    `start` or at the latest when read, and read when the prefill ends (so the call overlaps the
    prefill instead of preceding it). The answer is normally there long before; the loop thread
    waits at most `wait_s` more for it. Without it (a slow kvstore, or the call failed) nothing is
    skipped: every block is exported and the put decides. Read only by the engine's loop thread."""

    def __init__(self, hashes: list[bytes], ask: Callable[[], Any], wait_s: float = 0.1) -> None:
        self._hashes, self._ask, self._wait_s = hashes, ask, wait_s
        self._future = None
        self._lock = threading.Lock()  # start: the handler's thread, or the loop thread's first read
        self._present: frozenset[bytes] | None = None

    def start(self) -> None:
        """Sends the Contains call, once."""
        with self._lock:
            if self._future is None:
                self._future = self._ask()

    def _resolve(self) -> frozenset[bytes]:
        if self._present is None:
            self.start()
            try:
                flags = self._future.result(timeout=self._wait_s).present
            except grpc.FutureTimeoutError:
                self._future.cancel()
                flags = ()
            except grpc.RpcError:  # the kvstore is down or refused: export everything
                flags = ()
            self._present = frozenset(h for h, p in zip(self._hashes, flags) if p)
        return self._present

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._resolve()


class ExportResult(NamedTuple):
    """What one prefill's export did."""

    kvstore_address: str  # where the decode worker fetches from; "" when nothing was put (it recomputes)
    num_put: int  # blocks sent to the kvstore
    num_skipped: int  # full prompt blocks not sent (the kvstore held them, or there is no kvstore)
    error: str  # why the put failed (a status code name); "" when it did not


class BlockExporter:
    """Exports prefills' blocks to one kvstore (or none: colocated, where they stay in this cache)
    and records ownership. Cumulative counts feed the worker's LoadResponse."""

    def __init__(self, store: BlockSink | None, metrics, record_ownership: Callable[[list[bytes]], None],
                 lease_ttl_s: float) -> None:
        self.store = store
        self.metrics = metrics  # splitserve.metrics.Metrics (kv_transfer, kv_transfer_failed, touch)
        self.lease_ttl_s = lease_ttl_s
        self._record_ownership = record_ownership  # (hashes now in this worker's prefix cache) -> None
        self.num_blocks_put = 0  # blocks sent to the kvstore (those it lacked)
        self.num_blocks_skipped = 0  # blocks the kvstore already had
        # records a prefill's blocks in Redis while the handler puts them in the kvstore
        self._recorder = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prefill-ownership")
        if store is not None:
            metrics.touch("kv_transfer_bytes", "kv_transfer_seconds", "kv_transfer_failures", direction="put")

    def skip(self, prompt_hashes: list[bytes]) -> Container[bytes]:
        """The engine's `export_skip` for a prompt with these full-block hashes: all of them without a
        kvstore; else a `StoredBlocks` whose Contains call runs during the prefill (`ask` sends it:
        call it once the prompt is queued)."""
        if self.store is None or not prompt_hashes:
            return frozenset(prompt_hashes)
        store = self.store
        return StoredBlocks(prompt_hashes, lambda: store.contains_future(prompt_hashes))

    @staticmethod
    def ask(skip: Container[bytes]) -> None:
        """Sends the Contains call of a `skip` result (nothing to send for a plain set)."""
        if isinstance(skip, StoredBlocks):
            skip.start()

    def export(self, request_id: str, prompt_hashes: list[bytes], blocks: list[Block] | PinnedExport) -> ExportResult:
        """Puts `blocks` (the prompt's blocks the kvstore lacked: read out, or pinned in the cache's
        pages, which are released here once the put is over) under a lease named `request_id` while
        recording all `prompt_hashes` as held here; returns once both are done, so the next request
        is routed here."""
        pinned = blocks if isinstance(blocks, PinnedExport) else None
        try:
            skipped = len(prompt_hashes) - len(blocks)
            self.num_blocks_skipped += skipped
            recorded = self._recorder.submit(self._record_ownership, prompt_hashes)
            # a pinned export's headers are made here, off the loop thread (the checksums read the pages)
            address, error = self._put(request_id, pinned.blocks() if pinned is not None and self.store else blocks)
            recorded.result()
            return ExportResult(address, len(blocks) if address else 0, skipped, error)
        finally:
            if pinned is not None:
                pinned.release()

    def release(self, request_id: str) -> None:
        """Ends the lease of a put nobody will fetch under (its caller went away): the blocks stay in
        the kvstore, evictable like any other. A failure is logged: the lease's TTL ends it."""
        try:
            self.store.release(request_id)
        except grpc.RpcError as exc:
            logger.warning("kvstore lease not released (its TTL ends it): request_id=%s error=%s", request_id, exc)

    def _put(self, request_id: str, blocks: list[Block]) -> tuple[str, str]:
        """(the kvstore's address or "" when the put failed, the failure's status code name or "")."""
        if self.store is None:
            return "", ""
        try:
            if blocks:
                t0 = time.monotonic()
                self.store.put(blocks, lease_id=request_id, lease_ttl_s=self.lease_ttl_s)
                self.metrics.kv_transfer("put", sum(len(payload) for _, payload in blocks), time.monotonic() - t0)
            self.num_blocks_put += len(blocks)
            return self.store.address, ""
        except grpc.RpcError as exc:
            self.metrics.kv_transfer_failed("put")
            return "", exc.code().name
