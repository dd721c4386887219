"""The gateway process: public `splitserve.v1.Gateway/Generate` over grpc.aio, and in the same event
loop the HTTP server (OpenAI-compatible API, /health, /metrics: services/gateway/http.py).

    python -m splitserve.services.gateway.server --prefill H:P[,H:P] --decode H:P[,H:P] [--redis-url URL]

Startup: the server binds at once with health NOT_SERVING; the gateway polls every worker's
GetLoad until a prefill and a decode worker answer, adopts their model identity, loads the
tokenizer, then turns SERVING. Requests before that get UNAVAILABLE. Prompts are never logged.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import logging
import math
import signal
import threading
import time
from contextlib import aclosing

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from splitserve import logs
from splitserve.config.flags import add_config_args, config_from_args
from splitserve.config.env import env_setting
from splitserve.gateway.prepare import InvalidRequest, OutputStream, PreparedRequest, prepare_request
from splitserve.metrics import Metrics
from splitserve.model.tokenizer import load_tokenizer
from splitserve.config.gateway import GatewayConfig, RouterConfig
from splitserve.rpc import format_address
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from splitserve.gateway.http import HttpApi, HttpServer
from splitserve.ownership.reader import AsyncOwnersReader
from splitserve.gateway.failover import GatewayError, RequestPipeline
from splitserve.rpc import (add_aio_health_and_reflection, add_aio_servicer, create_aio_server,
                            mtls_credentials, server_credentials)
from splitserve.gateway.workers import WorkerPool

log = logging.getLogger("splitserve.gateway")
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "splitserve.v1.Gateway"
Code = grpc.StatusCode


# Rejection reasons (requests_rejected{reason}) by the status a request ended with.
_REJECT_REASONS = {Code.INVALID_ARGUMENT: "invalid", Code.NOT_FOUND: "unknown_model", Code.UNAVAILABLE: "unavailable",
                   Code.RESOURCE_EXHAUSTED: "queue_full", Code.DEADLINE_EXCEEDED: "deadline",
                   Code.CANCELLED: "cancelled"}


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    """Generate: validate, tokenize, hash, route, prefill, stream the first token, relay decode.

    The HTTP API (services/gateway/http.py) drives the same steps: `admit`, `prepare`, `run`.
    """

    def __init__(self, config: GatewayConfig, pool: WorkerPool, owners: AsyncOwnersReader,
                 metrics: Metrics | None = None) -> None:
        self._config = config
        self._pool = pool
        self._owners = owners
        self._pipeline = RequestPipeline(pool, config.max_retries)
        self._served_names = [config.served_model_name] if config.served_model_name else []
        self.metrics = metrics if metrics is not None else Metrics("gateway")
        self.metrics.on_collect(self._publish_load)
        self.tokenizer = None  # set when ready
        # HF fast tokenizers may raise "Already borrowed" when two threads encode at once.
        self._tokenize_lock = threading.Lock()
        self.num_inflight = 0  # requests past admission, not yet ended
        self.num_prefilling = 0  # of those, the ones that have no first token yet

    @property
    def ready(self) -> bool:
        return self.tokenizer is not None

    @property
    def pool(self) -> WorkerPool:
        return self._pool

    @property
    def owners(self) -> AsyncOwnersReader:
        """The Redis ownership reader (its `status`: "ok" | "degraded" | "off")."""
        return self._owners

    @property
    def served_model_name(self) -> str:
        """The name clients use (and /v1/models lists): --served-model-name, else the model id."""
        return self._config.served_model_name or self._pool.model.model_id

    def _publish_load(self) -> None:
        self.metrics.set_load(running=self.num_inflight - self.num_prefilling, waiting=self.num_prefilling)

    def rejected(self, code: grpc.StatusCode) -> None:
        self.metrics.rejected(_REJECT_REASONS.get(code, "error"))

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization value ("Bearer KEY") carries the API key (always, with no key)."""
        key = self._config.api_key
        if not key:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    @contextlib.contextmanager
    def admit(self):
        """Holds one in-flight slot; GatewayError UNAVAILABLE before startup, RESOURCE_EXHAUSTED at capacity."""
        if not self.ready:
            raise GatewayError(Code.UNAVAILABLE, "gateway not ready: waiting for a prefill and a decode worker")
        if self.num_inflight >= self._config.max_inflight_requests:
            raise GatewayError(Code.RESOURCE_EXHAUSTED,
                               f"gateway at capacity ({self._config.max_inflight_requests} requests in progress)")
        self.num_inflight += 1
        try:
            yield
        finally:
            self.num_inflight -= 1

    async def Generate(self, request, context):
        arrival = time.monotonic()
        metadata = dict(context.invocation_metadata() or ())
        if not self.authorized(metadata.get("authorization")):
            self.metrics.rejected("unauthenticated")
            await context.abort(Code.UNAUTHENTICATED, "missing or wrong API key: send metadata "
                                                      "'authorization: Bearer <key>'")
        if not request.request_id:  # the id may also come as x-request-id metadata
            rid = metadata.get("x-request-id", "")
            if isinstance(rid, str) and rid:
                request.request_id = rid
        try:
            with self.admit():
                req = await self.prepare(request)
                # aclosing: when the client goes away while we are suspended at a yield, closing this
                # generator closes the inner ones at once, and their finally blocks cancel the workers' calls.
                async with aclosing(self.run(req, arrival, context.time_remaining())) as responses:
                    async for response in responses:
                        yield response
        except GatewayError as exc:
            self.rejected(exc.code)
            await context.abort(exc.code, str(exc))
        except Exception:  # a gateway bug: say so, never leak internals to the client
            self.rejected(Code.INTERNAL)
            log.exception("request failed: request_id=%s internal error", request.request_id or "-")
            await context.abort(Code.INTERNAL, "internal gateway error (see the gateway's log)")

    def _prepare(self, request):
        with self._tokenize_lock:
            return prepare_request(request, self.tokenizer, self._pool.model, self._served_names)

    async def prepare(self, request) -> PreparedRequest:
        """Validates and tokenizes; GatewayError INVALID_ARGUMENT (or NOT_FOUND for the model)."""
        try:
            req = await asyncio.to_thread(self._prepare, request)  # tokenizing a long prompt takes ms
        except InvalidRequest as exc:
            code = Code.NOT_FOUND if exc.field == "model" else Code.INVALID_ARGUMENT
            raise GatewayError(code, str(exc), exc.field) from None
        if self._config.log_prompts:  # off by default: prompts may hold anything
            text = self.tokenizer.decode(req.prompt_token_ids, skip_special_tokens=False)
            log.info("request prompt: request_id=%s prompt=%r prompt_token_ids=%s", req.request_id, text,
                     req.prompt_token_ids)
        return req

    async def run(self, req: PreparedRequest, arrival: float, time_remaining: float | None = None):
        """The response stream of a prepared request (GatewayError on failure). Records the request's
        metrics: TTFT, inter-token gaps, stage times, tokens and the finish reason."""
        deadline = arrival + min(self._config.request_timeout_s, math.inf if time_remaining is None else time_remaining)
        m = self.metrics
        self.num_prefilling += 1
        prefilling, done = True, False
        try:
            owners = await self._owners.owners(req.block_hashes)
            t_prefill = time.monotonic()
            first, decision = await self._pipeline.prefill(req, owners, deadline)
            m.routed("prefill", decision.reason)
            t_prefilled = time.monotonic()
            self.num_prefilling -= 1
            prefilling = False
            out = OutputStream(self.tokenizer, req.prompt_token_ids, req.params, self._pool.model.max_model_len)
            delta = out.add([first.first_token_id], [first.first_logprob] if first.HasField("first_logprob") else [])
            info: dict = {"prefill_worker": decision.worker.address, "prefill_reason": decision.reason}
            times = {"arrival": arrival, "prefill": t_prefill, "prefilled": t_prefilled, "first": time.monotonic()}
            m.observe_queue(t_prefill - arrival)
            m.observe_prefill(t_prefilled - t_prefill)
            m.observe_ttft(times["first"] - arrival)
            if out.finished:
                done = True
                yield self._final(req, delta, out, first, times, info)
                return
            yield gateway_pb2.GenerateResponse(request_id=req.request_id, token_ids=delta.token_ids, text=delta.text,
                                               logprobs=delta.logprobs)
            last = times["first"]
            async with aclosing(self._pipeline.decode(req, first, owners, out, deadline, info)) as deltas:
                async for delta in deltas:
                    if "decode_reason" in info and "routed" not in info:
                        info["routed"] = True
                        m.routed("decode", info["decode_reason"])
                    now = time.monotonic()
                    for _ in delta.token_ids:  # tokens that arrive together share the gap
                        m.observe_itl((now - last) / len(delta.token_ids))
                    if delta.token_ids:
                        last = now
                    if out.finished:
                        done = True
                        yield self._final(req, delta, out, first, times, info)
                        return
                    yield gateway_pb2.GenerateResponse(request_id=req.request_id, token_ids=delta.token_ids,
                                                       text=delta.text, logprobs=delta.logprobs)
        except (GeneratorExit, asyncio.CancelledError):  # the client went away (or closed us early)
            if not done:
                self.rejected(Code.CANCELLED)
            raise
        finally:
            if prefilling:
                self.num_prefilling -= 1

    def _final(self, req, delta, out: OutputStream, first, times: dict, info: dict) -> gateway_pb2.GenerateResponse:
        end = time.monotonic()
        usage = common_pb2.Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(out.token_ids),
                                 cached_tokens=first.num_cached_tokens)
        timings = common_pb2.Timings(
            queue_s=times["prefill"] - times["arrival"], prefill_s=times["prefilled"] - times["prefill"],
            ttft_s=times["first"] - times["arrival"], decode_s=end - times["first"], e2e_s=end - times["arrival"])
        m = self.metrics
        m.observe_decode(timings.decode_s)
        m.observe_e2e(timings.e2e_s)
        m.add_prompt_tokens(usage.prompt_tokens)
        m.add_generation_tokens(usage.completion_tokens)
        m.success(out.finish_reason)
        log.info("request done: request_id=%s prompt_tokens=%d completion_tokens=%d cached_tokens=%d finish=%s "
                 "ttft_s=%.3f e2e_s=%.3f %s", req.request_id, usage.prompt_tokens, usage.completion_tokens,
                 usage.cached_tokens, out.finish_reason, timings.ttft_s, timings.e2e_s,
                 " ".join(f"{k}={v}" for k, v in sorted(info.items()) if k != "routed"))
        return gateway_pb2.GenerateResponse(
            request_id=req.request_id, token_ids=delta.token_ids, text=delta.text, logprobs=delta.logprobs,
            finish_reason=out.finish_reason, stop_reason=out.stop_reason, usage=usage, timings=timings)


