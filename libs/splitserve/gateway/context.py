"""One request's trace through the gateway: when each stage began and which workers served it.

A `RequestContext` is made when a prepared request starts running and travels with it through
prefill, decode and any failover; the final response's timings and the "request done" log line
are read from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from splitserve import tracing
from splitserve.gateway.prepare import PreparedRequest
from splitserve.v1 import common_pb2


@dataclass
class StageTimes:
    """time.monotonic() seconds at each stage's start; 0.0 until the stage is reached."""

    arrival: float  # the request arrived (before admission and tokenization)
    prefill: float = 0.0  # owners read, the prefill call about to be sent
    prefilled: float = 0.0  # a prefill worker answered with the first token
    first: float = 0.0  # the first token is ready for the client

    def timings(self, end: float) -> common_pb2.Timings:
        """The response's per-stage durations, in seconds, for a request that ended at `end`."""
        return common_pb2.Timings(
            queue_s=self.prefill - self.arrival, prefill_s=self.prefilled - self.prefill,
            ttft_s=self.first - self.arrival, decode_s=end - self.first, e2e_s=end - self.arrival)


@dataclass
class RouteTrace:
    """Which workers served the request and why (the router's reasons); after a decode resume, the
    decode fields describe the last worker. None: that stage was not reached."""

    prefill_worker: str | None = None
    prefill_reason: str | None = None
    decode_worker: str | None = None
    decode_reason: str | None = None  # set with the decode worker's first message, as are the three below
    imported_blocks: int | None = None  # prompt blocks the decode worker fetched from the kvstore
    local_hit_blocks: int | None = None  # prompt blocks it already held
    recomputed: bool | None = None  # it recomputed the prompt instead of importing the blocks

    def log_fields(self) -> str:
        """"name=value" for each field set, sorted by name (the "request done" log line)."""
        items = sorted((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return " ".join(f"{name}={value}" for name, value in items if value is not None)


@dataclass
class RequestContext:
    """A running request: what it asks, until when, and its trace so far."""

    request: PreparedRequest
    deadline: float  # time.monotonic() after which the request fails with DEADLINE_EXCEEDED
    times: StageTimes
    route: RouteTrace = field(default_factory=RouteTrace)
    owners: list[set[str]] = field(default_factory=list)  # Redis owner ids per prompt block (empty sets: unknown)
    span: tracing.Span | tracing.NoopSpan = tracing.NOOP  # the request's gateway span (splitserve.tracing)
