"""Clients that go away mid-request cost nothing afterwards (issue 18): 20 HTTP clients (half
streamed, half not) and a gRPC client drop their requests while the decode worker generates for
them; within 2 s nothing runs anywhere and the decode worker's KV cache is back at its idle value."""
from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

from services_fixture import start_long_stream, wait_for

MAX_TOKENS = 200  # far more than can be generated before the clients go
LIMIT_S = 2.0


def _model(base: str) -> str:
    return json.loads(urllib.request.urlopen(base + "/models", timeout=10).read())["data"][0]["id"]


def _open(base: str, model: str, stream: bool, i: int) -> socket.socket:
    """A raw HTTP/1.1 completions request, left open: closing the socket is the client vanishing."""
    host, port = base.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    body = json.dumps({"model": model, "prompt": f"Client {i} tells a very long story about", "max_tokens": MAX_TOKENS,
                       "temperature": 0, "ignore_eos": True, "stream": stream}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def _gateway_gauges(base: str) -> dict[str, float]:
    url = base.rsplit("/v1", 1)[0] + "/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for name in ("num_requests_running", "num_requests_waiting"):
        m = re.search(rf"^splitserve_{name}\{{[^}}]*\}} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def _busy(stack) -> dict:
    """What is still running anywhere; {} when idle."""
    decode, prefill = stack.decode_load(), stack.prefill_load()
    state = {"gateway": _gateway_gauges(stack.http_base), "decode_running": decode.num_running,
             "decode_waiting": decode.num_waiting, "decode_free_blocks": decode.num_free_blocks,
             "prefill_running": prefill.num_running + prefill.num_waiting}
    return state


def test_vanished_clients_cancel_their_work_within_two_seconds(http_stack):
    idle_free = http_stack.decode_load().num_free_blocks
    assert _busy(http_stack)["decode_running"] == 0
    model = _model(http_stack.http_base)
    streamed = [_open(http_stack.http_base, model, True, i) for i in range(10)]
    plain = [_open(http_stack.http_base, model, False, 10 + i) for i in range(10)]
    grpc_stream = start_long_stream(http_stack.gateway, "A gRPC client tells a long story about")
    for sock in streamed:  # each streamed client saw its first event: its request is past prefill
        head = sock.recv(65536)
        while b"data:" not in head:
            chunk = sock.recv(65536)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
    # every request is in flight at the gateway and some are generating on the decode worker
    wait_for(lambda: sum(_gateway_gauges(http_stack.http_base).values()) >= 21, 60, "21 requests in flight",
             interval_s=0.05)
    wait_for(lambda: http_stack.decode_load().num_running >= 1, 60, "the decode worker generating",
             interval_s=0.05)
    assert http_stack.decode_load().num_free_blocks < idle_free

    gone = time.monotonic()
    for sock in streamed + plain:
        sock.close()
    grpc_stream.close()  # cancels the call

    def idle():
        s = _busy(http_stack)
        return s if (s["gateway"] == {"num_requests_running": 0.0, "num_requests_waiting": 0.0}
                     and s["decode_running"] == s["decode_waiting"] == s["prefill_running"] == 0
                     and s["decode_free_blocks"] == idle_free) else None

    try:
        wait_for(idle, LIMIT_S, "the stack to be idle", interval_s=0.05)
    except AssertionError:
        raise AssertionError(f"still busy {LIMIT_S} s after the clients left: {_busy(http_stack)} "
                             f"(idle free blocks {idle_free})") from None
    assert time.monotonic() - gone <= LIMIT_S + 0.5
