"""The decode role: imports the prompt blocks its prefix cache lacks, joins the continuous batch,
and streams token ids. When the import fails (block evicted, checksum mismatch, kvstore down) it
recomputes the prompt locally; the output is the same. The fetch-or-recompute plan is
splitserve.transfer.fetch; this module maps messages to it and to the engine loop, in named steps:
parse the request, plan and fetch, admit (importing right before admission), stream.

Metrics (role "decode", splitserve.worker for the scrape-time ones), per Decode call:
generation_tokens += the tokens this worker streamed (not the first one, which the prefill worker
made); inter_token_latency_seconds between consecutive tokens of a request as the engine produced
them (a request streaming k tokens gives k - 1 observations); at the end request_success{
finished_reason} ("stop" | "length") with request_decode_time_seconds (its first engine step to its
last token) and request_queue_time_seconds, or requests_rejected{reason} (invalid, queue_full,
abort = the caller cancelled, error); the get series of splitserve.transfer.fetch; at each scrape,
kv_fetch_buffer_bytes (fetched payloads held before their import).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
from dataclasses import dataclass

from splitserve import tracing
from splitserve.engine.llm_engine import StepOutput
from splitserve.sampling_params import SamplingParams
from splitserve.transfer.fetch import BlockFetcher, Fetched, FetchPlan, TransferOutcome
from splitserve.v1 import decode_pb2, decode_pb2_grpc
from splitserve.wire import logprob_to_proto, sampling_from_proto
from splitserve.worker import Worker, WorkerRole, WorkerServicer, servicer_adder

logger = logging.getLogger("splitserve.decode")
SERVICE = "splitserve.v1.Decode"


@dataclass(frozen=True)
class DecodeCall:
    """A Decode request, checked."""

    request_id: str
    prompt: list[int]
    outputs: list[int]  # the tokens generated so far elsewhere (at least the prefill's first one)
    params: SamplingParams
    cache_salt: str | None


@dataclass
class StreamState:
    """Where one call's stream stands."""

    outcome: TransferOutcome
    num_sent: int = 0  # responses sent; the first carries the transfer outcome
    produced: int = 0  # tokens this worker generated for the request
    last_token_time: float | None = None  # of the previous token this worker produced
    ended: bool = False  # finished (success) or failed (error): counted; anything else is an abort


