"""`splitserve bench`: arrival times, datasets, metric arithmetic and goodput (pure, fast), the
stream parsing against a mock transport, and one short real run against `splitserve up`."""
from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from splitserve.bench import datasets, report
from splitserve.bench.arrivals import arrival_gaps, arrival_times
from splitserve.bench.metrics import RequestRecord, meets_slos, parse_goodput, summarize, timeline
from splitserve.bench.runner import httpx, normalize_base_url, send_one


# ------------------------------------------------------------------------------------ arrivals
@pytest.mark.parametrize("rate,burstiness", [(4.0, 1.0), (20.0, 0.25), (0.5, 4.0)])
def test_arrival_gaps_mean_and_cv(rate, burstiness):
    gaps = arrival_gaps(4000, rate, burstiness, seed=7)
    assert gaps.shape == (4000,) and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.08)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_arrival_times_seeded_and_inf():
    a = arrival_times(500, 3.0, 1.0, seed=1)
    assert a[0] == 0.0 and (np.diff(a) >= 0).all() and len(a) == 500
    np.testing.assert_array_equal(a, arrival_times(500, 3.0, 1.0, seed=1))
    assert not np.array_equal(a, arrival_times(500, 3.0, 1.0, seed=2))
    np.testing.assert_allclose(np.diff(a), arrival_gaps(499, 3.0, 1.0, seed=1))
    assert (arrival_times(100, math.inf, 1.0, seed=1) == 0).all()
    assert (arrival_gaps(100, math.inf, 0.5, seed=1) == 0).all()
    assert len(arrival_times(0, 1.0)) == 0 and list(arrival_times(1, 1.0)) == [0.0]
    for rate, b in [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (float("nan"), 1.0)]:
        with pytest.raises(ValueError):
            arrival_gaps(3, rate, b)


# ------------------------------------------------------------------------------------ datasets
IDS = datasets.candidate_token_ids(1000, special_ids=[0, 1, 2])


def test_random_dataset_exact_lengths():
    reqs = datasets.random_requests(20, 24, 4, IDS, seed=3)
    assert len(reqs) == 20
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 24 and r.output_len == 4
        assert all(3 <= t < 1000 for t in r.prompt)  # no special tokens
    assert len({tuple(r.prompt) for r in reqs}) == 20
    assert reqs == datasets.random_requests(20, 24, 4, IDS, seed=3)
    assert reqs != datasets.random_requests(20, 24, 4, IDS, seed=4)


def test_random_dataset_range_ratio_and_prefix():
    reqs = datasets.random_requests(300, 100, 40, IDS, range_ratio=0.5, prefix_len=16, seed=0)
    in_lens = [r.prompt_len - 16 for r in reqs]
    out_lens = [r.output_len for r in reqs]
    assert min(in_lens) >= 50 and max(in_lens) <= 150 and len(set(in_lens)) > 30
    assert min(out_lens) >= 20 and max(out_lens) <= 60
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    assert len({tuple(r.prompt[:16]) for r in reqs}) == 1  # the shared prefix
    assert datasets.length_bounds(136, 0.88) == (16, 256)  # "output lengths from 16 to 256"
    assert datasets.length_bounds(1, 0.9) == (1, 2)
    with pytest.raises(ValueError):
        datasets.length_bounds(10, 1.0)


def test_prefix_repetition_dataset():
    reqs = datasets.prefix_repetition_requests(12, 64, 8, 5, IDS, seed=1)
    prefix = reqs[0].prompt[:64]
    for r in reqs:
        assert len(r.prompt) == r.prompt_len == 72 and r.output_len == 5 and r.prompt[:64] == prefix
    assert len({tuple(r.prompt[64:]) for r in reqs}) == 12  # distinct suffixes
    groups = datasets.prefix_repetition_requests(6, 32, 4, 2, IDS, num_prefixes=3, seed=1)
    assert [g.prompt[:32] for g in groups[:3]] == [g.prompt[:32] for g in groups[3:]]
    assert len({tuple(g.prompt[:32]) for g in groups}) == 3
    distinct = datasets.prefix_repetition_requests(5, 32, 1, 2, IDS, num_prefixes=5, seed=1)
    assert len({tuple(d.prompt[:16]) for d in distinct}) == 5  # not even the first block shared
    with pytest.raises(ValueError):
        datasets.prefix_repetition_requests(3, 0, 4, 2, IDS)


