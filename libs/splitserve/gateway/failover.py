"""One request through the workers: route, prefill, relay the decode stream, and fail over.

Downstream calls carry the request's remaining deadline and are cancelled whenever this coroutine
stops early (client cancel, deadline, a stop string, an error), so a worker frees the request's
blocks at once. Failure policy (docs/design.md): a prefill that fails with UNAVAILABLE (or finds
the worker at capacity) is retried on another prefill worker; a decode stream that breaks is
resumed on another decode worker from prompt + the tokens already streamed, so the client sees no
gap and no duplicate. At most `max_retries` retries per role. While no decode worker is healthy a
request is refused (UNAVAILABLE) before its prefill: the client learns at once, and no prefill
work is spent on a request that could not be decoded.
"""
from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Callable

import grpc

from splitserve import tracing
from splitserve.gateway.context import RequestContext
from splitserve.gateway.errors import GatewayError, worker_error
from splitserve.gateway.output import Delta, OutputStream
from splitserve.gateway.router import DECODE, PREFILL, NoWorkerAvailable, RouteDecision, WorkerState
from splitserve.gateway.workers import WorkerPool
from splitserve.v1 import decode_pb2, prefill_pb2

log = logging.getLogger(__name__)
Code = grpc.StatusCode
# Worker errors after which another worker may succeed. CANCELLED here is never ours (we stop
# reading before we cancel): the worker or a proxy on the way dropped the call.
_RETRYABLE = (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.CANCELLED)


def may_retry(code: grpc.StatusCode, num_tried: int, max_retries: int) -> bool:
    """Whether a call that failed with `code` is tried on another worker, `num_tried` workers of
    its role having failed for this request before."""
    return code in _RETRYABLE and num_tried < max_retries


def remaining_s(deadline: float) -> float:
    """Seconds left before `deadline` (time.monotonic); DEADLINE_EXCEEDED when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise GatewayError(Code.DEADLINE_EXCEEDED, "request deadline exceeded")
    return left


def decode_request(ctx: RequestContext, first: prefill_pb2.PrefillResponse, out: OutputStream) -> decode_pb2.DecodeRequest:
    """The DecodeRequest that continues the request from prompt + every token streamed so far."""
    req = ctx.request
    resumed = len(out.token_ids) > 1
    return decode_pb2.DecodeRequest(
        request_id=req.downstream_id, prompt_token_ids=req.prompt_token_ids, output_token_ids=out.token_ids,
        sampling=req.sampling, cache_salt=req.cache_salt, block_hashes=req.block_hashes,
        kvstore_address=first.kvstore_address,
        # The generator state is that after the first token: stale once more were drawn.
        rng_state=b"" if resumed else first.rng_state)


def take_decode_response(resp: decode_pb2.DecodeResponse, out: OutputStream) -> Delta:
    """Feeds one decode message into `out`; a worker's finish our own checks did not reach (its
    context limit) ends `out` too, with the text held back until then."""
    delta = out.add(resp.token_ids, resp.logprobs)
    if resp.finish_reason and not out.finished:
        delta = delta._replace(text=delta.text + out.close(resp.finish_reason, resp.stop_token_id))
    return delta


def _trace_decode(ctx: RequestContext, reason: str, resp: decode_pb2.DecodeResponse) -> None:
    """Records a decode worker's first message: why it was picked, and how it got the prompt's KV."""
    route = ctx.route
    route.decode_reason, route.imported_blocks = reason, resp.num_imported_blocks
    route.local_hit_blocks, route.recomputed = resp.num_local_hit_blocks, resp.recomputed


class PendingBlocks:
    """The rest of a Prefill stream once its first token has gone on: the put's result (block
    hashes, the kvstore's address), read before the decode starts. A worker lost in between is a
    put that failed: the decode recomputes the prompt (no prefill is retried once the client has
    its first token). `close` (idempotent) ends the call and the worker's routing charge."""

    def __init__(self, call, worker: WorkerState, end: Callable[[], None], span) -> None:
        self._call, self._worker, self._end, self._span = call, worker, end, span
        self._open = True

    async def result(self, first: prefill_pb2.PrefillResponse, request_id: str) -> prefill_pb2.PrefillResponse:
        """`first` with the put's result merged in (no kvstore address when the worker failed)."""
        merged = prefill_pb2.PrefillResponse()
        merged.CopyFrom(first)
        try:
            rest = await self._call.read()
            if rest is grpc.aio.EOF:
                raise GatewayError(Code.INTERNAL, "the stream ended before the put's result")
            merged.MergeFrom(rest)
            await self._call.read()  # the stream's end (its status follows the last message at once)
        except (grpc.aio.AioRpcError, GatewayError) as exc:
            why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            self._span.set_error(why)
            log.warning("prefill worker lost after the first token: request_id=%s worker=%s error=%s "
                        "(decode recomputes)", request_id, self._worker.address, why)
        finally:
            self.close()
        return merged

    def close(self) -> None:
        if self._open:
            self._open = False
            self._end()
            self._call.cancel()  # no-op when it completed
            self._span.end()