class GatewayHandle:
    """A running gateway: `address`, `port`, `service`, `pool`; await stop() to shut it down."""

    def __init__(self, config: GatewayConfig, server: grpc.aio.Server, port: int, service: GatewayService,
                 pool: WorkerPool, owners: AsyncOwnersReader, health, http: HttpServer | None = None) -> None:
        self.config, self.server, self.port, self.service, self.pool = config, server, port, service, pool
        self.address = format_address(config.host, port)
        self.http = http  # the HTTP server (OpenAI API, /health, /metrics), None with http_port -1
        self._owners, self._health = owners, health
        self._startup: asyncio.Task | None = None

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
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gateway serving: address=%s http=%s model_id=%s tokenizer=%s", self.address,
                 self.http.base_url if self.http else "off", model.model_id, path)

    async def wait_ready(self) -> None:
        """Returns once SERVING; raises what startup raised (TimeoutError after startup_timeout_s)."""
        await asyncio.shield(self._startup)

    async def stop(self, grace_s: float = 5.0) -> None:
        """NOT_SERVING, then stops accepting and cancels requests still running after grace_s."""
        await self._health.enter_graceful_shutdown()
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            await asyncio.gather(self._startup, return_exceptions=True)
        stops = [self.server.stop(grace_s)] + ([self.http.stop()] if self.http is not None else [])
        await asyncio.gather(*stops)
        await self.pool.close()
        await self._owners.close()


