"""The gateway's view of its workers: grpc.aio channels and stubs, model discovery, load polling.

A worker that dies is unhealthy from its first failed poll or call; one that comes back on the same
address (`splitserve up` restarts workers on their ports) is healthy again from its first good
poll. The channels reconnect within RECONNECT_MAX_MS of the worker listening again: gRPC's default
reconnect back-off grows to two minutes, which would keep a restarted worker out of routing long
after it is ready.
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
        self._addresses = {PREFILL: list(prefill), DECODE: list(decode)}
        self._router_config = router_config
        self._poll_interval_s = poll_interval_s
        self._load_timeout_s = load_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        options = size_options(max_message_bytes) + _RECONNECT_OPTIONS
        for address in {*prefill, *decode}:  # credentials: TLS to the workers (mutual with a client cert)
            self._channels[address] = grpc.aio.insecure_channel(address, options=options) if credentials is None \
                else grpc.aio.secure_channel(address, credentials, options=options)
        self._prefill = {a: prefill_pb2_grpc.PrefillStub(self._channels[a]) for a in prefill}
        self._decode = {a: decode_pb2_grpc.DecodeStub(self._channels[a]) for a in decode}
        self.model: ModelInfo | None = None
        self.router: Router | None = None
        self._poll_task: asyncio.Task | None = None

    def prefill_stub(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        return self._prefill[address]

    def decode_stub(self, address: str) -> decode_pb2_grpc.DecodeStub:
        return self._decode[address]

    async def _get_load(self, role: str, address: str):
        """The worker's LoadResponse, or the exception that stood for it."""
        stub = self._prefill[address] if role == PREFILL else self._decode[address]
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
            was_healthy = self.router.worker(role, address).healthy
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
            self.router.observe_load(role, address, load)
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
        if self.router is not None and self.router.worker(role, address).healthy:
            log.warning("worker unhealthy: role=%s address=%s reason=%s", role, address, error)
            self.router.observe_failure(role, address, error)

    async def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
            self._poll_task = None
        await asyncio.gather(*(ch.close() for ch in self._channels.values()), return_exceptions=True)
