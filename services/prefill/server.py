"""The prefill role: computes a prompt's KV cache and first token, ships the blocks to the kvstore.

Concurrent Prefill calls are batched by the engine loop (chunked prefill, shared prefix cache).
When the prompt is queued, one Contains call asks the kvstore which of its full blocks it already
holds (it runs during the prefill: `StoredBlocks`); after the first token, the others are read out
before the sequence is freed and put under a lease named after the request, while the worker
records that its own prefix cache holds all of them (Redis). On a prefix-cache hit nearly every
block is already stored, so the hit costs the suffix's compute and little more.

Metrics (role "prefill", splitserve.worker for the scrape-time ones), per Prefill call:
prompt_tokens += its prompt length and generation_tokens += 1 (the first token) when answered,
request_success{finished_reason} of the one-token run, requests_rejected{reason} (invalid,
queue_full, deadline, abort, error) otherwise; request_queue_time_seconds (arrival at this worker
to its first engine step) and request_prefill_time_seconds (first engine step to first token);
kv_transfer_bytes/seconds{direction="put"} (payload bytes of the blocks put, duration of the put
call) and kv_transfer_failures{direction="put"} when the kvstore could not take them.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from splitserve import rpc
from splitserve.engine.engine_loop import QueueFullError
from splitserve.engine.hashing import block_hashes, hash_namespace
from splitserve.kvstore.client import KVStoreClient
from splitserve.v1 import prefill_pb2, prefill_pb2_grpc
from splitserve.wire import logprob_to_proto, sampling_from_proto
from splitserve.worker import Worker, abort_invalid, role_main, serve_role, wait_deadline
from splitserve.config.worker import WorkerConfig

logger = logging.getLogger("splitserve.prefill")
SERVICE = "splitserve.v1.Prefill"


class StoredBlocks:
    """The engine's `export_skip` for one prompt: the hashes of its full blocks the kvstore already
    holds, from a Contains call started when the prompt is queued and read when the prefill ends
    (so the call overlaps the prefill instead of preceding it). The answer is normally there long
    before; the loop thread waits at most `wait_s` more for it. Without it (a slow kvstore, or the
    call failed) nothing is skipped: every block is exported and the put decides. Read only by the
    engine's loop thread."""

    def __init__(self, hashes: list[bytes], future, wait_s: float = 0.1) -> None:
        self._hashes, self._future, self._wait_s = hashes, future, wait_s
        self._present: frozenset[bytes] | None = None

    def _resolve(self) -> frozenset[bytes]:
        if self._present is None:
            try:
                flags = self._future.result(timeout=self._wait_s).present
            except grpc.FutureTimeoutError:
                self._future.cancel()
                flags = ()
            except grpc.RpcError:  # the kvstore is down or refused: export everything
                flags = ()
            self._present = frozenset(h for h, p in zip(self._hashes, flags) if p)
        return self._present

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._resolve()


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        cfg = worker.config
        self.kvstore = KVStoreClient(cfg.kvstore, cfg.max_message_bytes,
                                     credentials=cfg.channel_credentials()) if cfg.kvstore else None
        self.num_blocks_put = 0  # blocks sent to the kvstore (those it lacked)
        self.num_blocks_skipped = 0  # blocks the kvstore already had
        self.metrics = worker.metrics
        # records a prefill's blocks in Redis while its handler puts them in the kvstore
        self._recorder = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prefill-ownership")
        if self.kvstore is not None:
            self.metrics.touch("kv_transfer_bytes", "kv_transfer_seconds", "kv_transfer_failures", direction="put")
        worker.counters = lambda: {"num_blocks_put": self.num_blocks_put}

    def Prefill(self, request, context):
        m = self.metrics
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as exc:
            m.rejected("invalid")
            abort_invalid(context, exc)
        first_only = dataclasses.replace(params, max_tokens=1)
        request_id = request.request_id or f"prefill-{id(request)}"
        prompt = list(request.prompt_token_ids)
        try:
            stream = self.worker.loop.add_request(
                request_id, prompt, first_only, cache_salt=request.cache_salt or None,
                detokenize=False, export_blocks=True, export_skip=self._stored(prompt, request.cache_salt),
            )
        except ValueError as exc:
            m.rejected("invalid")
            abort_invalid(context, exc)
        except QueueFullError as exc:
            m.rejected("queue_full")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        context.add_callback(stream.abort)  # the gateway gave up: free the blocks at once
        try:
            out = stream.get(timeout=wait_deadline(context))
        except queue.Empty:
            stream.abort()
            m.rejected("deadline" if context.is_active() else "abort")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "prefill did not finish before the deadline")
        except Exception as exc:  # the engine step failed: reported, the worker keeps serving
            stream.abort()
            m.rejected("error")
            context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {exc}")
        hashes = out.prompt_block_hashes
        self.num_blocks_skipped += len(hashes) - len(out.exported_blocks)
        recorded = self._recorder.submit(self.worker.sync_ownership, hashes)
        kv_address = self._ship(request_id, out.exported_blocks, context)
        recorded.result()  # recorded before the answer: the next request is routed here
        self._record(out)
        logger.info("prefill done: request_id=%s prompt_tokens=%d cached_tokens=%d blocks=%d kvstore=%s",
                    request_id, out.num_prompt_tokens, out.num_cached_tokens, len(hashes), kv_address or "-")
        return prefill_pb2.PrefillResponse(
            request_id=request_id,
            first_token_id=out.new_token_ids[0],
            first_logprob=logprob_to_proto(out.new_logprobs[0]) if out.new_logprobs else None,
            block_hashes=hashes,
            num_cached_tokens=out.num_cached_tokens,
            num_computed_tokens=out.num_prompt_tokens - out.num_cached_tokens,
            kvstore_address=kv_address,
            rng_state=out.rng_state,
            worker_id=self.worker.worker_id,
        )

    def _record(self, out) -> None:
        """The series of one answered prefill (before the answer leaves, so a scrape after it sees them)."""
        m = self.metrics
        m.add_prompt_tokens(out.num_prompt_tokens)
        m.add_generation_tokens(len(out.new_token_ids))
        m.success(out.finish_reason or "")
        self.worker.observe_engine_times(out)
        if out.first_scheduled_time and out.first_token_time:
            m.observe_prefill(max(0.0, out.first_token_time - out.first_scheduled_time))

    def _stored(self, prompt: list[int], cache_salt: str):
        """The engine's `export_skip`: the prompt's full blocks that need no export. All of them
        without a kvstore (colocated: they stay in this cache); else a `StoredBlocks` whose Contains
        call runs during the prefill (on a prefix-cache hit it finds nearly all of them stored, and
        reading them out would cost more than computing the suffix)."""
        engine = self.worker.engine
        hashes = block_hashes(prompt, engine.config.cache.block_size,
                              hash_namespace(engine.model_id, cache_salt or None))
        if self.kvstore is None or not hashes:
            return frozenset(hashes)
        return StoredBlocks(hashes, self.kvstore.contains_future(hashes))

    def _ship(self, request_id: str, blocks, context) -> str:
        """Puts the exported blocks (those the kvstore lacked when the prompt was queued); returns its
        address, or "" when the transfer failed (the decode worker then recomputes the prompt)."""
        if self.kvstore is None:
            return ""
        try:
            if blocks:
                t0 = time.monotonic()
                self.kvstore.put(blocks, lease_id=request_id, lease_ttl_s=self.worker.config.kv_lease_ttl_s)
                self.metrics.kv_transfer("put", sum(len(payload) for _, payload in blocks), time.monotonic() - t0)
            self.num_blocks_put += len(blocks)
            return self.kvstore.address
        except grpc.RpcError as exc:
            self.metrics.kv_transfer_failed("put")
            logger.warning("kvstore put failed: request_id=%s code=%s (decode will recompute)", request_id,
                           exc.code().name)
            return ""

    def GetLoad(self, request, context):
        return self.worker.load()



def _add_to_server(servicer, server) -> None:
    """Registers the servicer; malformed requests are INVALID_ARGUMENT (splitserve.rpc.add_servicer)."""
    rpc.add_servicer(servicer, prefill_pb2.DESCRIPTOR.services_by_name["Prefill"], server)

def serve(config: WorkerConfig):
    """(server, worker, servicer) of a prefill worker serving on config.host:config.port."""
    return serve_role(config, "prefill", PrefillServicer, _add_to_server, SERVICE)


def main(argv: list[str] | None = None) -> int:
    return role_main(argv, "prefill", PrefillServicer, _add_to_server, SERVICE)


if __name__ == "__main__":
    sys.exit(main())
