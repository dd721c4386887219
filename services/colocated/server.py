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

from splitserve.services.decode.server import ROLE as DECODE
from splitserve.services.prefill.server import ROLE as PREFILL
from splitserve.worker import Worker, WorkerRole


class ColocatedServicers:
    """The prefill and decode servicers over one worker (one engine, one prefix cache)."""

    def __init__(self, worker: Worker) -> None:
        self.prefill = PREFILL.make_servicer(worker)
        self.decode = DECODE.make_servicer(worker)
        worker.counters = lambda: {"num_blocks_put": self.prefill.exporter.num_blocks_put,
                                   "num_imported_blocks": self.decode.fetcher.num_imported_blocks,
                                   "num_recomputed": self.decode.fetcher.num_recomputed}


def _add_to_server(servicers: ColocatedServicers, server) -> None:
    PREFILL.add_to_server(servicers.prefill, server)
    DECODE.add_to_server(servicers.decode, server)


ROLE = WorkerRole("colocated", ColocatedServicers, _add_to_server, [PREFILL.services, DECODE.services])
serve, main = ROLE.serve, ROLE.main  # (server, worker, servicers) on config.host:config.port; the CLI


if __name__ == "__main__":
    sys.exit(main())