async def serve(config: GatewayConfig, wait_ready: bool = True) -> GatewayHandle:
    """Starts the gateway on the running event loop; with wait_ready, returns once it is SERVING
    (bounded by config.startup_timeout_s; on failure the server is stopped and the error raised)."""
    credentials = server_credentials(config.tls_cert_file, config.tls_key_file) if config.tls_cert_file else None
    server, port = create_aio_server(config.host, config.port, config.max_message_bytes, credentials)
    pool = WorkerPool(config.prefill_addresses, config.decode_addresses, config.router,
                      config.load_poll_interval_s, config.load_timeout_s, config.max_message_bytes,
                      credentials=mtls_credentials(config.internal_tls_ca_file, config.internal_tls_cert_file,
                                                   config.internal_tls_key_file)[1])
    owners = AsyncOwnersReader(config.redis_url, timeout_s=config.redis_timeout_s)
    service = GatewayService(config, pool, owners)
    add_aio_servicer(service, gateway_pb2.DESCRIPTOR.services_by_name["Gateway"], server)  # bad bytes: INVALID_ARGUMENT
    health = await add_aio_health_and_reflection(server, [SERVICE_NAME])
    http = None
    if config.http_port >= 0:
        try:
            http = HttpServer(HttpApi(service), config.host, config.http_port,
                              tls=(config.tls_cert_file, config.tls_key_file) if config.tls_cert_file else None)
        except OSError:
            await server.stop(0)
            raise
    await server.start()
    if http is not None:
        await http.start()
    handle = GatewayHandle(config, server, port, service, pool, owners, health, http)
    handle._startup = asyncio.create_task(handle._start(), name="gateway-startup")
    log.info("gateway listening: address=%s http=%s prefill=%s decode=%s redis=%s", handle.address,
             http.base_url if http else "off", config.prefill_addresses, config.decode_addresses,
             owners.url or "off")
    if wait_ready:
        try:
            await handle.wait_ready()
        except BaseException:
            await handle.stop(grace_s=0)
            raise
    return handle


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve gateway", description="The splitserve gateway (gRPC and HTTP).")
    add_gateway_args(parser)
    return parser


