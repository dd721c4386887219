"""The gateway process's start-up and shutdown: the gRPC server, the HTTP server, the worker pool
and the Redis reader around one GatewayService, in one event loop.

Startup: the servers bind at once with health NOT_SERVING and the Redis probe starts; the pool
polls every worker's GetLoad until a prefill and a decode worker answer, the gateway adopts their
model identity, loads the tokenizer, then turns SERVING. Requests before that get UNAVAILABLE (gRPC)
or 503 (HTTP). From then on the gRPC health service follows `GatewayService.serving` (a healthy
prefill and decode worker, as the load polls found them), re-read every load poll interval.

Shutdown: SIGTERM drains (`GatewayHandle.drain`): NOT_SERVING, /health 503 "draining", new requests
refused with UNAVAILABLE (HTTP 503), the open ones given up to drain_timeout_s; then stop(), exit 0.

The gRPC servicer itself (protobuf in, GatewayService calls out) is the shell's
(services/gateway/server.py): `serve` takes a factory for it.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2

from splitserve import heap, tracing
from splitserve.config.gateway import GatewayConfig
from splitserve.gateway.discovery import Discovery
from splitserve.gateway.http import HttpApi, HttpServer
from splitserve.gateway.service import GatewayService
from splitserve.gateway.workers import WorkerPool
from splitserve.model.tokenizer import load_tokenizer
from splitserve.ownership.reader import AsyncOwnersReader
from splitserve.rpc import (add_aio_health_and_reflection, add_aio_servicer, create_aio_server, format_address,
                            mtls_credentials, server_credentials)
from splitserve.v1 import gateway_pb2

log = logging.getLogger("splitserve.gateway")
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
SERVICE_NAME = GATEWAY_SERVICE.full_name  # "splitserve.v1.Gateway"
ServicerFactory = Callable[[GatewayService], object]  # GatewayService -> the Gateway gRPC servicer


class GatewayHandle:
    """A running gateway: `address` (host:port with the bound port), `service`, `pool`, `http`;
    await stop() to shut it down."""

    def __init__(self, config: GatewayConfig, server: grpc.aio.Server, port: int, service: GatewayService,
                 health, http: HttpServer | None = None) -> None:
        self.config, self.server, self.service = config, server, service
        self.pool = service.pool
        self.address = format_address(config.host, port)
        self.http = http  # the HTTP server (OpenAI API, /health, /metrics), None with http_port -1
        self._health = health
        self.startup: asyncio.Task | None = None  # _start(), run by serve(); done once SERVING or failed
        self._health_task: asyncio.Task | None = None  # _follow_health(), from the end of startup
        self.discovery: Discovery | None = None  # follows worker registrations in Redis (discovery_interval_s)

    async def _start(self) -> None:
        """Discovers the workers and the model, loads the tokenizer, turns SERVING."""
        try:
            model = await asyncio.wait_for(self.pool.start(), self.config.startup_timeout_s or None)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no prefill and decode worker answered within {self.config.startup_timeout_s:g} s "
                               f"(prefill={self.config.prefill} decode={self.config.decode})") from None
        path = Path(self.config.tokenizer or model.model_path).expanduser()
        self.service.metrics.set_model_name(model.model_id)
        self.service.tokenizer = await asyncio.to_thread(load_tokenizer, path)
        await self._set_health(True)
        self._health_task = asyncio.create_task(self._follow_health(), name="gateway-health")
        log.info("gateway serving: address=%s http=%s model_id=%s tokenizer=%s", self.address,
                 self.http.base_url if self.http else "off", model.model_id, path)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _follow_health(self) -> None:
        """The gRPC health status tracks the workers' health (what /health reports), not only startup."""
        serving = True
        while True:
            await asyncio.sleep(self.config.load_poll_interval_s)
            now = self.service.serving
            if now != serving:
                serving = now
                (log.info if now else log.warning)("gateway health: %s", "SERVING" if now else
                                                   "NOT_SERVING (no healthy prefill or decode worker)")
                await self._set_health(now)

    async def wait_ready(self) -> None:
        """Returns once SERVING; raises what startup raised (TimeoutError after startup_timeout_s)."""
        await asyncio.shield(self.startup)

    async def drain(self) -> bool:
        """SIGTERM's drain: NOT_SERVING (/health 503 "draining"), new requests refused with
        UNAVAILABLE (HTTP 503), the open ones (gRPC and SSE streams, plain HTTP requests) given up to
        drain_timeout_s to finish. Whether they all did; stop() follows either way."""
        self.service.draining = True
        if self._health_task is not None:  # it would turn SERVING again on the next load poll
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self._set_health(False)
        deadline = asyncio.get_running_loop().time() + self.config.drain_timeout_s
        log.info("gateway draining: %d request(s) open, drain_timeout_s=%g", self.service.num_inflight,
                 self.config.drain_timeout_s)
        while self.service.num_inflight > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.service.num_inflight:
            log.warning("gateway drain expired: %d request(s) still open are cancelled", self.service.num_inflight)
            return False
        log.info("gateway drained: every open request finished")
        return True

    async def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING, then stops accepting and cancels requests still running after grace_s."""
        for task in (self._health_task, self.startup):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._health.enter_graceful_shutdown()
        stops = [self.server.stop(grace_s)] + ([self.http.stop(grace_s)] if self.http is not None else [])
        await asyncio.gather(*stops)
        if self.discovery is not None:
            await self.discovery.close()
        await self.pool.close()
        await self.service.owners.close()


def _service(config: GatewayConfig) -> GatewayService:
    """The service with its worker pool (mutual TLS to the workers when configured) and Redis reader."""
    channel_credentials = mtls_credentials(config.internal_tls_ca_file, config.internal_tls_cert_file,
                                           config.internal_tls_key_file)[1]
    pool = WorkerPool(config.prefill_addresses, config.decode_addresses, config.router,
                      config.load_poll_interval_s, config.load_timeout_s, config.max_message_bytes,
                      credentials=channel_credentials)
    return GatewayService(config, pool, AsyncOwnersReader(config.redis_url, timeout_s=config.redis_timeout_s))


async def serve(config: GatewayConfig, servicer: ServicerFactory, wait_ready: bool = True) -> GatewayHandle:
    """Starts the gateway on the running event loop; with wait_ready, returns once it is SERVING
    (bounded by config.startup_timeout_s; on failure the server is stopped and the error raised)."""
    tracing.setup(config.tracing, "gateway")
    tls = (config.tls_cert_file, config.tls_key_file) if config.tls_cert_file else None
    server, port = create_aio_server(config.host, config.port, config.max_message_bytes,
                                     server_credentials(*tls) if tls else None)
    service = _service(config)
    service.owners.start()  # /health and splitserve_redis_up are truthful from now, before any request
    add_aio_servicer(servicer(service), GATEWAY_SERVICE, server)  # bad bytes: INVALID_ARGUMENT
    health = await add_aio_health_and_reflection(server, [SERVICE_NAME])
    http = None
    if config.http_port >= 0:
        try:
            http = HttpServer(HttpApi(service), config.host, config.http_port, tls=tls)
        except OSError:
            await server.stop(0)
            raise
    await server.start()
    if http is not None:
        await http.start()
    handle = GatewayHandle(config, server, port, service, health, http)
    if config.discovers:  # before startup waits for workers: registered ones count
        handle.discovery = Discovery(config.redis_url, service.pool, config.discovery_interval_s,
                                     timeout_s=config.redis_timeout_s)
        handle.discovery.start()
    handle.startup = asyncio.create_task(handle._start(), name="gateway-startup")
    log.info("gateway listening: address=%s http=%s prefill=%s decode=%s redis=%s", handle.address,
             http.base_url if http else "off", config.prefill_addresses, config.decode_addresses,
             service.owners.url or "off")
    if wait_ready:
        try:
            await handle.wait_ready()
        except BaseException:
            await handle.stop(grace_s=0)
            raise
    return handle


async def run_until_signalled(config: GatewayConfig, servicer: ServicerFactory) -> int:
    """Serves until SIGTERM or SIGINT; returns the exit status (1 when startup failed)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    handle = await serve(config, servicer, wait_ready=False)
    heap.freeze_objects()  # what startup built stays: no full collection walks it again
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, handle.startup], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if handle.startup.done() and not handle.startup.cancelled() and handle.startup.exception():
        log.error("gateway startup failed: %s", handle.startup.exception())
        status = 1
    elif not stop.is_set():
        await stop.wait()
    log.info("gateway stopping")
    waiter.cancel()
    drained = status == 0 and await handle.drain()
    await handle.stop(grace_s=1.0 if drained else 0.0)  # drained: what is left are responses' last bytes
    return status
