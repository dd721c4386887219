"""The decode side of KV transfer: the fetch-or-recompute plan. Of a prompt's full blocks, the
leading ones this worker's prefix cache holds are used in place; the rest are pulled from the
kvstore the prefill put them in and imported (splitserve.transfer.pages). When the kvstore is down,
a block was evicted, or a block fails its checks, the import stops there and the engine recomputes
the prompt from the first block it lacks: the output is the same, only slower.

The blocks are always named by hashes the decode worker computes from the prompt, never by hashes
a peer sends.

Fetched payloads are held only until they are imported, and a worker holds at most its fetch buffer
of them at once (`FetchBuffer`, --kv-fetch-buffer-mb): a prompt with more blocks is fetched and
imported in parts, and concurrent requests wait for room. Without the bound a decode worker's peak
memory grew with the concurrent prompts' KV (32 streams of 32 tokens: 45 MiB; one 1K-token prompt:
47 MiB of float32 KV).

Metrics, per fetch: kv_transfer_bytes/seconds{direction="get"} (payload bytes received, duration
of the get call) and kv_transfer_failures{direction="get"} when a fetch did not deliver every block
it asked for in usable form and the prompt is recomputed.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import grpc

from splitserve.transfer.block import KVBlockError
from splitserve.transfer.pages import Block, PageImport


class BlockSource(Protocol):
    """The part of a kvstore client the decode side uses (splitserve.kvstore.client.KVStoreClient)."""

    def get(self, hashes: list[bytes], release_lease_id: str = "", into=None) -> list[Block]:
        """The leading blocks of `hashes` the store holds, in order, same-host payloads read where
        `into(i, header)` says (PageImport.into); grpc.RpcError or KVBlockError."""

    def release(self, lease_id: str) -> int:
        """Drops a lease; grpc.RpcError when the store cannot be reached."""


class FetchPlan(NamedTuple):
    """Which of a prompt's full blocks come from where."""

    hashes: list[bytes]  # every full prompt block, in order
    num_local: int  # leading blocks this worker's prefix cache holds now
    kvstore_address: str  # the store the prefill put the blocks in; "" when its put failed

    @property
    def to_fetch(self) -> list[bytes]:
        """The blocks to pull from the kvstore (none without one)."""
        return self.hashes[self.num_local:] if self.kvstore_address else []

    @property
    def fetching(self) -> bool:
        return bool(self.to_fetch)


class Fetched(NamedTuple):
    """What a fetch delivered."""

    blocks: list[Block]  # the leading blocks of the plan's to_fetch that arrived, in order
    failed: bool  # not every block asked for arrived (evicted, store down, malformed answer)
    error: str  # why the call failed ("" when it answered, maybe with fewer blocks)
    num_bytes: int  # payload bytes received
    seconds: float  # duration of the get call
    count: int = -1  # blocks that arrived, for a summary whose payloads are gone (-1: len(blocks))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) if self.count < 0 else self.count

    @staticmethod
    def total(parts: list["Fetched"]) -> "Fetched":
        """What the parts of one prompt's fetch delivered together, without their payloads."""
        if not parts:
            return NOTHING_FETCHED
        return Fetched([], any(p.failed for p in parts), next((p.error for p in parts if p.error), ""),
                       sum(p.num_bytes for p in parts), sum(p.seconds for p in parts),
                       sum(p.num_blocks for p in parts))


NOTHING_FETCHED = Fetched([], False, "", 0, 0.0)


class TransferOutcome(NamedTuple):
    """How a decode request's prompt KV came to be, as its first response reports it."""

    num_local: int  # leading blocks found in this worker's prefix cache
    num_imported: int  # blocks imported from the kvstore (leading blocks of those fetched)
    recomputed: bool  # the engine recomputes the prompt from the first block it lacks
    fetch_failed: bool  # a fetch was made and fell short: kv_transfer_failures{direction="get"}


def fetch(plan: FetchPlan, source: BlockSource | None, lease_id: str) -> Fetched:
    """Pulls the plan's to_fetch from `source`, releasing the prefill's lease `lease_id` on them.
    A failed call (store down, malformed answer) is a Fetched with no blocks and the error."""
    return fetch_blocks(plan.to_fetch, source, lease_id)


def fetch_blocks(wanted: list[bytes], source: BlockSource | None, lease_id: str, into=None) -> Fetched:
    """`fetch` of the blocks `wanted` (lease_id "": the prefill's lease is kept, for a later part),
    same-host payloads read where `into` says."""
    if not wanted or source is None:
        return NOTHING_FETCHED
    t0 = time.monotonic()
    try:
        blocks = source.get(wanted, release_lease_id=lease_id, into=into)
    except grpc.RpcError as exc:
        return Fetched([], True, f"{exc.code().name}: {exc.details()}", 0, time.monotonic() - t0)
    except KVBlockError as exc:
        return Fetched([], True, str(exc), 0, time.monotonic() - t0)
    num_bytes = sum(len(payload) for _, payload in blocks)
    return Fetched(blocks, len(blocks) < len(wanted), "", num_bytes, time.monotonic() - t0)


def settle(plan: FetchPlan, fetched: Fetched, num_imported: int) -> TransferOutcome:
    """The outcome once the engine imported `num_imported` leading blocks of `fetched`. The prompt
    is recomputed when blocks it lacks did not arrive or did not import (with nothing to fetch and
    nothing local, e.g. the prefill's put failed, the engine computes the prompt as any new one)."""
    short = fetched.failed or num_imported < fetched.num_blocks
    recomputed = short and plan.num_local < len(plan.hashes)
    return TransferOutcome(plan.num_local, num_imported, recomputed, plan.fetching and recomputed)


