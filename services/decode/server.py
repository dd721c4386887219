"""The decode role: imports the prompt blocks its prefix cache lacks, joins the continuous batch,
and streams token ids. When the import fails (block evicted, checksum mismatch, kvstore down) it
recomputes the prompt locally; the output is the same."""
from __future__ import annotations

import logging
import sys

import grpc

from splitserve.engine.engine_loop import QueueFullError
from splitserve.engine.hashing import block_hashes
from splitserve.engine.kv_block import KVBlockError
from splitserve.kvstore.client import KVStoreClient
from splitserve.v1 import decode_pb2, decode_pb2_grpc
from splitserve.wire import logprob_to_proto, sampling_from_proto
from splitserve.worker import Worker, WorkerConfig, abort_invalid, role_main, serve_role

logger = logging.getLogger("splitserve.decode")
SERVICE = "splitserve.v1.Decode"


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._clients: dict[str, KVStoreClient] = {}
        self.num_imported_blocks = 0  # cumulative, for tests and metrics
        self.num_recomputed = 0
        worker.counters = lambda: {"num_imported_blocks": self.num_imported_blocks, "num_recomputed": self.num_recomputed}

    def _client(self, address: str) -> KVStoreClient:
        if address not in self._clients:
            self._clients[address] = KVStoreClient(address, self.worker.config.max_message_bytes)
        return self._clients[address]

    def Decode(self, request, context):
        engine = self.worker.engine
        try:
            params = sampling_from_proto(request.sampling)
            prompt = list(request.prompt_token_ids)
            outputs = list(request.output_token_ids)
            if not outputs:
                raise ValueError("output_token_ids must hold at least the first token")
        except ValueError as exc:
            abort_invalid(context, exc)
        request_id = request.request_id or f"decode-{id(request)}"
        # The blocks to import are named by hashes computed here, never taken from the peer.
        hashes = block_hashes(prompt, engine.config.cache.block_size, engine.namespace(request.cache_salt or None))
        local = self.worker.loop.call(lambda e: e.num_local_prefix_blocks(hashes)).result()
        fetched, failed = [], False
        if local < len(hashes) and request.kvstore_address:
            try:
                fetched = self._client(request.kvstore_address).get(hashes[local:], release_lease_id=request_id)
            except (grpc.RpcError, KVBlockError) as exc:
                logger.warning("request %s: KV fetch failed (%s): recomputing", request_id, exc)
                failed = True
            failed = failed or len(fetched) < len(hashes) - local
        try:
            stream = self.worker.loop.add_request(
                request_id, prompt, params, cache_salt=request.cache_salt or None, output_token_ids=outputs,
                detokenize=False, rng_state=request.rng_state or None,
                before=lambda e: e.import_blocks(fetched),
            )
        except ValueError as exc:
            abort_invalid(context, exc)
        except QueueFullError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        context.add_callback(stream.abort)
        imported = stream.setup_result or 0
        recomputed = (failed or imported < len(fetched)) and local < len(hashes)
        self.num_imported_blocks += imported
        self.num_recomputed += int(recomputed)
        first = True
        try:
            for out in stream:
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
                yield msg
        finally:
            stream.abort()  # no-op when finished; frees the blocks when the caller went away
            self.worker.sync_ownership(hashes)

    def GetLoad(self, request, context):
        return self.worker.load()


def serve(config: WorkerConfig):
    """(server, worker, servicer) of a decode worker serving on config.host:config.port."""
    return serve_role(config, "decode", DecodeServicer, decode_pb2_grpc.add_DecodeServicer_to_server, SERVICE)


def main(argv: list[str] | None = None) -> int:
    return role_main(argv, "decode", DecodeServicer, decode_pb2_grpc.add_DecodeServicer_to_server, SERVICE)


if __name__ == "__main__":
    sys.exit(main())
