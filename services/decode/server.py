"""The decode role: imports the prompt blocks its prefix cache lacks, joins the continuous batch,
and streams token ids. When the import fails (block evicted, checksum mismatch, kvstore down) it
recomputes the prompt locally; the output is the same.

Metrics (role "decode", splitserve.worker for the scrape-time ones), per Decode call:
generation_tokens += the tokens this worker streamed (not the first one, which the prefill worker
made); inter_token_latency_seconds between consecutive tokens of a request as the engine produced
them (a request streaming k tokens gives k - 1 observations); at the end request_success{
finished_reason} ("stop" | "length") with request_decode_time_seconds (its first engine step to its
last token) and request_queue_time_seconds, or requests_rejected{reason} (invalid, queue_full,
abort = the caller cancelled, error); kv_transfer_bytes/seconds{direction="get"} per kvstore fetch
(payload bytes received, duration of the get call) and kv_transfer_failures{direction="get"} when
a fetch did not deliver every block it asked for in usable form and the prompt is recomputed.
"""
from __future__ import annotations

import logging
import sys
import time

import grpc

from splitserve import rpc
from splitserve.engine.engine_loop import QueueFullError
from splitserve.engine.hashing import block_hashes
from splitserve.transfer.block import KVBlockError
from splitserve.kvstore.client import KVStoreClient
from splitserve.v1 import decode_pb2, decode_pb2_grpc
from splitserve.wire import logprob_to_proto, sampling_from_proto
from splitserve.worker import Worker, abort_invalid, role_main, serve_role
from splitserve.config.worker import WorkerConfig

logger = logging.getLogger("splitserve.decode")
SERVICE = "splitserve.v1.Decode"


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._clients: dict[str, KVStoreClient] = {}
        self.num_imported_blocks = 0  # cumulative, for tests and metrics
        self.num_recomputed = 0
        worker.counters = lambda: {"num_imported_blocks": self.num_imported_blocks, "num_recomputed": self.num_recomputed}
        self.metrics = worker.metrics
        self.metrics.touch("kv_transfer_bytes", "kv_transfer_seconds", "kv_transfer_failures", direction="get")

    def _client(self, address: str) -> KVStoreClient:
        if address not in self._clients:
            self._clients[address] = KVStoreClient(address, self.worker.config.max_message_bytes,
                                                   credentials=self.worker.config.channel_credentials())
        return self._clients[address]

    def Decode(self, request, context):
        engine = self.worker.engine
        m = self.metrics
        try:
            params = sampling_from_proto(request.sampling)
            prompt = list(request.prompt_token_ids)
            outputs = list(request.output_token_ids)
            if not outputs:
                raise ValueError("output_token_ids must hold at least the first token")
        except ValueError as exc:
            m.rejected("invalid")
            abort_invalid(context, exc)
        request_id = request.request_id or f"decode-{id(request)}"
        # The blocks to import are named by hashes computed here, never taken from the peer.
        hashes = block_hashes(prompt, engine.config.cache.block_size, engine.namespace(request.cache_salt or None))
        local = self.worker.loop.call(lambda e: e.num_local_prefix_blocks(hashes)).result()
        fetched, failed = [], False
        fetching = local < len(hashes) and bool(request.kvstore_address)
        if fetching:
            t0 = time.monotonic()
            try:
                fetched = self._client(request.kvstore_address).get(hashes[local:], release_lease_id=request_id)
            except (grpc.RpcError, KVBlockError) as exc:
                detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else str(exc)
                logger.warning("KV fetch failed: request_id=%s error=%r (recomputing)", request_id, detail)
                failed = True
            else:
                m.kv_transfer("get", sum(len(payload) for _, payload in fetched), time.monotonic() - t0)
            failed = failed or len(fetched) < len(hashes) - local
        try:
            stream = self.worker.loop.add_request(
                request_id, prompt, params, cache_salt=request.cache_salt or None, output_token_ids=outputs,
                detokenize=False, rng_state=request.rng_state or None,
                before=lambda e: e.import_blocks(fetched),
            )
        except ValueError as exc:
            m.rejected("invalid")
            abort_invalid(context, exc)
        except QueueFullError as exc:
            m.rejected("queue_full")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        context.add_callback(stream.abort)
        imported = stream.setup_result or 0
        recomputed = (failed or imported < len(fetched)) and local < len(hashes)
        self.num_imported_blocks += imported
        self.num_recomputed += int(recomputed)
        if fetching and recomputed:
            m.kv_transfer_failed("get")
        first = True
        last_token_time = None  # of the previous token this worker produced for the request
        ended = False  # finished (success) or failed (error): counted; anything else is an abort
        try:
            produced = 0  # tokens this worker generated for the request
            for out in stream:
                m.add_generation_tokens(len(out.new_token_ids))
                if last_token_time is not None:
                    m.observe_itl(max(0.0, out.token_time - last_token_time))
                last_token_time = out.token_time
                if out.finished:  # recorded before the last message leaves: a scrape after it sees all
                    ended = True
                    logger.info("decode done: request_id=%s finish=%s tokens=%d imported_blocks=%d "
                                "local_hit_blocks=%d recomputed=%s", request_id, out.finish_reason,
                                produced + len(out.new_token_ids), imported, local, recomputed)
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
                if first:
                    msg.num_imported_blocks, msg.num_local_hit_blocks, msg.recomputed = imported, local, recomputed
                    first = False
                produced += len(out.new_token_ids)
                yield msg
        except Exception:  # the engine step failed (GeneratorExit, a cancel, is no Exception)
            if not ended:
                ended = True
                m.rejected("error")
            raise
        finally:
            if not ended:  # the caller cancelled (client gone, stop string matched at the gateway)
                m.rejected("abort")
                logger.info("decode aborted: request_id=%s (the caller went away)", request_id)
            stream.abort()  # no-op when finished; frees the blocks when the caller went away
            self.worker.sync_ownership(hashes)

    def GetLoad(self, request, context):
        return self.worker.load()



def _add_to_server(servicer, server) -> None:
    """Registers the servicer; malformed requests are INVALID_ARGUMENT (splitserve.rpc.add_servicer)."""
    rpc.add_servicer(servicer, decode_pb2.DESCRIPTOR.services_by_name["Decode"], server)

def serve(config: WorkerConfig):
    """(server, worker, servicer) of a decode worker serving on config.host:config.port."""
    return serve_role(config, "decode", DecodeServicer, _add_to_server, SERVICE)


def main(argv: list[str] | None = None) -> int:
    return role_main(argv, "decode", DecodeServicer, _add_to_server, SERVICE)


if __name__ == "__main__":
    sys.exit(main())
