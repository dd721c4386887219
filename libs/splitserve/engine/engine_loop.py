"""Runs an `LLMEngine` in its own thread for servers: requests from many threads, one batch.

Only the loop thread touches the engine. Other threads hand it work through `call` (a function run
between two steps, its result returned through a Future) and `add_request` (a `RequestStream` that
yields the request's `StepOutput`s). Each request is bounded by `max_pending` so a server refuses
work at once instead of growing its queue without limit.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, NamedTuple

from splitserve import heap
from splitserve.engine.llm_engine import LLMEngine, StepOutput

logger = logging.getLogger(__name__)

# A step that computed this many prompt tokens hands its freed memory back at once (heap.trim), not
# only when the engine goes idle. Its activations (a 512-token chunk: ~14 MiB) leave holes that
# the decode steps after it would touch page by page; trimmed, the default model's colocated worker
# peaked 5-7 MiB lower over a burst of 32 prompts (893/894/893 against 900/900/898 MiB, three stacks
# each). The trim takes ~1.5 ms, against ~360 ms for such a step.
TRIM_AFTER_PROMPT_TOKENS = 256


class QueueState(NamedTuple):
    """The scheduler's queues as of the last step, published by the loop thread for other threads
    (reading the live queues from another thread races with the loop mutating them)."""

    num_running: int = 0
    num_waiting: int = 0
    queued_tokens: int = 0  # tokens accepted and not yet computed


class QueueFullError(RuntimeError):
    """The engine already holds `max_pending` requests (servers map it to RESOURCE_EXHAUSTED)."""


class RequestAborted(RuntimeError):
    """The request was aborted (its caller went away) while a thread waited for its next output."""


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished output, or quietly
    when the request is aborted (a thread blocked in get() is woken: RequestAborted)."""

    def __init__(self, request_id: str, loop: "EngineLoop") -> None:
        self.request_id = request_id
        self._loop = loop
        self._queue: queue.Queue[StepOutput | BaseException] = queue.Queue()
        self.finished = False
        self.setup_result: Any = None  # what add_request's `before` hook returned
        self._aborted = False  # under _lock: outputs are dropped, not queued
        self._lock = threading.Lock()

    def _put(self, item: StepOutput | BaseException) -> None:
        with self._lock:
            if not self._aborted:
                self._queue.put(item)
                return
        _drop(item)

    def get(self, timeout: float | None = None) -> StepOutput:
        """The next output; raises what the loop failed with, or queue.Empty on timeout."""
        item = self._queue.get(timeout=timeout)
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def __iter__(self):
        while not self.finished:
            try:
                item = self.get()
            except RequestAborted:
                return
            yield item

    def abort(self) -> None:
        """Ends the request now (client gone); its blocks are freed by the loop thread. A thread
        waiting in get() wakes at once with RequestAborted (else it would wait for an output that
        never comes, holding a server thread for good)."""
        if not self.finished:
            self.finished = True
            self._loop.abort(self.request_id)
            with self._lock:  # what is queued, or comes later, nobody reads: what it holds goes now
                self._aborted = True
                while not self._queue.empty():
                    _drop(self._queue.get_nowait())
                self._queue.put(RequestAborted(f"request {self.request_id!r} aborted"))


def _drop(item: StepOutput | BaseException) -> None:
    """An output nobody will read: its pinned export's pages go back (on the loop thread)."""
    if isinstance(item, StepOutput) and item.pinned_export is not None:
        item.pinned_export.release()


