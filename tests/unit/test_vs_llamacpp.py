"""benchmarks/vs_llamacpp.py's client and summary, against a loopback server that answers with
canned server-sent events: tokens are counted from `usage`, and every broken answer (an HTTP
error, a stream cut short, too few tokens, an error chunk, garbage) raises instead of counting."""
from __future__ import annotations

import http.server
import importlib.util
import json
import math
import socketserver
import sys
import threading
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_llamacpp.py"


def _event(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


TEXT = lambda t: _event({"choices": [{"index": 0, "text": t}]})  # noqa: E731
USAGE = lambda n: _event({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": n}})  # noqa: E731
DONE = _event(b"[DONE]")
ANSWERS = {  # name -> (status, body)
    # two tokens in one chunk (a held-back partial character), then one more: 3 tokens, 2 arrivals
    "ok": (200, TEXT("ab") + TEXT("") + TEXT("c") + USAGE(3) + DONE),
    "http_error": (400, b'{"error": {"message": "bad prompt"}}'),
    "cut": (200, TEXT("a")),
    "short": (200, TEXT("a") + USAGE(1) + DONE),
    "error_chunk": (200, _event({"error": {"message": "boom"}})),
    "garbage": (200, b"data: {not json\n\n"),
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("vs_llamacpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server():
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            status, payload = ANSWERS[body["model"]]
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(payload)

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    # handler threads left waiting on a kept-alive connection must not hold the teardown (it took 14 s)
    srv.daemon_threads, srv.block_on_close = True, False
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", seen
    srv.shutdown()
    srv.server_close()


def test_counts_tokens_from_usage_and_sends_the_same_body_to_any_server(bench, server):
    base, seen = server
    r = bench.complete(base, "ok", [5, 6, 7], 3)
    assert r.tokens == 3
    assert len(r.arrivals) == 2  # chunks with text; the empty one is no arrival
    assert r.sent <= r.arrivals[0] <= r.arrivals[1]
    path, body = seen[-1]
    assert path == "/v1/completions"
    assert body == {"model": "ok", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0.0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True}


@pytest.mark.parametrize("answer,error,words", [
    ("http_error", RuntimeError, "HTTP 400"),
    ("cut", RuntimeError, "without a usage chunk"),
    ("short", RuntimeError, "1 tokens in 1 chunks, 3 asked for"),
    ("error_chunk", RuntimeError, "boom"),
    ("garbage", ValueError, None),
])
def test_a_broken_answer_raises(bench, server, answer, error, words):
    base, _ = server
    with pytest.raises(error, match=words):
        bench.complete(base, answer, [1], 3)


def test_concurrent_requests_all_complete(bench, server):
    base, _ = server
    rs = bench.concurrent(base, "ok", [[1], [2], [3], [4]], 3)
    assert [r.tokens for r in rs] == [3, 3, 3, 3]


def test_summary_takes_medians_and_each_process_highest_peak(bench):
    def round_(tok_s, decode_mib):
        return {"single_tok_s": tok_s, "single_itl_mean_ms": 1e3 / tok_s, "single_itl_p50_ms": 10.0,
                "streams_tok_s": 100.0, "prefix_ttft_mean_ms": 30.0, "prefix_ttft_p50_ms": 29.0,
                "single_tokens_per_chunk": 1.0, "sut_cpus": 1.9, "other_cpus": 0.05,
                "rss": {"launcher": {"peak_mib": 50.0, "kv_mib": 0.0, "worker": False},
                        "gateway": {"peak_mib": 300.0, "kv_mib": 0.0, "worker": True},
                        "decode-0": {"peak_mib": decode_mib, "kv_mib": 100.0, "worker": True}}}

    s = bench.summarize([round_(50.0, 600.0), round_(70.0, 500.0), round_(60.0, 550.0)])
    assert s["single_tok_s"] == 60.0
    assert s["rss"]["decode-0"]["peak_mib"] == 600.0
    assert s["rss_workers_mib"] == 900.0  # gateway + decode; the launcher is not a serving process
    assert s["rss_max_worker_minus_kv_mib"] == 500.0  # workers only: the gateway holds no KV pool


def test_arguments_are_checked_by_name(bench, capsys):
    for argv, words in ((["--streams", "0"], "--streams must be >= 1"),
                        (["--output-len", "1"], "--output-len must be >= 2"),
                        (["--llama-server", "/nonexistent/llama-server"], "is not an executable file"),
                        (["--no-disaggregated"], "nothing to run"),
                        (["--wait-quiet-s", "-1"], "--wait-quiet-s >= 0")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert words in capsys.readouterr().err


def test_summary_without_a_known_pool_or_a_peak_says_nan_not_a_number_made_up(bench):
    row = {"single_tok_s": 1.0, "single_itl_mean_ms": 1.0, "single_itl_p50_ms": 1.0, "streams_tok_s": 1.0,
           "prefix_ttft_mean_ms": 1.0, "prefix_ttft_p50_ms": 1.0, "single_tokens_per_chunk": 1.0,
           "sut_cpus": 1.0, "other_cpus": 0.0,
           "rss": {"prefill-0": {"peak_mib": 500.0, "kv_mib": float("nan"), "worker": True},
                   "decode-0": {"peak_mib": None, "kv_mib": float("nan"), "worker": True}}}
    s = bench.summarize([row])
    assert s["rss_workers_mib"] == 500.0  # a process gone before its peak was read counts 0
    assert math.isnan(s["rss_max_worker_minus_kv_mib"])  # the workers' pools differ: no subtraction
