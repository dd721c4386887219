"""Distributed tracing: W3C trace context from the gateway through the workers to the kvstore,
spans exported with OpenTelemetry's SDK over OTLP/gRPC.

Off by default (no `otlp_endpoint`): then this module imports nothing of OpenTelemetry, `start`
returns the shared `NOOP` span and every other call returns at its first line (tens of
nanoseconds; tests/unit/test_tracing.py measures it), so a request pays nothing measurable. On,
`setup` builds a TracerProvider (service.name `splitserve-ROLE`, a parent-based ratio sampler,
batch export to the endpoint).

How a trace travels (docs/architecture.md, "Tracing"):
- the gateway starts one span per request, or continues the client's `traceparent` (HTTP header
  or gRPC metadata, handed over through `set_incoming`), and sends each downstream call's own span
  as `traceparent` gRPC metadata (`Span.metadata`);
- a worker continues it (`server_span`) and makes its kvstore calls inside `active`/`outgoing`: the
  kvstore client's channel (`intercept`) adds that span's `traceparent` and request id to every
  call it makes on that thread;
- the kvstore opens a span for each call that arrived with a `traceparent` (`server_interceptors`).
Spans only ever get an explicit parent: nothing here depends on OpenTelemetry's implicit current
span, which would not survive the gateway's async generators or the workers' handler threads.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import threading
import time
from typing import Any

import grpc

TRACEPARENT = "traceparent"  # the W3C header, also the gRPC metadata key
REQUEST_ID_KEY = "x-request-id"  # gRPC metadata naming the request on kvstore calls
REQUEST_ID = "splitserve.request_id"  # the span attribute every splitserve span carries
log = logging.getLogger(__name__)

_tracer: Any = None  # an opentelemetry Tracer once setup() ran with an endpoint; None: tracing off
_provider: Any = None  # its TracerProvider
_role = ""
# The client's traceparent for the gateway request being handled in this task (HTTP or gRPC).
_incoming: contextvars.ContextVar[str | None] = contextvars.ContextVar("splitserve_incoming", default=None)
# (traceparent, request id) for the kvstore calls this thread makes now (see `outgoing`).
_outgoing: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("splitserve_outgoing",
                                                                                   default=None)


class NoopSpan:
    """What every call returns while tracing is off (or for work outside any trace)."""

    __slots__ = ()
    request_id = ""
    traceparent = ""

    def set(self, key: str, value: Any) -> None:
        pass

    def set_error(self, description: str) -> None:
        pass

    def end(self, at: float | None = None) -> None:
        pass

    def metadata(self) -> None:
        """gRPC metadata for a downstream call: None (no metadata) while off."""
        return None


NOOP = NoopSpan()
_NULL = contextlib.nullcontext(NOOP)  # reusable: entering it only returns NOOP


class Span:
    """A started OpenTelemetry span and the request it belongs to (inherited by its children)."""

    __slots__ = ("otel", "request_id")

    def __init__(self, otel: Any, request_id: str) -> None:
        self.otel, self.request_id = otel, request_id

    @property
    def traceparent(self) -> str:
        """This span as a W3C traceparent value: version 00, trace id, span id, flags."""
        c = self.otel.get_span_context()
        return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"

    def set(self, key: str, value: Any) -> None:
        self.otel.set_attribute(key, value)

    def set_error(self, description: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.otel.set_status(Status(StatusCode.ERROR, description))

    def end(self, at: float | None = None) -> None:
        """Ends the span now, or at `at` (time.monotonic() seconds)."""
        self.otel.end(end_time=None if at is None else _wall_ns(at))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TRACEPARENT, self.traceparent),)


def _wall_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as Unix nanoseconds (what spans carry)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def enabled() -> bool:
    return _tracer is not None


def setup(config, role: str) -> bool:
    """Sets up export for this process (role: "gateway", "prefill", ...) from its TracingConfig;
    without an endpoint does nothing and imports nothing. The first call with an endpoint wins (a
    colocated worker's two servicers both call it). Returns whether tracing is on."""
    global _tracer, _provider, _role
    if not config.otlp_endpoint or _tracer is not None:
        return _tracer is not None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise RuntimeError(f"otlp_endpoint is set ({config.otlp_endpoint}) but OpenTelemetry's SDK and OTLP "
                           f"exporter are not installed ({exc}): pip install 'splitserve[tracing]'") from None

    endpoint = config.otlp_endpoint
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(config.trace_sample_ratio)),
                              resource=Resource.create({"service.name": f"splitserve-{role}"}))
    # one export per second at most: spans of a busy second go in one request
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    _tracer, _provider, _role = provider.get_tracer("splitserve"), provider, role
    log.info("tracing on: role=%s otlp_endpoint=%s sample_ratio=%g", role, endpoint, config.trace_sample_ratio)
    return True


def flush(timeout_s: float = 2.0) -> None:
    """Exports the spans still buffered, waiting at most `timeout_s`: for a process that ends with
    os._exit (a drained worker), which skips the SDK's own flush at interpreter exit. In a thread
    of its own: the exporter's retries ignore force_flush's timeout (6.8 s against a collector
    that is down, asked for 0.5 s), and the exit must not wait for them."""
    if _provider is not None:
        done = threading.Thread(target=_provider.force_flush, name="trace-flush", daemon=True)
        done.start()
        done.join(timeout_s)