def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    """The gateway's flags (from GatewayConfig and RouterConfig), for `splitserve gateway` too."""
    add_config_args(parser, GatewayConfig, skip=("router",))
    add_config_args(parser, RouterConfig)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default: INFO)")


def config_from_namespace(args: argparse.Namespace) -> GatewayConfig:
    config = config_from_args(GatewayConfig, args, router=config_from_args(RouterConfig, args))
    if not config.api_key and env_setting("SPLITSERVE_API_KEY"):
        config = dataclasses.replace(config, api_key=env_setting("SPLITSERVE_API_KEY"))
    return config


async def run_until_signalled(config: GatewayConfig) -> int:
    """Serves until SIGTERM or SIGINT; returns the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    handle = await serve(config, wait_ready=False)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, handle._startup], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if handle._startup.done() and not handle._startup.cancelled() and handle._startup.exception():
        log.error("gateway startup failed: %s", handle._startup.exception())
        status = 1
    elif not stop.is_set():
        await stop.wait()
    log.info("gateway stopping")
    waiter.cancel()
    await handle.stop()
    return status


def run_gateway(args: argparse.Namespace) -> int:
    """Runs the gateway from parsed flags (add_gateway_args) until SIGTERM/SIGINT; the exit status.
    For `splitserve gateway`: the CLI parses, this serves."""
    logging.getLogger("splitserve").setLevel(getattr(logging, str(args.log_level).upper(), logging.INFO))
    try:
        config = config_from_namespace(args)
    except ValueError as exc:
        log.error("bad configuration: %s", exc)
        return 2
    try:
        return asyncio.run(run_until_signalled(config))
    except OSError as exc:  # the port is taken
        log.error("%s", exc)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(logging.WARNING)
    return run_gateway(args)


if __name__ == "__main__":
    raise SystemExit(main())
