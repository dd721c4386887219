"""The decode side of KV transfer: the fetch-or-recompute plan. Of a prompt's full blocks, the
leading ones this worker's prefix cache holds are used in place; the rest are pulled from the
kvstore the prefill put them in and imported (splitserve.transfer.pages). When the kvstore is down,
a block was evicted, or a block fails its checks, the import stops there and the engine recomputes
the prompt from the first block it lacks: the output is the same, only slower.

The blocks are always named by hashes the decode worker computes from the prompt, never by hashes
a peer sends.

Metrics, per fetch: kv_transfer_bytes/seconds{direction="get"} (payload bytes received, duration
of the get call) and kv_transfer_failures{direction="get"} when a fetch did not deliver every block
it asked for in usable form and the prompt is recomputed.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import grpc

from splitserve.transfer.block import KVBlockError
from splitserve.transfer.pages import Block


class BlockSource(Protocol):
    """The part of a kvstore client the decode side uses (splitserve.kvstore.client.KVStoreClient)."""

    def get(self, hashes: list[bytes], release_lease_id: str = "") -> list[Block]:
        """The leading blocks of `hashes` the store holds, in order; grpc.RpcError or KVBlockError."""


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
    wanted = plan.to_fetch
    if not wanted or source is None:
        return NOTHING_FETCHED
    t0 = time.monotonic()
    try:
        blocks = source.get(wanted, release_lease_id=lease_id)
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
    short = fetched.failed or num_imported < len(fetched.blocks)
    recomputed = short and plan.num_local < len(plan.hashes)
    return TransferOutcome(plan.num_local, num_imported, recomputed, plan.fetching and recomputed)


class BlockFetcher:
    """The decode worker's side of transfers: a client per kvstore address, the get metrics and
    the cumulative counts its LoadResponse reports."""

    def __init__(self, connect: Callable[[str], BlockSource], metrics) -> None:
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

    def fetch(self, plan: FetchPlan, lease_id: str) -> Fetched:
        """`fetch` from the plan's kvstore, with the call recorded when it answered."""
        if not plan.fetching:
            return NOTHING_FETCHED
        fetched = fetch(plan, self.source(plan.kvstore_address), lease_id)
        if not fetched.error:
            self.metrics.kv_transfer("get", fetched.num_bytes, fetched.seconds)
        return fetched

    def settle(self, plan: FetchPlan, fetched: Fetched, num_imported: int) -> TransferOutcome:
        """`settle`, counted."""
        outcome = settle(plan, fetched, num_imported)
        self.num_imported_blocks += num_imported
        self.num_recomputed += int(outcome.recomputed)
        if outcome.fetch_failed:
            self.metrics.kv_transfer_failed("get")
        return outcome
