"""The prefill side of KV transfer: which of a prompt's full blocks need no export (the kvstore
holds them already), putting the exported ones into the kvstore under a lease named after the
request, and recording in Redis that this worker's prefix cache holds all of them.

The engine pins every full block of the prompt in its pages before the sequence is freed
(splitserve.transfer.pages.PinnedExport), and the handler answers the first token before anything
else. Then one Contains call asks the kvstore which of the blocks it holds, and only the others go,
their payloads straight from the pages into the kvstore's slots (no copy on the loop thread, none
held in the worker); the pages are unpinned once the put is over. On a prefix-cache hit nearly every
block is stored, so the hit costs the suffix's compute and this call after its first token. (Sent
during the prefill instead, the call and its answer took CPU from the step on a 2-core machine:
the disaggregated hit's step ran ~2 ms longer than the colocated one.)

Metrics, per export: kv_transfer_bytes/seconds{direction="put"} (payload bytes of the blocks put,
duration of the put call), kv_transfer_failures{direction="put"} when the kvstore could not take them.
"""
from __future__ import annotations

import logging
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


class _Every:
    """The container that holds every hash."""

    def __contains__(self, block_hash: object) -> bool:
        return True


EVERY_BLOCK: Container[bytes] = _Every()


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
                 lease_ttl_s: float, contains_wait_s: float = 0.1) -> None:
        self.store = store
        self.metrics = metrics  # splitserve.metrics.Metrics (kv_transfer, kv_transfer_failed, touch)
        self.lease_ttl_s = lease_ttl_s
        self.contains_wait_s = contains_wait_s
        self._record_ownership = record_ownership  # (hashes now in this worker's prefix cache) -> None
        self.num_blocks_put = 0  # blocks sent to the kvstore (those it lacked)
        self.num_blocks_skipped = 0  # blocks the kvstore already had
        # records a prefill's blocks in Redis while the handler puts them in the kvstore
        self._recorder = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prefill-ownership")
        if store is not None:
            metrics.touch("kv_transfer_bytes", "kv_transfer_seconds", "kv_transfer_failures", direction="put")

    @property
    def skip(self) -> Container[bytes]:
        """The engine's `export_skip` for a prompt: every block without a kvstore (nothing to
        export); else none (`export` asks the kvstore which it lacks, after the first token)."""
        return EVERY_BLOCK if self.store is None else frozenset()

    def export(self, request_id: str, prompt_hashes: list[bytes], blocks: list[Block] | PinnedExport) -> ExportResult:
        """Puts those of `blocks` (the prompt's blocks the engine exported: read out, or pinned in
        the cache's pages, which are released here once the put is over) that the kvstore lacks,
        as one Contains call finds, under a lease named `request_id`, while recording all
        `prompt_hashes` as held here; returns once both are done, so the next request is routed here."""
        pinned = blocks if isinstance(blocks, PinnedExport) else None
        try:
            recorded = self._recorder.submit(self._record_ownership, prompt_hashes)
            sent: list[Block] = []
            if self.store is not None:
                candidates = pinned.hashes if pinned is not None else [h.block_hash for h, _ in blocks]
                stored = self._stored(candidates)
                # a pinned export's headers are made here, off the loop thread (the checksums read the pages)
                sent = pinned.blocks(stored) if pinned is not None else [b for b in blocks if b[0].block_hash not in stored]
            skipped = len(prompt_hashes) - len(sent)
            self.num_blocks_skipped += skipped
            address, error = self._put(request_id, sent)
            recorded.result()
            return ExportResult(address, len(sent) if address else 0, skipped, error)
        finally:
            if pinned is not None:
                pinned.release()

    def _stored(self, hashes: list[bytes]) -> frozenset[bytes]:
        """Which of `hashes` the kvstore holds (one Contains call); none when it failed or did not
        answer within contains_wait_s (then every block is put, and the put decides)."""
        if not hashes:
            return frozenset()
        future = self.store.contains_future(hashes)
        try:
            flags = future.result(timeout=self.contains_wait_s).present
        except (grpc.FutureTimeoutError, TimeoutError):  # a grpc.Future's, a concurrent.futures one's
            future.cancel()
            return frozenset()
        except grpc.RpcError:  # the kvstore is down or refused: put everything
            return frozenset()
        return frozenset(h for h, p in zip(hashes, flags) if p)

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
