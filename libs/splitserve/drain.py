"""A worker's graceful drain: stop taking work, let running calls finish, hand back the rest.

On SIGTERM a worker turns its gRPC health NOT_SERVING, reports `draining` in GetLoad and in its
Redis registration (gateways stop routing to it), and refuses new Prefill and Decode calls with
UNAVAILABLE (a call that raced the gateway's view is retried on another worker: no client sees it).
Calls already running get `drain_timeout_s` to finish. Past it, the drain expires: every stream
still running is aborted on the engine loop and its call ends with UNAVAILABLE, which the gateway
treats as a failed worker: a decode stream is resumed on another decode worker from the tokens
already streamed (the same path as a worker killed mid-stream, so the client sees no gap), a
prefill is retried elsewhere. Then the process stops its server and exits 0.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import grpc

from splitserve.engine.engine_loop import RequestStream


class Drain:
    """The worker's calls in progress and whether it drains (thread-safe: gRPC handler threads
    enter and leave calls while the main thread drains)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._cond = threading.Condition()
        self._calls = 0  # Prefill/Decode calls admitted and not ended
        self._streams: set[RequestStream] = set()  # their engine streams, aborted when the drain expires
        self.draining = False  # refuse new calls
        self.expired = False  # drain_timeout_s passed: running streams were aborted

    @property
    def num_calls(self) -> int:
        return self._calls

    @contextmanager
    def call(self, context: grpc.ServicerContext):
        """Holds one call for its whole life; a call arriving while draining ends with UNAVAILABLE."""
        with self._cond:
            refused = self.draining
            if not refused:
                self._calls += 1
        if refused:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} worker draining: it takes no new request")
        try:
            yield
        finally:
            with self._cond:
                self._calls -= 1
                self._cond.notify_all()

    def track(self, stream: RequestStream) -> None:
        """A call's engine stream, aborted if the drain expires while it runs."""
        with self._cond:
            if self.expired:
                stream.abort()
            else:
                self._streams.add(stream)

    def untrack(self, stream: RequestStream) -> None:
        with self._cond:
            self._streams.discard(stream)

    def begin(self) -> None:
        with self._cond:
            self.draining = True

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every call ended within timeout_s."""
        with self._cond:
            return self._cond.wait_for(lambda: self._calls == 0, timeout=timeout_s)

    def expire(self) -> int:
        """Aborts every stream still running (their calls end with UNAVAILABLE); returns how many."""
        with self._cond:
            self.expired = True
            streams, self._streams = list(self._streams), set()
        for stream in streams:
            stream.abort()
        return len(streams)

    def handed_back(self, context: grpc.ServicerContext, what: str) -> None:
        """Ends a call whose stream the expired drain aborted: UNAVAILABLE, so the gateway resumes
        or retries it on another worker."""
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.role} worker drained before the {what} finished: "
                                                   "resume it on another worker")
