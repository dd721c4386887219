"""Tracing through a whole stack: `splitserve up` with every role's --ROLE-otlp-endpoint pointing at
a real OTLP/gRPC collector started here (the TraceService of opentelemetry-proto, keeping every
ExportTraceServiceRequest it gets). One request's spans must arrive from the gateway, prefill,
kvstore and decode processes in one trace, each child linked to the span that caused it, each
naming the request; a client's traceparent (gRPC metadata or HTTP header) is continued."""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services_fixture import start_stack, wait_for
from splitserve.client import build_request
from splitserve.launch.up import free_port
from splitserve.rpc import channel
from splitserve.v1 import gateway_pb2_grpc

# each over 2 full blocks of 16 tokens, and different: every request puts and fetches its own blocks
PROMPTS = {name: f"The {name} trace follows one request through every role of the system, " * 3
           for name in ("grpc", "http", "root")}
SLACK_NS = 5_000_000  # a retroactive span's times come from another clock reading: 5 ms of play


@dataclass(frozen=True)
class SpanRecord:
    service: str  # the resource's service.name
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    start: int
    end: int
    attributes: dict
    error: bool


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for rs in request.resource_spans:
                service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name", "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attrs = {a.key: a.value.string_value for a in s.attributes}
                        self.spans.append(SpanRecord(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                                                     s.parent_span_id.hex(), s.start_time_unix_nano,
                                                     s.end_time_unix_nano, attrs, s.status.code == 2))
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[SpanRecord]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def collector():
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    c = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    c.endpoint = f"127.0.0.1:{port}"
    yield c
    server.stop(0)


@pytest.fixture(scope="module")
def stack(collector):
    flags = [a for role in ("gateway", "kvstore", "prefill", "decode")
             for a in (f"--{role}-otlp-endpoint", collector.endpoint)]
    s = start_stack("--kv-cache-memory-gb", "0.1", "--metrics-port", "-1", *flags)
    yield s
    assert s.stop() == 0, "\n".join(s.log[-30:])


