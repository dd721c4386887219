"""Tracing off (the default) costs nothing: the serving modules and every hook of a request's path
import nothing of OpenTelemetry, and the hooks are no-ops measured in nanoseconds. Tracing on
through a whole stack: tests/e2e/test_tracing_stack.py."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import timeit
from pathlib import Path

import grpc
import pytest

from splitserve import tracing
from splitserve.config.parts import TracingConfig

REPO = Path(__file__).resolve().parents[2]

# Records who imports OpenTelemetry: redis-py imports its metrics SDK whenever it is installed, so
# the check is that no import statement of this checkout's code asks for it.
OFF_PATH = textwrap.dedent("""
    import importlib.abc, sys, traceback
    OURS = (sys.argv[1] + "/libs/", sys.argv[1] + "/services/")
    culprits = []

    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "opentelemetry":  # the frame whose import statement this is
                importer = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith("<frozen")][-1]
                if importer.filename.startswith(OURS):
                    culprits.append((name, f"{importer.filename}:{importer.lineno}"))
            return None

    sys.meta_path.insert(0, Watch())
    import grpc
    import splitserve.services.gateway.server, splitserve.services.prefill.server
    import splitserve.services.decode.server, splitserve.services.kvstore.server
    import splitserve.services.colocated.server, splitserve.launch.cli
    from splitserve import tracing
    from splitserve.config.gateway import GatewayConfig
    from splitserve.config.kvstore import KVStoreConfig
    from splitserve.config.worker import WorkerConfig
    for config, role in ((GatewayConfig(), "gateway"), (KVStoreConfig(), "kvstore"), (WorkerConfig(), "decode")):
        assert tracing.setup(config.tracing, role) is False
    # every hook a request passes through, off
    tracing.set_incoming("00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    span = tracing.start("gateway.request", tracing.incoming(), request_id="r", at=1.0)
    assert span is tracing.NOOP and span.metadata() is None
    tracing.record("gateway.queue", span, 1.0, 2.0)
    with tracing.active("kv.put", span) as put, tracing.outgoing(put):
        assert put is tracing.NOOP
    channel = grpc.insecure_channel("127.0.0.1:1")
    assert tracing.intercept(channel) is channel and tracing.server_interceptors("s", "p") == []
    span.end()
    print("culprits", culprits)
    assert not culprits, culprits
""")


def test_tracing_off_imports_no_opentelemetry_from_splitserve():
    done = subprocess.run([sys.executable, "-c", OFF_PATH, str(REPO)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "culprits []" in done.stdout


class _Context:
    """What a gRPC handler's context offers the hooks (tracing off never reads it)."""

    def invocation_metadata(self):
        raise AssertionError("tracing off must not read the call's metadata")


def _request_hooks() -> None:
    """The hooks one disaggregated request runs through, in all roles together (tracing off)."""
    span = tracing.start("gateway.request", tracing.incoming(), request_id="r", at=1.0, kind="server")
    tracing.record("gateway.queue", span, 1.0, 2.0)
    for name in ("gateway.prefill", "gateway.decode"):
        call = tracing.start(name, span, request_id="r~1", kind="client")
        call.set("splitserve.worker", "w")
        call.metadata()
        call.end()
    for role in ("prefill.request", "decode.request"):
        with tracing.server_span(role, _Context(), "r~1") as worker_span:
            with tracing.outgoing(worker_span):
                pass
            with tracing.active("kv", worker_span):
                pass
            tracing.record("q", worker_span, 1.0, 2.0)
            tracing.record("c", worker_span, 2.0, 3.0)
    span.end()


def test_tracing_off_hooks_cost_nanoseconds():
    """A request's hooks off take a few microseconds at most, against the milliseconds of a
    request (measured here: 6-14 us for all ~20 of them on a loaded 2-core VM, under nice 15)."""
    assert not tracing.enabled()
    number = 2000
    per_request_s = min(timeit.repeat(_request_hooks, number=number, repeat=5)) / number
    print(f"tracing off: {per_request_s * 1e6:.2f} us per request's hooks")
    assert per_request_s < 50e-6


def test_tracing_config_names_what_is_wrong():
    assert TracingConfig().otlp_endpoint == "" and TracingConfig().trace_sample_ratio == 1.0
    with pytest.raises(ValueError, match="trace_sample_ratio"):
        TracingConfig(trace_sample_ratio=1.5)
    with pytest.raises(ValueError, match="otlp_endpoint"):
        TracingConfig(otlp_endpoint="collector 4317")


def test_interceptors_keep_channels_and_servers_untouched_when_off():
    channel = grpc.insecure_channel("127.0.0.1:1")
    try:
        assert tracing.intercept(channel) is channel
    finally:
        channel.close()
    assert tracing.server_interceptors("splitserve.v1.KVStore", "kvstore") == []
