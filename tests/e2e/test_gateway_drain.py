"""SIGTERM to a gateway with open streams: it drains, no client sees an error.

A second gateway process (`splitserve gateway`, --drain-timeout-s 120) is started in front of the
workers of the shared `http_stack`; only it gets SIGTERM. One greedy gRPC Generate stream, one
HTTP SSE stream and one non-streamed HTTP completion are open on it when it does. During the
drain its gRPC health is NOT_SERVING, /health answers 503 "draining", a new gRPC request gets
UNAVAILABLE and a new HTTP request 503, both naming the drain; the three open requests end with
the full text of the same requests sent to the stack's own gateway (the fault-free run), and the
process exits 0 once they ended, well within its drain timeout.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.client import generate, stream_generate
from splitserve.launch.up import free_port
from splitserve.rpc import channel, wait_until_serving

N = 96  # tokens per stream: long enough to be open while the drain is checked
DRAIN_S = 120.0  # far more than the streams need, even on a loaded machine
PROMPTS = ("Write a long story about a lighthouse keeper.", "Describe a walk through an old city at night.",
           "Explain how a steam engine works, step by step.")
SAMPLING = {"max_tokens": N, "temperature": 0.0, "ignore_eos": True}


def http(method: str, url: str, body: dict | None = None):
    """(status, parsed JSON) of one request; never raises for an HTTP status."""
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def open_sse(base: str, model: str, prompt: str):
    """An open SSE completion stream, returned once its first text chunk arrived."""
    body = {"model": model, "prompt": prompt, "stream": True, **SAMPLING}
    req = urllib.request.Request(base + "/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    resp = urllib.request.urlopen(req, timeout=120)
    assert resp.status == 200
    first = sse_texts(resp, stop_after_first=True)
    return resp, first


def sse_texts(resp, stop_after_first: bool = False) -> list[str]:
    """The choices' texts of the SSE events read (to [DONE], or one); an error event fails."""
    texts = []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            texts.append("[DONE]")
            break
        event = json.loads(line[6:])
        assert "error" not in event, event
        texts.append(event["choices"][0]["text"])
        if stop_after_first and texts[-1]:
            break
    return texts


@pytest.fixture
def gateway(http_stack):
    port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitserve.launch.cli", "gateway", "--host", "127.0.0.1", "--port", str(port),
         "--http-port", str(http_port), "--prefill", http_stack.roles["prefill-0"],
         "--decode", http_stack.roles["decode-0"], "--discovery-interval-s", "0", "--drain-timeout-s", str(DRAIN_S)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(f"127.0.0.1:{port}", timeout_s=60)
        yield proc, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read() if not proc.stdout.closed else ""
        proc.wait()
        print("gateway output:\n" + (out or "")[-4000:])  # shown when the test fails


@pytest.mark.timeout(300)
def test_sigterm_drains_the_gateway_open_streams_finish_new_requests_refused(http_stack, gateway):
    proc, address, base = gateway
    model = http("GET", base + "/v1/models")[1]["data"][0]["id"]
    with ThreadPoolExecutor(3) as pool:  # the fault-free run, as concurrent as the drained one
        reference = list(pool.map(lambda p: generate(http_stack.gateway, prompt=p, sampling=SAMPLING,
                                                     timeout_s=120).text, PROMPTS))

    plain_pool = ThreadPoolExecutor(1)
    plain = plain_pool.submit(http, "POST", base + "/v1/completions",
                              {"model": model, "prompt": PROMPTS[2], **SAMPLING})
    stream = stream_generate(address, prompt=PROMPTS[0], sampling=SAMPLING, timeout_s=120)
    grpc_text = [next(stream).text]  # the first token: the request runs
    sse, sse_text = open_sse(base + "/v1", model, PROMPTS[1])
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()

    with channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        deadline = sent + 5
        while (health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
               != health_pb2.HealthCheckResponse.NOT_SERVING):
            assert time.monotonic() < deadline, "gRPC health still SERVING 5 s after SIGTERM"
            time.sleep(0.05)
    status, body = http("GET", base + "/health")
    assert (status, body["status"]) == (503, "draining"), body
    with pytest.raises(grpc.RpcError) as refused:
        generate(address, prompt="A new request during the drain.", sampling={"max_tokens": 2}, timeout_s=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "gateway draining" in refused.value.details(), refused.value.details()
    status, body = http("POST", base + "/v1/completions", {"model": model, "prompt": "New.", "max_tokens": 2})
    assert status == 503 and "gateway draining" in body["error"]["message"], (status, body)
    assert proc.poll() is None, "the gateway exited before its open streams ended"

    grpc_text += [msg.text for msg in stream]  # an error status would raise here
    sse_text += sse_texts(sse)
    status, body = plain.result(timeout=120)
    plain_pool.shutdown()
    ended = time.monotonic()
    assert status == 200 and body["choices"][0]["text"] == reference[2], (status, body)
    assert "".join(grpc_text) == reference[0]
    assert sse_text[-1] == "[DONE]" and "".join(sse_text[:-1]) == reference[1]
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-3000:]
    assert time.monotonic() - ended < 5, "the gateway lingered after its streams ended"
    assert "gateway draining: 3 request(s) open" in out and "gateway drained" in out, out[-3000:]
