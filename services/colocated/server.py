"""The colocated role: one engine answers both Prefill and Decode, in one process.

    splitserve colocated --port 50065 [worker flags]

What the disaggregated design is measured against (`splitserve up --colocated`, `splitserve bench
--compare`): the same gateway, routing and APIs, but prefill and decode share one engine, so a
request's decode finds its prompt's blocks in the prefix cache the prefill just filled (no kvstore,
no transfer), and prefill chunks and decodes share each engine step (continuous batching with
chunked prefill, as vLLM runs by default). Metrics carry role "colocated".
"""
from __future__ import annotations

import sys

from splitserve.services.decode.server import SERVICE as DECODE_SERVICE
from splitserve.services.decode.server import DecodeServicer
from splitserve.services.decode.server import _add_to_server as add_decode
from splitserve.services.prefill.server import SERVICE as PREFILL_SERVICE
from splitserve.services.prefill.server import PrefillServicer
from splitserve.services.prefill.server import _add_to_server as add_prefill
from splitserve.worker import Worker, role_main, serve_role
from splitserve.config.worker import WorkerConfig

ROLE = "colocated"
SERVICES = [PREFILL_SERVICE, DECODE_SERVICE]


class ColocatedServicers:
    """The prefill and decode servicers over one worker (one engine, one prefix cache)."""

    def __init__(self, worker: Worker) -> None:
        self.prefill = PrefillServicer(worker)
        self.decode = DecodeServicer(worker)
        worker.counters = lambda: {"num_blocks_put": self.prefill.exporter.num_blocks_put,
                                   "num_imported_blocks": self.decode.fetcher.num_imported_blocks,
                                   "num_recomputed": self.decode.fetcher.num_recomputed}


def _add_to_server(servicers: ColocatedServicers, server) -> None:
    add_prefill(servicers.prefill, server)
    add_decode(servicers.decode, server)


def serve(config: WorkerConfig):
    """(server, worker, servicers) of a colocated worker serving on config.host:config.port."""
    return serve_role(config, ROLE, ColocatedServicers, _add_to_server, SERVICES)


def main(argv: list[str] | None = None) -> int:
    return role_main(argv, ROLE, ColocatedServicers, _add_to_server, SERVICES)


if __name__ == "__main__":
    sys.exit(main())
