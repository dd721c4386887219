"""The prefill role: computes a prompt's KV cache and first token, ships the blocks to the kvstore.

Concurrent Prefill calls are batched by the engine loop (chunked prefill, shared prefix cache). The
export (which blocks the kvstore lacks, the put under a lease named after the request, the
ownership record in Redis) is splitserve.transfer.export; this module maps messages to it.

Metrics (role "prefill", splitserve.worker for the scrape-time ones), per Prefill call:
prompt_tokens += its prompt length and generation_tokens += 1 (the first token) when answered,
request_success{finished_reason} of the one-token run, requests_rejected{reason} (invalid,
queue_full, deadline, abort, error) otherwise; request_queue_time_seconds (arrival at this worker
to its first engine step) and request_prefill_time_seconds (first engine step to first token);
the put series of splitserve.transfer.export.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import sys

import grpc

from splitserve import tracing
from splitserve.engine.engine_loop import RequestAborted
from splitserve.engine.llm_engine import StepOutput
from splitserve.transfer.export import BlockExporter
from splitserve.v1 import prefill_pb2, prefill_pb2_grpc
from splitserve.wire import logprob_to_proto, sampling_from_proto
from splitserve.worker import Worker, WorkerRole, WorkerServicer, servicer_adder, wait_deadline

logger = logging.getLogger("splitserve.prefill")
SERVICE = "splitserve.v1.Prefill"


class PrefillServicer(WorkerServicer, prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        cfg = worker.config
        tracing.setup(cfg.tracing, worker.role)  # before the kvstore client: its channel carries the trace
        self.exporter = BlockExporter(worker.kvstore_client(cfg.kvstore) if cfg.kvstore else None, worker.metrics,
                                      worker.sync_ownership, cfg.kv_lease_ttl_s)
        self.metrics = worker.metrics
        worker.counters = lambda: {"num_blocks_put": self.exporter.num_blocks_put}

    def Prefill(self, request, context):
        """The first token as soon as it is sampled, then the put's result (prefill.proto)."""
        with self.worker.drain.call(context), \
                tracing.server_span("prefill.request", context, request.request_id) as span:
            yield from self._prefill(request, context, span)

    def _prefill(self, request, context, span=tracing.NOOP):
        try:
            params = sampling_from_proto(request.sampling)
        except ValueError as exc:
            self.worker.reject_invalid(context, exc)
        request_id = request.request_id or f"prefill-{id(request)}"
        prompt = list(request.prompt_token_ids)
        stream = self.worker.admit(context, request_id, prompt, dataclasses.replace(params, max_tokens=1),
                                   cache_salt=request.cache_salt or None, detokenize=False,
                                   export_blocks=True, export_skip=self.exporter.skip, pin_export=True)
        self.worker.drain.track(stream)
        try:
            out = self._first_token(stream, context)
        finally:
            self.worker.drain.untrack(stream)
        hashes = out.prompt_block_hashes
        tracing.record("prefill.queue", span, out.arrival_time, out.first_scheduled_time)
        tracing.record("prefill.compute", span, out.first_scheduled_time, out.first_token_time)
        self._record(out)
        try:
            yield prefill_pb2.PrefillResponse(
                request_id=request_id,
                first_token_id=out.new_token_ids[0],
                first_logprob=logprob_to_proto(out.new_logprobs[0]) if out.new_logprobs else None,
                num_cached_tokens=out.num_cached_tokens,
                num_computed_tokens=out.num_prompt_tokens - out.num_cached_tokens,
                rng_state=out.rng_state,
                worker_id=self.worker.worker_id,
            )
        finally:  # after the token has left, and also when the caller does not stay for the rest
            with tracing.active("kv.put", span):  # (the export releases a pinned export's pages)
                export = self.exporter.export(request_id, hashes, out.pinned_export or out.exported_blocks)
            released = bool(export.num_put) and (not context.is_active() or params.max_tokens == 1)
            if released:  # the caller is gone, or no decode follows: nobody fetches under the lease
                self.exporter.release(request_id)
        if export.error:
            logger.warning("kvstore put failed: request_id=%s code=%s (decode will recompute)", request_id,
                           export.error)
        logger.info("prefill done: request_id=%s prompt_tokens=%d cached_tokens=%d blocks=%d kvstore=%s",
                    request_id, out.num_prompt_tokens, out.num_cached_tokens, len(hashes),
                    export.kvstore_address or "-")
        try:
            yield prefill_pb2.PrefillResponse(request_id=request_id, block_hashes=hashes,
                                              kvstore_address=export.kvstore_address)
        except GeneratorExit:  # not sent (the caller left meanwhile): nobody learns where the blocks are
            if export.num_put and not released:
                self.exporter.release(request_id)
            raise

    def _first_token(self, stream, context) -> StepOutput:
        """The one-token run's output; the call ends (and the request is freed) when the deadline
        passes, the caller goes away, or the engine step fails (reported, the worker keeps serving)."""
        m = self.metrics
        try:
            return stream.get(timeout=wait_deadline(context))
        except queue.Empty:
            stream.abort()
            m.rejected("deadline" if context.is_active() else "abort")
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "prefill did not finish before the deadline")
        except RequestAborted:  # the caller went away (or the drain expired): its blocks are freed already
            if self.worker.drain.expired:
                m.rejected("drained")
                self.worker.drain.handed_back(context, "prefill")
            m.rejected("abort")
            context.abort(grpc.StatusCode.CANCELLED, "prefill cancelled: the caller went away")
        except Exception as exc:
            stream.abort()
            m.rejected("error")
            context.abort(grpc.StatusCode.INTERNAL, f"prefill failed: {exc}")

    def _record(self, out: StepOutput) -> None:
        """The series of one answered prefill (before the answer leaves, so a scrape after it sees them)."""
        m = self.metrics
        m.add_prompt_tokens(out.num_prompt_tokens)
        m.add_generation_tokens(len(out.new_token_ids))
        m.success(out.finish_reason or "")
        self.worker.observe_engine_times(out)
        if out.first_scheduled_time and out.first_token_time:
            m.observe_prefill(max(0.0, out.first_token_time - out.first_scheduled_time))



ROLE = WorkerRole("prefill", PrefillServicer, servicer_adder(prefill_pb2.DESCRIPTOR.services_by_name["Prefill"]), SERVICE)
serve, main = ROLE.serve, ROLE.main  # (server, worker, servicer) on config.host:config.port; the CLI


if __name__ == "__main__":
    sys.exit(main())