def _write_sharegpt(tmp_path):
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "one two three four five"},
                                      {"from": "gpt", "value": "a b c d e f"}]},
        {"id": "short", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a b c d"}]},
        {"id": "short-answer", "conversations": [{"from": "human", "value": "w w w w w"}, {"from": "gpt", "value": "ok"}]},
        {"id": "long", "conversations": [{"from": "human", "value": " ".join(["x"] * 50)},
                                         {"from": "gpt", "value": "a b c d"}]},
        {"id": "system-first", "conversations": [{"from": "system", "value": "be nice"},
                                                 {"from": "human", "value": "p q r s t u"},
                                                 {"from": "gpt", "value": "1 2 3 4 5 6 7"}]},
        {"id": "no-answer", "conversations": [{"from": "human", "value": "lonely question here ok"}]},
        {"id": "broken"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_dataset(tmp_path):
    data = datasets.load_sharegpt(_write_sharegpt(tmp_path))
    encode = str.split  # a word tokenizer: lengths are word counts
    reqs = datasets.sharegpt_requests(data, 2, encode, seed=0, max_prompt_len=20, max_total_len=40)
    got = {(r.prompt, r.prompt_len, r.output_len) for r in reqs}
    assert got == {("one two three four five", 5, 6), ("p q r s t u", 6, 7)}
    fixed = datasets.sharegpt_requests(data, 3, encode, output_len=3, seed=0, max_prompt_len=20, max_total_len=40)
    assert sorted(r.prompt_len for r in fixed) == [5, 5, 6] and {r.output_len for r in fixed} == {3}
    assert fixed == datasets.sharegpt_requests(data, 3, encode, output_len=3, seed=0, max_prompt_len=20,
                                               max_total_len=40)
    with pytest.raises(ValueError, match="usable entries"):
        datasets.sharegpt_requests(data, 3, encode, seed=0, max_prompt_len=20, max_total_len=40)
    with pytest.raises(FileNotFoundError):
        datasets.load_sharegpt(tmp_path / "missing.json")


# ------------------------------------------------------------------------- metric arithmetic
def _recorded_run() -> list[RequestRecord]:
    """Three successful requests and one failure with hand-picked timestamps (seconds)."""
    return [
        RequestRecord(0, 10, 3, send_time=0.0, chunk_times=[0.1, 0.2, 0.4], end_time=0.5, prompt_tokens=10,
                      completion_tokens=3, success=True),
        RequestRecord(1, 20, 2, send_time=0.2, chunk_times=[0.5, 0.6], end_time=0.6, prompt_tokens=20,
                      completion_tokens=2, success=True),
        RequestRecord(2, 30, 4, send_time=0.3, chunk_times=[0.4, 0.7, 0.8, 1.0], end_time=1.0, prompt_tokens=30,
                      completion_tokens=4, success=True),
        RequestRecord(3, 40, 4, send_time=0.5, end_time=0.6, error="HTTP 503: no worker"),
    ]


def test_metric_arithmetic_on_a_recorded_run():
    s = summarize(_recorded_run(), duration_s=1.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 9)
    assert s["request_throughput"] == pytest.approx(3.0)
    assert s["input_throughput"] == pytest.approx(60.0)
    assert s["output_throughput"] == pytest.approx(9.0)
    assert s["total_token_throughput"] == pytest.approx(69.0)
    expected = {  # ms, by hand: linear interpolation between order statistics
        # TTFT 100, 300, 100
        "ttft": {"mean": 500 / 3, "median": 100, "p90": 260, "p99": 296},
        # TPOT (e2e - ttft) / (n - 1): 400/2, 100/1, 600/3
        "tpot": {"mean": 500 / 3, "median": 200, "p90": 200, "p99": 200},
        # ITL 100, 200 | 100 | 300, 100, 200
        "itl": {"mean": 1000 / 6, "median": 150, "p90": 250, "p99": 295},
        # E2E 500, 400, 700
        "e2el": {"mean": 1600 / 3, "median": 500, "p90": 660, "p99": 696},
    }
    for metric, stats in expected.items():
        for stat, value in stats.items():
            assert s[f"{stat}_{metric}_ms"] == pytest.approx(value, abs=1e-6), (metric, stat)
    assert "request_goodput" not in s
    table = report.format_table(s)
    assert "requests failed" in table and "TTFT" in table and "166.67" in table


def test_metric_edge_cases():
    one = RequestRecord(0, 5, 1, send_time=1.0, chunk_times=[1.5], end_time=1.6, success=True)  # no usage
    assert one.output_tokens == 1 and one.tpot is None and one.itl == [] and one.input_tokens == 5
    s = summarize([one], duration_s=0.6)
    assert s["mean_tpot_ms"] is None and s["mean_itl_ms"] is None and s["mean_ttft_ms"] == pytest.approx(500)
    empty = summarize([RequestRecord(0, 5, 1, error="boom")], duration_s=1.0)
    assert empty["completed"] == 0 and empty["mean_e2el_ms"] is None and "n/a" in report.format_table(empty)
    tl = timeline(_recorded_run(), 1.0, bins=2)
    assert tl["output_tokens_per_s"] == pytest.approx([8.0, 10.0])  # 4 tokens by 0.5 s, 5 after, in 0.5 s bins
    assert tl["completed_per_s"] == pytest.approx([0.0, 6.0])


def test_goodput_counting():
    assert parse_goodput(["ttft:150", "TPOT:50.5", "e2el:600"]) == {"ttft": 0.15, "tpot": 0.0505, "e2el": 0.6}
    assert parse_goodput(None) == {}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["ttft:-1"], ["ttft:inf"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    run = _recorded_run()  # TTFT 100/300/100 ms, TPOT 200/100/200 ms, E2E 500/400/700 ms, one failure
    def good(*slos):
        return summarize(run, 2.0, parse_goodput(list(slos)))["good_requests"]
    assert good("ttft:150") == 2
    assert good("ttft:150", "e2el:600") == 1
    assert good("ttft:150", "tpot:150") == 0
    assert good("tpot:150") == 1
    assert good("e2el:10000") == 3  # a failed request never counts
    s = summarize(run, 2.0, parse_goodput(["ttft:150"]))
    assert s["request_goodput"] == pytest.approx(1.0) and s["goodput_slos_ms"] == {"ttft": 150.0}
    single = RequestRecord(0, 5, 1, send_time=0.0, chunk_times=[0.1], end_time=0.1, completion_tokens=1, success=True)
    assert meets_slos(single, {"tpot": 0.001})  # no TPOT to miss
    exact = RequestRecord(0, 5, 2, send_time=0.0, chunk_times=[0.25, 0.5], end_time=0.5, success=True)
    assert meets_slos(exact, parse_goodput(["ttft:250", "tpot:250", "e2el:500"]))  # <= holds at equality
    assert not meets_slos(exact, parse_goodput(["ttft:249"]))


def test_compare_ratios_and_table():
    a = summarize(_recorded_run(), 1.0)
    b = summarize(_recorded_run(), 2.0)
    r = report.ratios({"a": a, "b": b})
    assert r["b"]["output_throughput"] == pytest.approx(0.5) and r["b"]["mean_ttft_ms"] == pytest.approx(1.0)
    table = report.format_compare({"a": a, "b": b})
    assert "b/a" in table and "0.50x" in table


def test_normalize_base_url():
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert normalize_base_url("https://h/api/v1") == "https://h/api/v1"
    with pytest.raises(ValueError):
        normalize_base_url("h:8000")


# ------------------------------------------------------------------ stream parsing (no server)
def _sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def _send(handler) -> RequestRecord:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            rec = RequestRecord(0, 3, 2)
            await send_one(client, "http://x/v1/completions", {"prompt": [1, 2, 3]}, rec, 0.0)
            return rec
    return asyncio.run(go())


def test_send_one_parses_the_stream():
    seen = {}

    def handler(request):
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, content=_sse(
            {"choices": [{"index": 0, "text": "Hel", "finish_reason": None}], "usage": None},
            {"choices": [{"index": 0, "text": "", "finish_reason": None}], "usage": None},  # no token: ignored
            {"choices": [{"index": 0, "text": "lo", "finish_reason": "length"}], "usage": None},
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                                      "prompt_tokens_details": {"cached_tokens": 0}}},
            b"[DONE]"), headers={"content-type": "text/event-stream"})

    rec = _send(handler)
    assert seen["body"] == {"prompt": [1, 2, 3]}
    assert rec.success and rec.error == "" and rec.generated_text == "Hello" and rec.finish_reason == "length"
    assert len(rec.chunk_times) == 2 and (rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens) == (3, 2, 0)
    assert rec.ttft is not None and rec.e2el >= rec.ttft