class EngineLoop:
    def __init__(self, engine: LLMEngine, max_pending: int = 256, num_threads: int = 0,
                 pin_cores: list[int] | None = None) -> None:
        """`num_threads` > 0: the loop thread runs the model on that many torch threads (see
        `Worker`: the engine is loaded on one thread, so this thread's OpenMP team is the only one);
        `pin_cores`: thread i of that team stays on pin_cores[i] (cpu_ops.pin_team)."""
        self.engine = engine
        self.max_pending = max_pending
        self.num_threads = num_threads
        self.pin_cores = pin_cores
        self.pinned_threads: list[int] = []  # the team's thread ids, once pinned
        self._inbox: queue.Queue[tuple[Callable[[LLMEngine], Any], Future]] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()  # guards _streams (read by other threads for counts)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.last_error: BaseException | None = None
        self.queue_state = QueueState()  # replaced whole by the loop thread, read by any thread
        engine.defer = lambda fn: self.call(lambda _engine: fn())  # pinned exports' releases

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    # ------------------------------------------------------------------ called from any thread
    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Runs fn(engine) on the loop thread between two steps."""
        fut: Future = Future()
        self._inbox.put((fn, fut))
        self._wake.set()
        return fut

    def add_request(self, request_id: str, prompt_token_ids: list[int], params, **kwargs) -> RequestStream:
        """Queues a request (kwargs as LLMEngine.add_request, plus `before=fn(engine)` run first,
        e.g. to import KV blocks right before admission). Raises QueueFullError, or ValueError
        from the engine's validation. The request's arrival time is stamped here, not when the
        loop thread gets to it, so queue-time metrics include the wait for a running step."""
        before = kwargs.pop("before", None)
        kwargs.setdefault("arrival_time", time.monotonic())
        stream = RequestStream(request_id, self)
        with self._lock:
            if len(self._streams) >= self.max_pending:
                raise QueueFullError(f"engine queue is full ({self.max_pending} requests)")
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._streams[request_id] = stream

        def add(engine: LLMEngine):
            extra = before(engine) if before is not None else None
            engine.add_request(request_id, prompt_token_ids, params, **kwargs)
            return extra

        fut = self.call(add)
        try:
            stream.setup_result = fut.result()
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        def do(engine: LLMEngine):
            engine.abort_request(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

        self.call(do)

    # ------------------------------------------------------------------ the loop thread
    def _drain_inbox(self) -> None:
        while True:
            try:
                fn, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as exc:  # handed to the caller, the loop goes on
                    fut.set_exception(exc)

    def _publish(self) -> None:
        sched = self.engine.scheduler
        pending = list(sched.waiting) + sched.running
        self.queue_state = QueueState(
            len(sched.running), len(sched.waiting), sum(s.num_tokens - s.num_computed_tokens for s in pending)
        )

    def _pin(self) -> None:
        """Pins this thread's team (on the loop thread, before the first step); a worker whose team
        cannot be pinned serves unpinned."""
        from splitserve.kernels import cpu_ops

        try:
            self.pinned_threads = cpu_ops.pin_team(self.pin_cores)
        except (RuntimeError, OSError, ValueError) as exc:
            logger.warning("engine threads left unpinned: %s", exc)
            return
        logger.info("engine threads pinned, one per core: %s", ", ".join(
            f"thread {tid} on core {self.pin_cores[i % len(self.pin_cores)]}" for i, tid in enumerate(self.pinned_threads)))

    def _run(self) -> None:
        if self.num_threads > 0:
            import torch

            torch.set_num_threads(self.num_threads)
            if self.pin_cores:
                self._pin()
        stepped = False  # since the heap was last trimmed
        while not self._stop.is_set():
            self._drain_inbox()
            self._publish()
            if not self.engine.has_unfinished():
                woken = self._wake.wait(0.5)
                self._wake.clear()
                if stepped and not woken:  # idle for half a second: the steps' freed memory goes back
                    heap.trim()
                    stepped = False
                continue
            stepped = True
            try:
                prompt_tokens = self.engine.stats.prompt_tokens
                outputs = self.engine.step()
                if self.engine.stats.prompt_tokens - prompt_tokens >= TRIM_AFTER_PROMPT_TOKENS:
                    heap.trim()
            except Exception as exc:  # a failed step fails its requests, not the process
                logger.exception("engine step failed")
                self.last_error = exc
                self._fail_all(exc)
                continue
            self._publish()
            for out in outputs:
                with self._lock:
                    stream = self._streams.get(out.request_id)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
                if stream is not None:
                    stream._put(out)
            # held no longer than the streams hold them: an output nobody reads (its caller went
            # away) goes now, with what it holds (a pinned export is released when collected)
            outputs = out = stream = None
        self._fail_all(RuntimeError("engine loop stopped"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
        for request_id, stream in streams:
            self.engine.abort_request(request_id)
            stream._put(exc)