class RequestPipeline:
    """Prefill then decode for one request at a time (one instance serves all requests)."""

    def __init__(self, pool: WorkerPool, max_retries: int) -> None:
        self._pool = pool
        self._max_retries = max_retries

    def _pick(self, pick: Callable[[], RouteDecision], last: GatewayError | None) -> RouteDecision:
        """pick()'s decision; with no worker left, UNAVAILABLE (or the last worker's error)."""
        try:
            return pick()
        except NoWorkerAvailable as exc:
            if last is None:
                raise GatewayError(Code.UNAVAILABLE, str(exc)) from None
            raise GatewayError(last.code, f"{last}; no other {exc.role} worker to try") from None

    def _failed(self, role: str, worker: WorkerState, exc: grpc.aio.AioRpcError, tried: set[str]) -> GatewayError:
        """The client-facing error for a failed call: raised when no retry is left or none can
        help, else returned after `worker` joins `tried` (and, unless only busy, turns unhealthy)."""
        error = worker_error(role, worker.address, exc)
        if not may_retry(exc.code(), len(tried), self._max_retries):
            raise error from None
        if exc.code() != Code.RESOURCE_EXHAUSTED:  # at capacity is not down
            self._pool.mark_failed(role, worker.address, str(error))
        tried.add(worker.address)
        return error

    def _check_decode_available(self) -> None:
        decode = self._pool.router.workers(DECODE)
        if not any(w.routable for w in decode):
            why = "; ".join(f"{w.address}: {w.last_error or 'draining'}" for w in decode)
            raise GatewayError(Code.UNAVAILABLE, f"no decode worker available: none of {len(decode)} is healthy ({why})")

    async def prefill(self, ctx: RequestContext) -> tuple[prefill_pb2.PrefillResponse, PendingBlocks]:
        """The first message of the cheapest prefill worker that answers (its first token), and the
        rest of its stream; records the worker in ctx.route. A worker that fails before its first
        token is retried on another (the put's result comes later: PendingBlocks)."""
        self._check_decode_available()
        req, router, bs = ctx.request, self._pool.router, self._pool.model.block_size
        tried: set[str] = set()
        last: GatewayError | None = None
        while True:
            decision = self._pick(lambda: router.pick_prefill(req.block_hashes, ctx.owners, len(req.prompt_token_ids),
                                                              exclude=tried), last)
            worker = decision.worker
            tokens = len(req.prompt_token_ids) - decision.hit_blocks * bs  # expected uncached tokens
            span = tracing.start("gateway.prefill", ctx.span, request_id=req.downstream_id, kind="client")
            span.set("splitserve.worker", worker.address)
            call = self._pool.prefill_stub(worker.address).Prefill(
                prefill_pb2.PrefillRequest(request_id=req.downstream_id, prompt_token_ids=req.prompt_token_ids,
                                           sampling=req.sampling, cache_salt=req.cache_salt),
                timeout=remaining_s(ctx.deadline), metadata=span.metadata())
            router.begin(worker, tokens)
            pending = PendingBlocks(call, worker, lambda w=worker, t=tokens: router.end(w, t), span)
            handed = False
            try:
                first = await call.read()
                if first is grpc.aio.EOF:
                    raise GatewayError(Code.INTERNAL, f"prefill worker {worker.address} ended the stream "
                                                      "without a first token")
                ctx.route.prefill_worker, ctx.route.prefill_reason = worker.address, decision.reason
                handed = True
                return first, pending
            except grpc.aio.AioRpcError as exc:
                span.set_error(exc.code().name)
                last = self._failed(PREFILL, worker, exc, tried)
                log.warning("prefill retry: request_id=%s worker=%s error=%s", req.request_id, worker.address, last)
            finally:
                if not handed:  # failed, or we were cancelled: the call, its charge and span end here
                    pending.close()

    async def decode(self, ctx: RequestContext, first: prefill_pb2.PrefillResponse,
                     out: OutputStream) -> AsyncIterator[Delta]:
        """Relays decode streams into `out`, yielding each non-empty delta until `out` finishes;
        records the decode worker and its first message's KV statistics in ctx.route."""
        req, router = ctx.request, self._pool.router
        tried: set[str] = set()
        last: GatewayError | None = None
        while True:
            decision = self._pick(lambda: router.pick_decode(req.block_hashes, ctx.owners,
                                                             len(req.prompt_token_ids) + len(out.token_ids),
                                                             exclude=tried), last)
            worker = decision.worker
            span = tracing.start("gateway.decode", ctx.span, request_id=req.downstream_id, kind="client")
            span.set("splitserve.worker", worker.address)
            call = self._pool.decode_stub(worker.address).Decode(decode_request(ctx, first, out),
                                                                 timeout=remaining_s(ctx.deadline),
                                                                 metadata=span.metadata())
            router.begin(worker)
            ctx.route.decode_worker = worker.address
            worker_done = False  # the worker sent its finish_reason: nothing left to cancel
            try:
                first_message = True
                async for resp in call:
                    if first_message:
                        first_message = False
                        _trace_decode(ctx, decision.reason, resp)
                    worker_done = bool(resp.finish_reason)
                    delta = take_decode_response(resp, out)
                    if delta.token_ids or delta.text or out.finished:
                        yield delta
                    if out.finished:
                        return
                raise GatewayError(Code.INTERNAL, f"decode worker {worker.address} ended the stream "
                                                  "without a finish reason")
            except grpc.aio.AioRpcError as exc:
                span.set_error(exc.code().name)
                last = self._failed(DECODE, worker, exc, tried)
                log.warning("decode resume: request_id=%s worker=%s tokens_streamed=%d error=%s",
                            req.request_id, worker.address, len(out.token_ids), last)
            finally:
                router.end(worker)
                if not worker_done:
                    call.cancel()  # a stop string, our own limit, an error, or the client went away
                span.end()