@pytest.mark.parametrize("response,error", [
    (lambda: httpx.Response(429, json={"error": {"message": "at capacity", "type": "x"}}), "HTTP 429: at capacity"),
    (lambda: httpx.Response(200, content=_sse({"choices": [{"text": "a"}]}, {"error": {"message": "worker died"}},
                                              b"[DONE]")), "stream error: worker died"),
    (lambda: httpx.Response(200, content=_sse({"choices": [{"text": "a"}]})), "without [DONE]"),
])
def test_send_one_records_failures(response, error):
    rec = _send(lambda request: response())
    assert not rec.success and error in rec.error and rec.end_time is not None


def test_send_one_records_connection_errors():
    def handler(request):
        raise httpx.ConnectError("refused", request=request)

    rec = _send(handler)
    assert not rec.success and rec.error.startswith("ConnectError")


# ------------------------------------------------------------------------- against the stack
def test_bench_against_splitserve_up(http_stack, tmp_path):
    out, png = tmp_path / "result.json", tmp_path / "plot.png"
    cmd = [sys.executable, "-m", "splitserve.launch.cli", "bench", "--base-url", http_stack.http_base,
           "--dataset", "random", "--input-len", "24", "--output-len", "4", "--num-prompts", "4",
           "--request-rate", "inf", "--seed", "1", "--goodput", "ttft:600000", "--no-progress",
           "--result-json", str(out), "--plot", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TTFT" in proc.stdout and "requests completed" in proc.stdout
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert (s["completed"], s["failed"]) == (4, 0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (4 * 24, 4 * 4)
    assert s["good_requests"] == 4 and s["request_throughput"] > 0 and s["mean_ttft_ms"] > 0
    assert len(doc["requests"]) == 4
    for r in doc["requests"]:
        assert r["success"] and (r["prompt_tokens"], r["completion_tokens"]) == (24, 4), r
        assert r["finish_reason"] == "length" and 1 <= len(r["chunk_times"]) <= 4 and r["ttft"] <= r["e2el"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_reports_the_speculative_acceptance_of_the_run(two_prefill_stack, tmp_path):
    """The shared two-prefill stack's decode worker speculates (n-gram): with --metrics-url, bench
    reads its spec_decode counters before and after and reports the run's share."""
    stack, out = two_prefill_stack, tmp_path / "result.json"
    cmd = [sys.executable, "-m", "splitserve.launch.cli", "bench", "--base-url", stack.http_base,
           "--dataset", "prefix-repetition", "--prefix-len", "32", "--input-len", "8", "--output-len", "24",
           "--num-prompts", "3", "--seed", "2", "--no-progress", "--result-json", str(out),
           "--goodput", "ttft:600000", "--metrics-url", stack.metrics["decode-0"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "speculative draft tokens" in proc.stdout and "speculative acceptance rate" in proc.stdout
    lines = proc.stdout.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("good requests"))) + 1 == \
        lines.index(next(x for x in lines if x.startswith("goodput")))
    s = json.loads(out.read_text())["summary"]
    assert 0 <= s["spec_decode_accepted_tokens"] <= s["spec_decode_draft_tokens"]
    if s["spec_decode_draft_tokens"]:
        assert s["spec_decode_acceptance_rate"] == s["spec_decode_accepted_tokens"] / s["spec_decode_draft_tokens"]
    bad = subprocess.run(cmd[:-1] + ["http://127.0.0.1:9/metrics"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--metrics-url http://127.0.0.1:9/metrics" in bad.stderr