class DecodeServicer(WorkerServicer, decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: Worker) -> None:
        super().__init__(worker)
        tracing.setup(worker.config.tracing, worker.role)  # before any kvstore client: its channel carries the trace
        self.fetcher = BlockFetcher(worker.kvstore_client, worker.metrics,
                                    buffer_bytes=int(worker.config.kv_fetch_buffer_mb * (1 << 20)))
        self.metrics = worker.metrics
        self.metrics.on_collect(lambda: self.metrics.set_fetch_buffer(self.fetcher.buffer.held))
        worker.counters = lambda: {"num_imported_blocks": self.fetcher.num_imported_blocks,
                                   "num_recomputed": self.fetcher.num_recomputed}

    def Decode(self, request, context):
        with self.worker.drain.call(context), \
                tracing.server_span("decode.request", context, request.request_id) as span:
            yield from self._decode(request, context, span)

    def _decode(self, request, context, span=tracing.NOOP):
        call = self._parse(request, context)
        hashes = self.worker.prompt_hashes(call.prompt, call.cache_salt)
        plan = FetchPlan(hashes, self.worker.num_local_prefix_blocks(hashes), request.kvstore_address)
        stream, fetched, num_imported = self._fetch_and_admit(context, call, request, plan, span)
        self.fetcher.release_unfetched(plan, call.request_id)  # after admission: off the first token's path
        if fetched.error:
            logger.warning("KV fetch failed: request_id=%s error=%r (recomputing)", call.request_id, fetched.error)
        state = StreamState(self.fetcher.settle(plan, fetched, num_imported))
        self.worker.drain.track(stream)
        try:
            for out in stream:
                if out.finished:
                    tracing.record("decode.queue", span, out.arrival_time, out.first_scheduled_time)
                    tracing.record("decode.generate", span, out.first_scheduled_time, out.token_time)
                yield self._respond(call, state, out)
            if not state.ended and self.worker.drain.expired:  # handed back: the gateway resumes it
                state.ended = True
                self.metrics.rejected("drained")
                logger.info("decode handed back: request_id=%s tokens=%d (drain timed out)", call.request_id,
                            state.produced)
                self.worker.drain.handed_back(context, "stream")
        except Exception:  # the engine step failed (GeneratorExit, a cancel, is no Exception)
            if not state.ended:
                state.ended = True
                self.metrics.rejected("error")
            raise
        finally:
            if not state.ended:  # the caller cancelled (client gone, stop string matched at the gateway)
                self.metrics.rejected("abort")
                logger.info("decode aborted: request_id=%s (the caller went away)", call.request_id)
            self.worker.drain.untrack(stream)
            stream.abort()  # no-op when finished; frees the blocks when the caller went away
            self.worker.sync_ownership(plan.hashes)

    def _fetch_and_admit(self, context, call: DecodeCall, request, plan: FetchPlan, span):
        """Fetches the blocks the plan names into pages the engine gives them (from a same-host
        kvstore, read straight into the pages; otherwise part by part within the fetch buffer, each
        part written into its pages on this thread), keeps them in the prefix cache right before
        admission (until then no part's pages can be evicted by the next's) and admits the request.
        Returns (the stream, what the fetch delivered, without payloads, the blocks imported). A
        part that did not import whole ends the fetch: the engine recomputes from the first block
        it lacks."""
        parts, imports = [], []
        admit = functools.partial(self.worker.admit, context, call.request_id, call.prompt, call.params,
                                  cache_salt=call.cache_salt, output_token_ids=call.outputs, detokenize=False,
                                  rng_state=request.rng_state or None)
        block_bytes = self.worker.engine.kv_cache.bytes_per_block
        begin = lambda hashes: self.worker.loop.call(lambda e: e.begin_import(hashes)).result()  # noqa: E731
        try:
            with tracing.active("kv.fetch", span), \
                    contextlib.closing(self.fetcher.fetch_parts(plan, call.request_id, block_bytes,
                                                                context.is_active, begin)) as fetching:
                for part, last, pages in fetching:
                    imports.append(pages)
                    good = pages.place(part.blocks)  # checks, and writes what arrived as bytes
                    parts.append(part._replace(blocks=[], count=part.num_blocks))  # no payloads kept
                    if last or good < part.num_blocks:
                        break
                    del part, pages  # its payloads go before the next part is fetched
            if plan.fetching and not parts:  # the caller went away while waiting for room: admit() ends it
                return admit(), Fetched([], True, "the call ended before its blocks were fetched", 0, 0.0), 0
            stream = admit(before=lambda e: sum(pages.finish() for pages in imports))
        except BaseException:  # refused or failed before admission: the pages go back (no-op once kept)
            for pages in imports:
                pages.abandon()
            raise
        return stream, Fetched.total(parts), stream.setup_result or 0

    def _parse(self, request, context) -> DecodeCall:
        try:
            params = sampling_from_proto(request.sampling)
            outputs = list(request.output_token_ids)
            if not outputs:
                raise ValueError("output_token_ids must hold at least the first token")
        except ValueError as exc:
            self.worker.reject_invalid(context, exc)
        return DecodeCall(request.request_id or f"decode-{id(request)}", list(request.prompt_token_ids), outputs,
                          params, request.cache_salt or None)

    def _respond(self, call: DecodeCall, state: StreamState, out: StepOutput) -> decode_pb2.DecodeResponse:
        """One response, with the series of its tokens recorded (and of the request, at its end:
        before the last message leaves, so a scrape after it sees all)."""
        m = self.metrics
        m.add_generation_tokens(len(out.new_token_ids))
        if state.last_token_time is not None:
            m.observe_itl(max(0.0, out.token_time - state.last_token_time))
        state.last_token_time = out.token_time
        state.produced += len(out.new_token_ids)
        if out.finished:
            state.ended = True
            o = state.outcome
            logger.info("decode done: request_id=%s finish=%s tokens=%d imported_blocks=%d local_hit_blocks=%d "
                        "recomputed=%s", call.request_id, out.finish_reason, state.produced, o.num_imported,
                        o.num_local, o.recomputed)
            m.success(out.finish_reason or "")
            self.worker.observe_engine_times(out)
            if out.first_scheduled_time:
                m.observe_decode(max(0.0, out.token_time - out.first_scheduled_time))
        msg = decode_pb2.DecodeResponse(
            token_ids=out.new_token_ids,
            logprobs=[logprob_to_proto(lp) for lp in out.new_logprobs],
            finish_reason=out.finish_reason or "" if out.finished else "",
        )
        if isinstance(out.stop_reason, int):
            msg.stop_token_id = out.stop_reason
        if state.num_sent == 0:
            o = state.outcome
            msg.num_imported_blocks, msg.num_local_hit_blocks, msg.recomputed = o.num_imported, o.num_local, o.recomputed
        state.num_sent += 1
        return msg



ROLE = WorkerRole("decode", DecodeServicer, servicer_adder(decode_pb2.DESCRIPTOR.services_by_name["Decode"]), SERVICE)
serve, main = ROLE.serve, ROLE.main  # (server, worker, servicer) on config.host:config.port; the CLI


if __name__ == "__main__":
    sys.exit(main())
