"""One Generate request through the workers: route, prefill, relay the decode stream.

Downstream calls carry the request's remaining deadline and are cancelled whenever this coroutine
stops early (client cancel, deadline, a stop string, an error), so a worker frees the request's
blocks at once. Failure policy (DESIGN.md): a prefill that fails with UNAVAILABLE (or finds the
worker at capacity) is retried on another prefill worker; a decode stream that breaks is resumed
on another decode worker from prompt + the tokens already streamed, so the client sees no gap and
no duplicate. At most `max_retries` retries per role. While no decode worker is healthy a request
is refused (UNAVAILABLE) before its prefill: the client learns at once, and no prefill work is
spent on a request that could not be decoded.
"""
from __future__ import annotations

import logging
import time
from typing import AsyncIterator

import grpc

from splitserve.gateway.prepare import Delta, OutputStream, PreparedRequest
from splitserve.gateway.router import DECODE, PREFILL, NoWorkerAvailable
from splitserve.v1 import decode_pb2, prefill_pb2

from splitserve.gateway.workers import WorkerPool

log = logging.getLogger(__name__)
Code = grpc.StatusCode
# Worker errors after which another worker may succeed. CANCELLED here is never ours (we stop
# reading before we cancel): the worker or a proxy on the way dropped the call.
_RETRYABLE = (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.CANCELLED)


class GatewayError(Exception):
    """Ends a request with a gRPC status (the message names the worker or the field; `field` is the
    request field at fault, when one is)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


def worker_error(role: str, address: str, exc: grpc.aio.AioRpcError) -> GatewayError:
    """The client-facing status for a worker's error."""
    code, details = exc.code(), exc.details() or ""
    if code == Code.INVALID_ARGUMENT:
        return GatewayError(code, f"{role} worker {address} rejected the request: {details}")
    if code == Code.DEADLINE_EXCEEDED:
        return GatewayError(code, f"deadline exceeded waiting for {role} worker {address}")
    if code == Code.RESOURCE_EXHAUSTED:
        return GatewayError(code, f"{role} worker {address} is at capacity: {details}")
    if code in (Code.UNAVAILABLE, Code.CANCELLED):
        return GatewayError(Code.UNAVAILABLE, f"{role} worker {address} unavailable: {code.name}: {details}")
    return GatewayError(Code.INTERNAL, f"{role} worker {address} failed: {code.name}: {details}")