def _release(source: BlockSource, lease_id: str) -> None:
    try:
        source.release(lease_id)
    except grpc.RpcError:  # the store is down: the lease goes with its TTL
        pass


def _same_host(source: BlockSource) -> bool:
    """Whether the source's payloads come through the kvstore's shared memory (read in place)."""
    try:
        return getattr(source, "transport", "grpc") == "shm"
    except grpc.RpcError:  # the store is down: its get says so
        return False


class FetchBuffer:
    """The bytes of fetched payloads a worker holds before importing them, at most `limit_bytes`
    across its calls. One part larger than the limit is let in alone, so nothing waits forever."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"the fetch buffer must hold at least one byte, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.held = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, is_active: Callable[[], bool] = lambda: True, poll_s: float = 0.05) -> bool:
        """Waits for room for `nbytes` and takes it; False (nothing taken) once is_active() is false
        while waiting (the caller went away)."""
        with self._cond:
            while self.held and self.held + nbytes > self.limit_bytes:
                if not is_active():
                    return False
                self._cond.wait(poll_s)
            self.held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self._cond.notify_all()


DEFAULT_FETCH_BUFFER_BYTES = 32 << 20


class BlockFetcher:
    """The decode worker's side of transfers: a client per kvstore address, the get metrics, the
    fetch buffer and the cumulative counts its LoadResponse reports."""

    def __init__(self, connect: Callable[[str], BlockSource], metrics,
                 buffer_bytes: int = DEFAULT_FETCH_BUFFER_BYTES) -> None:
        self.buffer = FetchBuffer(buffer_bytes)
        self._connect = connect  # address -> a client of the kvstore there
        self._sources: dict[str, BlockSource] = {}
        self._lock = threading.Lock()
        self.metrics = metrics  # splitserve.metrics.Metrics (kv_transfer, kv_transfer_failed, touch)
        self.num_imported_blocks = 0  # cumulative, for tests and metrics
        self.num_recomputed = 0
        metrics.touch("kv_transfer_bytes", "kv_transfer_seconds", "kv_transfer_failures", direction="get")

    def source(self, address: str) -> BlockSource:
        with self._lock:
            if address not in self._sources:
                self._sources[address] = self._connect(address)
            return self._sources[address]

    def release_unfetched(self, plan: FetchPlan, lease_id: str) -> None:
        """Drops the prefill's lease `lease_id` when the plan fetches nothing although the prefill
        put blocks: this worker held them all already (a conversation's next turn, whose last
        answer this worker decoded, puts the blocks of that answer). No get releases it then, and
        it would pin the blocks in the kvstore until its TTL (and hold a draining kvstore that
        long). A prefill that put nothing made no lease: the kvstore then finds none (one round
        trip, after admission)."""
        if plan.kvstore_address and lease_id and not plan.fetching:
            _release(self.source(plan.kvstore_address), lease_id)

    def fetch_parts(self, plan: FetchPlan, lease_id: str, block_bytes: int,
                    is_active: Callable[[], bool] = lambda: True,
                    begin: Callable[[list[bytes]], PageImport] | None = None
                    ) -> Iterator[tuple[Fetched, bool, PageImport | None]]:
        """The plan's to_fetch in parts, as (part, last, pages). Only the last part's get releases the
        prefill's lease. The parts end early, `last` set, at a part that fell short; with none at all
        when the caller went away while waiting for room. Every get that answered is recorded
        (kv_transfer_bytes/seconds{direction="get"}).
        With `begin` (the engine's PageImport of a part's hashes, made on its thread), each part's
        blocks get their pages first and a same-host kvstore's payloads are read straight into them
        (pages: place the part, then finish it); a part without pages for all its blocks is the last,
        failed: the engine recomputes the rest. Payloads read in place take no memory: from such a
        kvstore the whole fetch is one part, outside the fetch buffer.
        Otherwise (and from a kvstore on another host) the parts hold at most the fetch buffer of
        payloads (one block at least): each part is fetched once the buffer has room for it, and its
        room is given back when the next part is asked for or the iteration is closed. Import (or
        place and finish) a part before asking for the next, admit the request with the last one,
        then close."""
        wanted = plan.to_fetch
        if not wanted:
            return
        source = self.source(plan.kvstore_address)
        in_place = begin is not None and _same_host(source)
        per_part = len(wanted) if in_place else max(1, self.buffer.limit_bytes // max(1, block_bytes))
        for start in range(0, len(wanted), per_part):
            hashes = wanted[start:start + per_part]
            last = start + per_part >= len(wanted)
            nbytes = 0 if in_place else len(hashes) * block_bytes
            if nbytes and not self.buffer.acquire(nbytes, is_active):
                return
            try:
                pages = begin(hashes) if begin is not None else None
                asked = pages.hashes if pages is not None else hashes
                short = len(asked) < len(hashes)  # no free page for the rest
                part = fetch_blocks(asked, source, lease_id if last or short else "",
                                    pages.into if pages is not None else None)
                if short:
                    part = part._replace(failed=True)
                    if not asked:  # no get to drop the prefill's lease with: dropped here
                        _release(source, lease_id)
                if not part.error:
                    self.metrics.kv_transfer("get", part.num_bytes, part.seconds)
                failed = part.failed
                yield part, last or failed, pages
            finally:
                if nbytes:
                    self.buffer.release(nbytes)
            del part, pages  # not held while the next part is fetched
            if failed:
                return

    def settle(self, plan: FetchPlan, fetched: Fetched, num_imported: int) -> TransferOutcome:
        """`settle`, counted."""
        outcome = settle(plan, fetched, num_imported)
        self.num_imported_blocks += num_imported
        self.num_recomputed += int(outcome.recomputed)
        if outcome.fetch_failed:
            self.metrics.kv_transfer_failed("get")
        return outcome