def start(name: str, parent: Span | NoopSpan | str | None = None, *, request_id: str = "",
          at: float | None = None, kind: str = "internal") -> Span | NoopSpan:
    """A started span, child of `parent`: a span, a traceparent value from a caller, or None (a new
    trace, sampled by the ratio). `request_id` defaults to the parent span's; `at`: start time as
    time.monotonic() seconds (default now). NOOP while off."""
    if _tracer is None:
        return NOOP
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if isinstance(parent, Span):
        context = trace.set_span_in_context(parent.otel)
        request_id = request_id or parent.request_id
    elif isinstance(parent, str) and parent:
        context = TraceContextTextMapPropagator().extract({TRACEPARENT: parent})
    else:
        context = None  # a malformed traceparent extracts to an empty context: a new trace too
    otel = _tracer.start_span(name, context=context, kind=trace.SpanKind[kind.upper()],
                              start_time=None if at is None else _wall_ns(at))
    if request_id:
        otel.set_attribute(REQUEST_ID, request_id)
    return Span(otel, request_id)


def record(name: str, parent: Span | NoopSpan, begin: float, end: float) -> None:
    """A finished child span of `parent` from `begin` to `end` (time.monotonic() seconds), for
    stages measured elsewhere (an engine's queue and compute times). Nothing when either is unset."""
    if _tracer is None or not isinstance(parent, Span) or not begin or not end:
        return
    start(name, parent, at=begin).end(at=max(begin, end))


@contextlib.contextmanager
def _spanning(span: Span, error_on_exit: bool = True):
    try:
        yield span
    except BaseException as exc:  # context.abort, GeneratorExit (the caller went away), a failure
        if error_on_exit:
            span.set_error(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        span.end()


def server_span(name: str, context: grpc.ServicerContext, request_id: str = ""):
    """`with server_span(...) as span:` around a worker's handling of one call: a span continuing
    the caller's traceparent (if it sent one), ended when the block exits, with an error status
    when it exits by an exception (an abort, a cancelled stream)."""
    if _tracer is None:
        return _NULL
    parent = dict(context.invocation_metadata() or ()).get(TRACEPARENT)
    return _spanning(start(name, parent, request_id=request_id, kind="server"))  # type: ignore[arg-type]


def outgoing(span: Span | NoopSpan):
    """`with outgoing(span):` the kvstore calls this thread (or task) makes inside the block carry
    `span` as their parent (through the channel `intercept` made). Sync code only: a block that
    yields could leak the setting into whoever resumes the generator."""
    if _tracer is None or not isinstance(span, Span):
        return _NULL
    return _outgoing_block(span)


@contextlib.contextmanager
def _outgoing_block(span: Span):
    token = _outgoing.set((span.traceparent, span.request_id))
    try:
        yield span
    finally:
        _outgoing.reset(token)


@contextlib.contextmanager
def _active_block(span: Span):
    with _spanning(span), _outgoing_block(span):
        yield span


def active(name: str, parent: Span | NoopSpan):
    """`with active("kv.put", span) as put:` a child span that is also `outgoing` for the block."""
    if _tracer is None or not isinstance(parent, Span):
        return _NULL
    return _active_block(start(name, parent, kind="client"))  # type: ignore[arg-type]


def set_incoming(traceparent: str | None) -> None:
    """The gateway's front ends: the client's traceparent for the request handled in this task."""
    if _tracer is not None and traceparent:
        _incoming.set(traceparent)


def incoming() -> str | None:
    """The traceparent set_incoming() recorded for this task's request, or None."""
    return _incoming.get() if _tracer is not None else None


# ------------------------------------------------------------------ gRPC: client and server side
class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _OutgoingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the thread's `outgoing` traceparent and request id to each call's metadata."""

    @staticmethod
    def _details(details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        current = _outgoing.get()
        if current is None:
            return details
        metadata = list(details.metadata or ()) + [(TRACEPARENT, current[0])]
        if current[1]:
            metadata.append((REQUEST_ID_KEY, current[1]))
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def intercept(channel: grpc.Channel) -> grpc.Channel:
    """`channel`, its calls carrying the `outgoing` trace context; `channel` itself while off."""
    if _tracer is None:
        return channel
    return grpc.intercept_channel(channel, _OutgoingInterceptor())


class _ServerSpans(grpc.ServerInterceptor):
    """A span per call of `service` that arrived with a traceparent, named `prefix.Method`."""

    def __init__(self, service: str, prefix: str) -> None:
        self._method_prefix, self._prefix = f"/{service}/", prefix

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._method_prefix):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        parent = metadata.get(TRACEPARENT)
        if not parent:
            return handler
        name = f"{self._prefix}.{method[len(self._method_prefix):]}"
        return _traced_handler(handler, name, parent, metadata.get(REQUEST_ID_KEY, ""))


def _traced_handler(handler, name: str, parent: str, request_id: str):
    def begin():
        return _spanning(start(name, parent, request_id=request_id, kind="server"))  # type: ignore[arg-type]

    if handler.unary_stream or handler.stream_stream:
        behavior = handler.unary_stream or handler.stream_stream

        def streaming(request, context):
            with begin():
                yield from behavior(request, context)

        field = "unary_stream" if handler.unary_stream else "stream_stream"
        return handler._replace(**{field: streaming})
    behavior = handler.unary_unary or handler.stream_unary

    def unary(request, context):
        with begin():
            return behavior(request, context)

    return handler._replace(**{"unary_unary" if handler.unary_unary else "stream_unary": unary})


def server_interceptors(service: str, prefix: str) -> list[grpc.ServerInterceptor]:
    """The interceptors a sync server of `service` takes for its spans; none while off."""
    return [] if _tracer is None else [_ServerSpans(service, prefix)]