def remaining_s(deadline: float) -> float:
    """Seconds left before `deadline` (time.monotonic); DEADLINE_EXCEEDED when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise GatewayError(Code.DEADLINE_EXCEEDED, "request deadline exceeded")
    return left


class RequestPipeline:
    """Prefill then decode for one request at a time (one instance serves all requests)."""

    def __init__(self, pool: WorkerPool, max_retries: int) -> None:
        self._pool = pool
        self._max_retries = max_retries

    def _no_worker(self, exc: NoWorkerAvailable, last: GatewayError | None) -> GatewayError:
        if last is None:
            return GatewayError(Code.UNAVAILABLE, str(exc))
        return GatewayError(last.code, f"{last}; no other {exc.role} worker to try")

    async def prefill(self, req: PreparedRequest, owners: list[set[str]], deadline: float):
        """(PrefillResponse, RouteDecision) from the cheapest prefill worker that answers."""
        router, bs = self._pool.router, self._pool.model.block_size
        decode = router.workers(DECODE)
        if not any(w.healthy for w in decode):
            raise GatewayError(Code.UNAVAILABLE, f"no decode worker available: none of {len(decode)} is healthy "
                                                 f"({'; '.join(f'{w.address}: {w.last_error}' for w in decode)})")
        tried: set[str] = set()
        last: GatewayError | None = None
        while True:
            try:
                decision = router.pick_prefill(req.block_hashes, owners, len(req.prompt_token_ids), exclude=tried)
            except NoWorkerAvailable as exc:
                raise self._no_worker(exc, last) from None
            worker = decision.worker
            tokens = len(req.prompt_token_ids) - decision.hit_blocks * bs  # expected uncached tokens
            call = self._pool.prefill_stub(worker.address).Prefill(
                prefill_pb2.PrefillRequest(request_id=req.downstream_id, prompt_token_ids=req.prompt_token_ids,
                                           sampling=req.sampling, cache_salt=req.cache_salt),
                timeout=remaining_s(deadline))
            router.begin(worker, tokens)
            try:
                return await call, decision
            except grpc.aio.AioRpcError as exc:
                last = worker_error(PREFILL, worker.address, exc)
                if exc.code() not in _RETRYABLE or len(tried) >= self._max_retries:
                    raise last from None
                if exc.code() != Code.RESOURCE_EXHAUSTED:
                    self._pool.mark_failed(PREFILL, worker.address, str(last))
                log.warning("prefill retry: request_id=%s worker=%s error=%s", req.request_id, worker.address, last)
                tried.add(worker.address)
            finally:
                router.end(worker, tokens)
                call.cancel()  # no-op when it completed; cancels it when we were cancelled

    async def decode(self, req: PreparedRequest, first: prefill_pb2.PrefillResponse, owners: list[set[str]],
                     out: OutputStream, deadline: float, info: dict) -> AsyncIterator[Delta]:
        """Relays decode streams into `out`, yielding each non-empty delta until `out` finishes.
        `info` receives the decode worker's address and its first-message KV statistics."""
        router = self._pool.router
        tried: set[str] = set()
        last: GatewayError | None = None
        while True:
            try:
                decision = router.pick_decode(req.block_hashes, owners,
                                              len(req.prompt_token_ids) + len(out.token_ids), exclude=tried)
            except NoWorkerAvailable as exc:
                raise self._no_worker(exc, last) from None
            worker = decision.worker
            resumed = len(out.token_ids) > 1
            call = self._pool.decode_stub(worker.address).Decode(
                decode_pb2.DecodeRequest(
                    request_id=req.downstream_id, prompt_token_ids=req.prompt_token_ids,
                    output_token_ids=out.token_ids, sampling=req.sampling, cache_salt=req.cache_salt,
                    block_hashes=req.block_hashes, kvstore_address=first.kvstore_address,
                    # The generator state is that after the first token: stale once more were drawn.
                    rng_state=b"" if resumed else first.rng_state),
                timeout=remaining_s(deadline))
            router.begin(worker)
            info["decode_worker"] = worker.address
            worker_done = False  # the worker sent its finish_reason: nothing left to cancel
            try:
                first_message = True
                async for resp in call:
                    if first_message:
                        info.update(imported_blocks=resp.num_imported_blocks, recomputed=resp.recomputed,
                                    local_hit_blocks=resp.num_local_hit_blocks, decode_reason=decision.reason)
                        first_message = False
                    delta = out.add(resp.token_ids, resp.logprobs)
                    if resp.finish_reason:
                        worker_done = True
                        if not out.finished:
                            delta = delta._replace(text=delta.text + out.close(resp.finish_reason,
                                                                               resp.stop_token_id))
                    if delta.token_ids or delta.text or out.finished:
                        yield delta
                    if out.finished:
                        return
                raise GatewayError(Code.INTERNAL, f"decode worker {worker.address} ended the stream "
                                                  "without a finish reason")
            except grpc.aio.AioRpcError as exc:
                last = worker_error(DECODE, worker.address, exc)
                if exc.code() not in _RETRYABLE or len(tried) >= self._max_retries:
                    raise last from None
                if exc.code() != Code.RESOURCE_EXHAUSTED:
                    self._pool.mark_failed(DECODE, worker.address, str(last))
                log.warning("decode resume: request_id=%s worker=%s tokens_streamed=%d error=%s",
                            req.request_id, worker.address, len(out.token_ids), last)
                tried.add(worker.address)
            finally:
                router.end(worker)
                if not worker_done:
                    call.cancel()  # a stop string, our own limit, an error, or the client went away
