"""The gateway's request path, without the RPC glue: admission, authorization, preparation, one
request's run through prefill and decode, its final response, and the metrics on the way.

Both front ends drive it: the gRPC Generate call (services/gateway/server.py, through `generate`)
and the HTTP API (gateway/http.py, through `admit`, `prepare` and `run`). Prompts are never
logged unless `log_prompts` is set.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import threading
import time
from contextlib import aclosing
from typing import AsyncIterator

import grpc

from splitserve import tracing
from splitserve.config.gateway import GatewayConfig
from splitserve.gateway.context import RequestContext, StageTimes
from splitserve.gateway.errors import GatewayError, reject_reason
from splitserve.gateway.failover import PendingBlocks, RequestPipeline
from splitserve.gateway.output import Delta, OutputStream
from splitserve.gateway.prepare import InvalidRequest, PreparedRequest, prepare_request
from splitserve.gateway.workers import WorkerPool
from splitserve.metrics import Metrics
from splitserve.ownership.reader import AsyncOwnersReader
from splitserve.v1 import common_pb2, gateway_pb2, prefill_pb2

INLINE_IDS = 8192  # a token-id prompt up to this long is checked on the event loop (~1 ms at most)
log = logging.getLogger("splitserve.gateway")
Code = grpc.StatusCode
INTERNAL_MESSAGE = "internal gateway error (see the gateway's log)"  # never leak internals to the client


class GatewayService:
    """Generate: validate, tokenize, hash, route, prefill, stream the first token, relay decode.

    Not thread-safe: every method runs on the gateway's event loop (tokenization alone runs in a
    thread, under a lock). `tokenizer` is None until startup has found the workers (`ready`).
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
        self.created = int(time.time())  # Unix seconds this gateway started: the `created` of /v1/models
        # HF fast tokenizers may raise "Already borrowed" when two threads encode at once.
        self._tokenize_lock = threading.Lock()
        self.num_inflight = 0  # requests past admission, not yet ended
        self.num_prefilling = 0  # of those, the ones that have no first token yet
        self.draining = False  # SIGTERM came: new requests are refused, open ones finish (app.drain)

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

    @property
    def model_names(self) -> list[str]:
        """Every name a request's `model` may give, the served name first; [] before ready."""
        if not self.ready:
            return []
        model_id = self._pool.model.model_id
        return [self.served_model_name] + ([model_id] if model_id != self.served_model_name else [])

    def _publish_load(self) -> None:
        self.metrics.set_load(running=self.num_inflight - self.num_prefilling, waiting=self.num_prefilling)
        if self._owners.url:  # no series without Redis: "off" is not "down"
            self.metrics.set_redis_up(self._owners.available)

    @property
    def serving(self) -> bool:
        """Ready and at least one healthy prefill and one healthy decode worker that is not draining
        (the rule of /health and of the gRPC health service). Redis is not part of it: without it
        requests route by load."""
        router = self._pool.router
        if not self.ready or router is None or self.draining:
            return False
        return all(any(w.routable for w in router.workers(role)) for role in ("prefill", "decode"))

    def rejected(self, code: grpc.StatusCode) -> None:
        """Counts a request that ended with `code` in requests_rejected."""
        self.metrics.rejected(reject_reason(code))

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization value ("Bearer KEY") carries the API key (always, with no key)."""
        key = self._config.api_key
        if not key:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def check_open(self) -> None:
        """GatewayError UNAVAILABLE while draining or before startup found the workers."""
        if self.draining:
            raise GatewayError(Code.UNAVAILABLE, "gateway draining (shutting down): it takes no new request; "
                                                 "retry on another gateway")
        if not self.ready:
            raise GatewayError(Code.UNAVAILABLE, "gateway not ready: waiting for a prefill and a decode worker")

    @contextlib.contextmanager
    def admit(self):
        """Holds one in-flight slot; GatewayError UNAVAILABLE before startup and while draining,
        RESOURCE_EXHAUSTED at capacity."""
        self.check_open()
        if self.num_inflight >= self._config.max_inflight_requests:
            raise GatewayError(Code.RESOURCE_EXHAUSTED,
                               f"gateway at capacity ({self._config.max_inflight_requests} requests in progress)")
        self.num_inflight += 1
        try:
            yield
        finally:
            self.num_inflight -= 1

    async def generate(self, request: gateway_pb2.GenerateRequest, authorization: str | None,
                       time_remaining: float | None) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """One gRPC Generate call from authorization to the last response. Every refusal or failure
        is counted in requests_rejected and raised as a GatewayError (INTERNAL for a gateway bug,
        with a message that leaks nothing)."""
        arrival = time.monotonic()
        try:
            if not self.authorized(authorization):
                raise GatewayError(Code.UNAUTHENTICATED, "missing or wrong API key: send metadata "
                                                         "'authorization: Bearer <key>'")
            with self.admit():
                req = await self.prepare(request)
                # aclosing: when the client goes away while we are suspended at a yield, closing this
                # generator closes the inner ones at once, and their finally blocks cancel the workers' calls.
                async with aclosing(self.run(req, arrival, time_remaining)) as responses:
                    async for response in responses:
                        yield response
        except GatewayError as exc:
            self.rejected(exc.code)
            raise
        except Exception:
            self.rejected(Code.INTERNAL)
            log.exception("request failed: request_id=%s internal error", request.request_id or "-")
            raise GatewayError(Code.INTERNAL, INTERNAL_MESSAGE) from None

    def _prepare(self, request) -> PreparedRequest:
        with self._tokenize_lock:
            return prepare_request(request, self.tokenizer, self._pool.model, self._served_names)

    async def prepare(self, request: gateway_pb2.GenerateRequest) -> PreparedRequest:
        """Validates and tokenizes; GatewayError INVALID_ARGUMENT (or NOT_FOUND for the model)."""
        try:
            if request.WhichOneof("input") == "prompt_token_ids" and len(request.prompt_token_ids.ids) <= INLINE_IDS:
                # no tokenizer, a short check: here, without a thread's hops
                req = prepare_request(request, self.tokenizer, self._pool.model, self._served_names)
            else:
                req = await asyncio.to_thread(self._prepare, request)  # tokenizing a long prompt takes ms
        except InvalidRequest as exc:
            code = Code.NOT_FOUND if exc.field == "model" else Code.INVALID_ARGUMENT
            raise GatewayError(code, str(exc), exc.field) from None
        if self._config.log_prompts:  # off by default: prompts may hold anything
            text = self.tokenizer.decode(req.prompt_token_ids, skip_special_tokens=False)
            log.info("request prompt: request_id=%s prompt=%r prompt_token_ids=%s", req.request_id, text,
                     req.prompt_token_ids)
        return req

    async def run(self, req: PreparedRequest, arrival: float,
                  time_remaining: float | None = None) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """The response stream of a prepared request (GatewayError on failure), which ends with the
        response carrying finish_reason, usage and timings. `arrival`: time.monotonic() when the
        request arrived; `time_remaining`: the client's own deadline, in seconds, if it set one."""
        timeout_s = min(self._config.request_timeout_s, math.inf if time_remaining is None else time_remaining)
        span = tracing.start("gateway.request", tracing.incoming(), request_id=req.request_id, at=arrival,
                             kind="server")
        ctx = RequestContext(req, deadline=arrival + timeout_s, times=StageTimes(arrival), span=span)
        done = False  # the final response was handed out: a close after it is no cancellation
        pending = None
        try:
            first, pending, out, delta = await self._prefill(ctx)
            if out.finished:
                done = True
                yield self._final(ctx, first, out, delta)
                await pending.result(first, req.request_id)  # the put ends (the client has its answer)
                return
            yield _response(req, delta)  # the first token, while the prefill worker still puts the blocks
            first = await pending.result(first, req.request_id)
            async with aclosing(self._decode(ctx, first, out)) as responses:
                async for response in responses:
                    done = bool(response.finish_reason)
                    yield response
        except (GeneratorExit, asyncio.CancelledError):  # the client went away (or closed us early)
            if not done:
                self.rejected(Code.CANCELLED)
            raise
        finally:
            if pending is not None:
                pending.close()  # the worker finishes its put without us
            if not done:
                span.set_error("failed or cancelled before the final response")
            span.end()

    async def _prefill(self, ctx: RequestContext) -> tuple[prefill_pb2.PrefillResponse, PendingBlocks, OutputStream,
                                                          Delta]:
        """Reads the prompt blocks' owners, prefills, and starts the output with the first token;
        records queue time, prefill time and TTFT."""
        self.num_prefilling += 1
        try:
            if self._pool.router.owners_matter():
                ctx.owners = await self._owners.owners(ctx.request.block_hashes)
            else:  # one worker a role: unknown owners, as when Redis is down, pick the same workers
                ctx.owners = [set() for _ in ctx.request.block_hashes]
            ctx.times.prefill = time.monotonic()
            first, pending = await self._pipeline.prefill(ctx)
            ctx.times.prefilled = time.monotonic()
        finally:
            self.num_prefilling -= 1
        self.metrics.routed("prefill", ctx.route.prefill_reason)
        req = ctx.request
        out = OutputStream(self.tokenizer, req.prompt_token_ids, req.params, self._pool.model.max_model_len)
        delta = out.add([first.first_token_id], [first.first_logprob] if first.HasField("first_logprob") else [])
        times = ctx.times
        times.first = time.monotonic()
        self.metrics.observe_queue(times.prefill - times.arrival)
        tracing.record("gateway.queue", ctx.span, times.arrival, times.prefill)
        self.metrics.observe_prefill(times.prefilled - times.prefill)
        self.metrics.observe_ttft(times.first - times.arrival)
        return first, pending, out, delta

    async def _decode(self, ctx: RequestContext, first: prefill_pb2.PrefillResponse,
                      out: OutputStream) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Responses after the first token, the last one final; records the inter-token gaps."""
        last, routed = ctx.times.first, False
        async with aclosing(self._pipeline.decode(ctx, first, out)) as deltas:
            async for delta in deltas:
                if not routed and ctx.route.decode_reason is not None:
                    routed = True  # counted once per request, resumes included
                    self.metrics.routed("decode", ctx.route.decode_reason)
                now = time.monotonic()
                for _ in delta.token_ids:  # tokens that arrive together share the gap
                    self.metrics.observe_itl((now - last) / len(delta.token_ids))
                if delta.token_ids:
                    last = now
                if out.finished:
                    yield self._final(ctx, first, out, delta)
                    return
                yield _response(ctx.request, delta)

    def _final(self, ctx: RequestContext, first: prefill_pb2.PrefillResponse, out: OutputStream,
               delta: Delta) -> gateway_pb2.GenerateResponse:
        """The last response (usage, timings, finish and stop reasons); records the request's metrics."""
        req = ctx.request
        usage = common_pb2.Usage(prompt_tokens=len(req.prompt_token_ids), completion_tokens=len(out.token_ids),
                                 cached_tokens=first.num_cached_tokens)
        timings = ctx.times.timings(time.monotonic())
        m = self.metrics
        m.observe_decode(timings.decode_s)
        m.observe_e2e(timings.e2e_s)
        m.add_prompt_tokens(usage.prompt_tokens)
        m.add_generation_tokens(usage.completion_tokens)
        m.success(out.finish_reason)
        log.info("request done: request_id=%s prompt_tokens=%d completion_tokens=%d cached_tokens=%d finish=%s "
                 "ttft_s=%.3f e2e_s=%.3f %s", req.request_id, usage.prompt_tokens, usage.completion_tokens,
                 usage.cached_tokens, out.finish_reason, timings.ttft_s, timings.e2e_s, ctx.route.log_fields())
        return gateway_pb2.GenerateResponse(
            request_id=req.request_id, token_ids=delta.token_ids, text=delta.text, logprobs=delta.logprobs,
            finish_reason=out.finish_reason, stop_reason=out.stop_reason, usage=usage, timings=timings)


def _response(req: PreparedRequest, delta: Delta) -> gateway_pb2.GenerateResponse:
    """A response that is not the last: new tokens, text and logprobs."""
    return gateway_pb2.GenerateResponse(request_id=req.request_id, token_ids=delta.token_ids, text=delta.text,
                                        logprobs=delta.logprobs)
