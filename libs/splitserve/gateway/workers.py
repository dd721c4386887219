"""The gateway's view of its workers: grpc.aio channels and stubs, model discovery, load polling.

A worker that dies is unhealthy from its first failed poll or call; one that comes back on the same
address (`splitserve up` restarts workers on their ports) is healthy again from its first good
poll. The channels reconnect within RECONNECT_MAX_MS of the worker listening again: gRPC's default
reconnect back-off grows to two minutes, which would keep a restarted worker out of routing long
after it is ready.

Workers come from two sources, and the pool routes to their union: the static lists of the
gateway's flags (kept for ever), and the registrations in Redis that gateway/discovery.py follows
(`add` when one appears, `remove` when its lease lapses or it deregisters; a removed worker's
channel is closed once the calls still on it ended, at most CLOSE_GRACE_S later).
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from splitserve.gateway.prepare import ModelInfo
from splitserve.gateway.router import DECODE, PREFILL, Router
from splitserve.config.gateway import RouterConfig
from splitserve.rpc import DEFAULT_MAX_MESSAGE_BYTES, size_options
from splitserve.v1 import decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)
_WAIT_LOG_INTERVAL_S = 5.0  # how often discovery logs the workers it still waits for
RECONNECT_MAX_MS = 1000  # longest gap between two connection attempts to a worker that is down
CLOSE_GRACE_S = 60.0  # a removed worker's channel waits this long for calls still running on it
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                      ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS)]


class WorkerPool:
    """Channels and stubs to every configured worker, and the Router fed by their load reports.

    start() polls GetLoad until at least one prefill and one decode worker answer, adopts the model
    identity of the first answer (`model`), builds `router`, then keeps polling every
    `poll_interval_s` in a background task: a worker that does not answer within `load_timeout_s`,
    or reports another model, is unhealthy until it answers correctly again.
    """

    def __init__(self, prefill: list[str], decode: list[str], router_config: RouterConfig,
                 poll_interval_s: float, load_timeout_s: float,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._addresses: dict[str, list[str]] = {PREFILL: [], DECODE: []}
        self.static = {PREFILL: frozenset(prefill), DECODE: frozenset(decode)}  # from the flags: never removed
        self._router_config = router_config
        self._poll_interval_s = poll_interval_s
        self._load_timeout_s = load_timeout_s
        self._options = size_options(max_message_bytes) + _RECONNECT_OPTIONS
        self._credentials = credentials  # TLS to the workers (mutual with a client cert)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._prefill: dict[str, prefill_pb2_grpc.PrefillStub] = {}
        self._decode: dict[str, decode_pb2_grpc.DecodeStub] = {}
        self._closing: set[asyncio.Task] = set()  # channels of removed workers, closing
        self.model: ModelInfo | None = None
        self.router: Router | None = None
        self._poll_task: asyncio.Task | None = None
        for role, addresses in ((PREFILL, prefill), (DECODE, decode)):
            for address in addresses:
                self.add(role, address)

    def addresses(self, role: str) -> list[str]:
        return list(self._addresses[role])

    def add(self, role: str, address: str) -> bool:
        """Routes to a worker from now (unhealthy until its first good poll); False if known already."""
        if address in self._addresses[role]:
            return False
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=self._options) \
                if self._credentials is None else grpc.aio.secure_channel(address, self._credentials,
                                                                          options=self._options)
        ch = self._channels[address]
        if role == PREFILL:
            self._prefill[address] = prefill_pb2_grpc.PrefillStub(ch)
        else:
            self._decode[address] = decode_pb2_grpc.DecodeStub(ch)
        self._addresses[role].append(address)
        if self.router is not None:
            self.router.add_worker(role, address)
        return True

    def remove(self, role: str, address: str) -> bool:
        """Forgets a worker that left (its routing state goes); False if it was unknown or static."""
        if address not in self._addresses[role] or address in self.static[role]:
            return False
        self._addresses[role].remove(address)
        (self._prefill if role == PREFILL else self._decode).pop(address, None)
        if self.router is not None:
            self.router.remove_worker(role, address)
        if address not in self._prefill and address not in self._decode:
            task = asyncio.get_running_loop().create_task(self._channels.pop(address).close(CLOSE_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return True

    def set_draining(self, role: str, address: str) -> None:
        """The worker said it drains (its registration): no new work until a poll says otherwise."""
        if self.router is not None and self.router.has_worker(role, address):
            w = self.router.worker(role, address)
            if not w.draining:
                log.info("worker draining: role=%s address=%s", role, address)
            w.draining = True

    def prefill_stub(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        return self._prefill[address]

    def decode_stub(self, address: str) -> decode_pb2_grpc.DecodeStub:
        return self._decode[address]

    async def _get_load(self, role: str, address: str):
        """The worker's LoadResponse, or the exception that stood for it."""
        stub = (self._prefill if role == PREFILL else self._decode).get(address)
        if stub is None:  # removed since the poll began
            return RuntimeError("worker removed")
        try:
            return await stub.GetLoad(prefill_pb2.LoadRequest(), timeout=self._load_timeout_s)
        except grpc.aio.AioRpcError as exc:
            return exc

    async def _poll_all(self) -> list[tuple[str, str, object]]:
        targets = [(role, a) for role in (PREFILL, DECODE) for a in self._addresses[role]]
        loads = await asyncio.gather(*(self._get_load(role, a) for role, a in targets))
        return [(role, a, load) for (role, a), load in zip(targets, loads)]

    async def start(self) -> ModelInfo:
        """Waits (no time limit: the caller bounds it) until both roles have a worker answering."""
        last_log = time.monotonic()
        while True:
            results = await self._poll_all()
            answered = {role: [a for r, a, load in results if r == role and not isinstance(load, Exception)]
                        for role in (PREFILL, DECODE)}
            if answered[PREFILL] and answered[DECODE]:
                break
            if time.monotonic() - last_log >= _WAIT_LOG_INTERVAL_S:
                last_log = time.monotonic()
                log.info("waiting for workers: prefill_answered=%s decode_answered=%s pending=%s",
                         answered[PREFILL], answered[DECODE],
                         [a for r, a, load in results if isinstance(load, Exception)])
            await asyncio.sleep(self._poll_interval_s)
        first = next(load for _, _, load in results if not isinstance(load, Exception))
        self.model = ModelInfo.from_load(first)
        self.router = Router(self._router_config, self.model.block_size,
                             self._addresses[PREFILL], self._addresses[DECODE])
        self._observe(results, announce=True)
        log.info("workers answered: prefill=%s decode=%s model_id=%s block_size=%d max_model_len=%d",
                 answered[PREFILL], answered[DECODE], self.model.model_id, self.model.block_size,
                 self.model.max_model_len)
        self._poll_task = asyncio.create_task(self._poll_loop(), name="gateway-load-poller")
        return self.model

    def _observe(self, results, announce: bool = False) -> None:
        for role, address, load in results:
            if not self.router.has_worker(role, address):  # removed while its poll ran
                continue
            was_healthy, was_draining = self.router.worker(role, address).healthy, \
                self.router.worker(role, address).draining
            if isinstance(load, Exception):
                error = f"GetLoad failed: {load.code().name}: {load.details()}" \
                    if isinstance(load, grpc.aio.AioRpcError) else f"GetLoad failed: {load}"
                self.router.observe_failure(role, address, error)
                if was_healthy or announce:
                    log.warning("worker unhealthy: role=%s address=%s reason=%s", role, address, error)
                continue
            mismatch = self.model.mismatch(load)
            if mismatch is not None:
                self.router.observe_failure(role, address, mismatch)
                if was_healthy or announce:
                    log.error("worker rejected: role=%s address=%s reason=%s", role, address, mismatch)
                continue
            if self.router.observe_load(role, address, load).draining and not was_draining:
                log.info("worker draining: role=%s address=%s", role, address)
            if not was_healthy and not announce:
                log.info("worker healthy: role=%s address=%s worker_id=%s", role, address, load.worker_id)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                self._observe(await self._poll_all())
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the polling (workers would never heal)
                log.exception("load poll failed")

    def mark_failed(self, role: str, address: str, error: str) -> None:
        """A call to the worker failed as if it were down: unhealthy until its next good poll."""
        if self.router is not None and self.router.has_worker(role, address) \
                and self.router.worker(role, address).healthy:
            log.warning("worker unhealthy: role=%s address=%s reason=%s", role, address, error)
            self.router.observe_failure(role, address, error)

    async def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
            self._poll_task = None
        for task in self._closing:  # removed workers' channels: no more waiting for their calls
            task.cancel()
        await asyncio.gather(*(ch.close() for ch in self._channels.values()), *self._closing,
                             return_exceptions=True)