def traceparent() -> tuple[str, str, str]:
    """(header value, trace id, span id) of a fresh sampled caller span."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def grpc_generate(stack, prompt: str, request_id: str, metadata=()) -> None:
    stub = gateway_pb2_grpc.GatewayStub(channel(stack.gateway))
    req = build_request(prompt, sampling={"max_tokens": 3, "temperature": 0.0}, request_id=request_id)
    finals = [m for m in stub.Generate(req, timeout=120, metadata=metadata) if m.finish_reason]
    assert len(finals) == 1


def complete(trace_id: str, spans_of, wanted=("gateway.request", "prefill.request", "decode.request",
                                               "decode.generate", "kv.fetch", "kv.put")):
    """The trace's spans once those named in `wanted` and kvstore spans under kv.put and kv.fetch
    arrived (each process exports its own batches: they come in any order)."""
    def ready():
        spans = spans_of(trace_id)
        ids = {s.name: s.span_id for s in spans}
        kv_parents = {s.parent_id for s in spans if s.service == "splitserve-kvstore"}
        return spans if set(wanted) <= set(ids) and {ids["kv.put"], ids["kv.fetch"]} <= kv_parents else None
    return wait_for(ready, 30, f"the spans of trace {trace_id}")


def by_name(spans: list[SpanRecord]) -> dict[str, SpanRecord]:
    out = {}
    for s in spans:
        if not s.name.startswith("kvstore."):
            assert s.name not in out, f"two {s.name} spans in one trace (no retry happened)"
            out[s.name] = s
    return out


def check_tree(spans: list[SpanRecord], request_id: str) -> SpanRecord:
    """Every role's spans hang where they belong; returns the gateway's request span."""
    named = by_name(spans)
    services = {"gateway": "splitserve-gateway", "prefill": "splitserve-prefill", "decode": "splitserve-decode",
                "kv.put": "splitserve-prefill", "kv.fetch": "splitserve-decode"}
    for s in spans:
        prefix = s.name if s.name in services else s.name.split(".")[0]
        assert s.service == services.get(prefix, "splitserve-kvstore"), s
        assert s.attributes.get("splitserve.request_id", "").startswith(request_id), s
        assert not s.error, s
        assert s.start <= s.end, s
    parents = {"gateway.queue": "gateway.request", "gateway.prefill": "gateway.request",
               "gateway.decode": "gateway.request", "prefill.request": "gateway.prefill",
               "prefill.queue": "prefill.request", "prefill.compute": "prefill.request",
               "kv.put": "prefill.request", "decode.request": "gateway.decode", "kv.fetch": "decode.request",
               "decode.queue": "decode.request", "decode.generate": "decode.request"}
    assert set(named) == set(parents) | {"gateway.request"}
    for child, parent in parents.items():
        c, p = named[child], named[parent]
        assert c.parent_id == p.span_id, f"{child} should be a child of {parent}"
        assert p.start - SLACK_NS <= c.start, f"{child} starts before {parent}"
        # a decode stream's last message reaches the gateway before the worker's handler returns
        assert child == "decode.request" or c.end <= p.end + SLACK_NS, f"{child} ends after {parent}"
    kv_parents = {named[n].span_id: n for n in ("prefill.request", "kv.put", "kv.fetch")}
    kvstore = [s for s in spans if s.name.startswith("kvstore.")]
    assert all(s.parent_id in kv_parents for s in kvstore), kvstore
    under = {kv_parents[s.parent_id] for s in kvstore}
    assert {"kv.put", "kv.fetch"} <= under, f"kvstore calls seen under {under}"
    assert named["prefill.compute"].end <= named["decode.request"].start
    return named["gateway.request"]


def test_grpc_request_traced_through_every_role_continuing_the_callers_trace(stack, collector):
    header, trace_id, caller_span = traceparent()
    grpc_generate(stack, PROMPTS["grpc"], "trace-grpc", metadata=(("traceparent", header),))
    root = check_tree(complete(trace_id, collector.trace), "trace-grpc")
    assert root.parent_id == caller_span


def test_http_traceparent_header_is_continued(stack, collector):
    header, trace_id, caller_span = traceparent()
    models = json.loads(urllib.request.urlopen(stack.http_base + "/models", timeout=60).read())
    body = {"model": models["data"][0]["id"], "prompt": PROMPTS["http"], "max_tokens": 3, "temperature": 0}
    req = urllib.request.Request(stack.http_base + "/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "traceparent": header,
                                          "x-request-id": "trace-http"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert json.loads(resp.read())["choices"][0]["text"]
    root = check_tree(complete(trace_id, collector.trace), "trace-http")
    assert root.parent_id == caller_span


def test_request_without_traceparent_starts_a_new_trace(stack, collector):
    grpc_generate(stack, PROMPTS["root"], "trace-root")

    def root_span():
        return next((s for s in list(collector.spans) if s.name == "gateway.request"
                     and s.attributes.get("splitserve.request_id") == "trace-root"), None)
    root = wait_for(root_span, 30, "the gateway span of the request without traceparent")
    assert root.parent_id == ""
    check_tree(complete(root.trace_id, collector.trace), "trace-root")


def test_a_drained_worker_exports_its_last_spans_before_it_exits(collector):
    """A drained worker ends with os._exit (splitserve.worker.exit_now), which skips the SDK's flush
    at exit: its last spans, still waiting for the batch's next second, must be exported first."""
    code = "\n".join([
        "from splitserve import tracing",
        "from splitserve.config.parts import TracingConfig",
        "from splitserve.worker import exit_now",
        f"tracing.setup(TracingConfig(otlp_endpoint={collector.endpoint!r}), 'prefill')",
        "tracing.start('last.span', request_id='exit-now').end()",
        "exit_now(0)"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [s.service for s in list(collector.spans) if s.attributes.get("splitserve.request_id") == "exit-now"] \
        == ["splitserve-prefill"]
