"""Prometheus metrics (DESIGN.md "Metrics"): the Metrics series and labels, the /metrics HTTP
endpoint, the kvstore's transfer accounting in-process, and one `splitserve up` stack whose worker
and kvstore series are checked against requests with known token counts."""
from __future__ import annotations

import hashlib
import re
import socket
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from splitserve.transfer import block as kv_block
from splitserve.engine.kv_cache import KVCache
from splitserve.kvstore.client import KVStoreClient
from splitserve.metrics import Metrics, MetricsServer
from splitserve.services.kvstore.server import serve
from splitserve.config.kvstore import KVStoreConfig

DIMS = dict(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)  # 32 KiB per block (float32)


# ------------------------------------------------------------------------------------ helpers
def parse(text: str) -> list[tuple[str, dict, float]]:
    """(sample name, labels, value) of every sample of an exposition."""
    return [(s.name, dict(s.labels), s.value)
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def scrape(url: str) -> list[tuple[str, dict, float]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(resp.read().decode())


def scrape_until(url: str, name: str, value: float, timeout_s: float = 10.0, **labels):
    """A scrape in which total(name, labels) has reached `value` (the last one after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if total(samples, name, **labels) >= value or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def assert_labelled(samples, role: str, model_name: str | None = None) -> None:
    assert samples, "no samples at all"
    for name, labels, _ in samples:
        assert name.startswith("splitserve_"), name
        assert not name.endswith("_created"), f"{name}: _created series must be disabled"
        assert labels.get("role") == role, f"{name} {labels}: role must be {role!r}"
        assert "model_name" in labels, f"{name} {labels}: no model_name label"
        if model_name is not None:
            assert labels["model_name"] == model_name, f"{name} {labels}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ Metrics
def test_every_series_named_and_labelled():
    m = Metrics("gateway", "tiny-model")
    m.observe_ttft(0.1)
    m.observe_itl(0.01)
    m.observe_e2e(1.0)
    m.observe_queue(0.001)
    m.observe_prefill(0.2)
    m.observe_decode(0.8)
    m.add_prompt_tokens(7)
    m.add_generation_tokens(5)
    m.success("stop")
    m.rejected("invalid")
    m.prefix_cache(32, 16)
    m.preempted(2)
    m.kv_transfer("put", 1000, 0.003)
    m.kv_transfer_failed("get")
    m.routed("prefill-0", "prefix")
    m.set_load(running=3, waiting=1, kv_cache_usage=0.25, batch_size=4)
    samples = parse(m.render().decode())
    assert_labelled(samples, "gateway", "tiny-model")
    names = {n for n, _, _ in samples}
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
                 "kv_transfer_seconds"):
        assert {f"splitserve_{hist}_{s}" for s in ("bucket", "count", "sum")} <= names, hist
    for counter in ("prompt_tokens", "generation_tokens", "request_success", "requests_rejected",
                    "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "kv_transfer_bytes",
                    "kv_transfer_failures", "routing_decisions"):
        assert f"splitserve_{counter}_total" in names, counter
    m.set_fetch_buffer(4096)
    samples = parse(m.render().decode())
    names = {n for n, _, _ in samples}
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "batch_size",
                  "kv_fetch_buffer_bytes"):
        assert f"splitserve_{gauge}" in names, gauge
    assert total(samples, "splitserve_kv_fetch_buffer_bytes") == 4096
    assert total(samples, "splitserve_prompt_tokens_total") == 7
    assert total(samples, "splitserve_request_success_total", finished_reason="stop") == 1
    assert total(samples, "splitserve_requests_rejected_total", reason="invalid") == 1
    assert total(samples, "splitserve_kv_transfer_bytes_total", direction="put") == 1000
    assert total(samples, "splitserve_kv_transfer_seconds_count", direction="put") == 1
    assert total(samples, "splitserve_kv_transfer_failures_total", direction="get") == 1
    assert total(samples, "splitserve_routing_decisions_total", target="prefill-0", reason="prefix") == 1
    assert total(samples, "splitserve_kv_cache_usage_perc") == 0.25
    assert total(samples, "splitserve_batch_size") == 4


def test_role_is_checked():
    with pytest.raises(ValueError, match="role must be one of"):
        Metrics("router")


def test_touch_exports_zero_series_and_checks_names():
    m = Metrics("decode", "tiny-model")
    m.touch("generation_tokens", "prefix_cache_hits")
    m.touch("kv_transfer_bytes", "kv_transfer_seconds", direction="get")
    samples = parse(m.render().decode())
    assert ("splitserve_generation_tokens_total", {"model_name": "tiny-model", "role": "decode"}, 0.0) in samples
    assert total(samples, "splitserve_kv_transfer_seconds_count", direction="get") == 0
    assert any(n == "splitserve_kv_transfer_bytes_total" and lab.get("direction") == "get" for n, lab, _ in samples)
    with pytest.raises(ValueError, match="unknown series 'tokens'"):
        m.touch("tokens")
    with pytest.raises(ValueError, match="extra labels"):
        m.touch("kv_transfer_bytes")


def test_sync_totals_exports_deltas_and_never_goes_down():
    m = Metrics("prefill", "tiny-model")
    m.sync_totals(prefix_cache_queries=100, prefix_cache_hits=32, num_preemptions=1)
    m.sync_totals(prefix_cache_queries=150, prefix_cache_hits=32, num_preemptions=3)
    m.sync_totals(prefix_cache_queries=10, prefix_cache_hits=0, num_preemptions=0)  # source replaced
    m.sync_totals(prefix_cache_queries=15)
    samples = parse(m.render().decode())
    assert total(samples, "splitserve_prefix_cache_queries_total") == 155
    assert total(samples, "splitserve_prefix_cache_hits_total") == 32
    assert total(samples, "splitserve_num_preemptions_total") == 3


def test_spec_decode_counters_follow_the_engine_totals():
    m = Metrics("decode", "tiny-model")
    m.sync_spec_decode(3, 12, 7, [3, 2, 1, 1])
    m.sync_spec_decode(5, 20, 9, [5, 2, 1, 1])
    m.sync_spec_decode(1, 4, 4, [1, 1, 1, 1])  # source replaced: sets the base only
    samples = parse(m.render().decode())
    assert_labelled(samples, "decode", "tiny-model")
    assert total(samples, "splitserve_spec_decode_num_drafts_total") == 5
    assert total(samples, "splitserve_spec_decode_num_draft_tokens_total") == 20
    assert total(samples, "splitserve_spec_decode_num_accepted_tokens_total") == 9
    assert total(samples, "splitserve_spec_decode_num_accepted_tokens_per_pos_total", position="0") == 5
    assert total(samples, "splitserve_spec_decode_num_accepted_tokens_per_pos_total", position="3") == 1


def test_collect_hooks_run_before_each_render_and_failures_are_contained():
    m = Metrics("kvstore")
    calls = []
    m.on_collect(lambda: calls.append(1) or m.set_load(kv_cache_usage=len(calls) / 10))
    m.on_collect(lambda: 1 / 0)  # logged, the scrape still answers
    for expected in (0.1, 0.2):
        assert total(parse(m.render().decode()), "splitserve_kv_cache_usage_perc") == pytest.approx(expected)


# ------------------------------------------------------------------------------------ MetricsServer
def test_metrics_server_serves_404s_elsewhere_and_frees_its_port():
    m = Metrics("prefill", "tiny-model")
    m.add_prompt_tokens(3)
    server = MetricsServer(m, "127.0.0.1", 0).start()
    port = server.port
    assert server.url == f"http://127.0.0.1:{port}/metrics"
    try:
        samples = scrape(server.url)
        assert_labelled(samples, "prefill", "tiny-model")
        assert total(samples, "splitserve_prompt_tokens_total") == 3
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert err.value.code == 404
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    MetricsServer(m, "127.0.0.1", port).stop()  # the port is free again (a restart can take it back)


def test_metrics_server_bind_error_names_the_address_and_unstarted_stop_returns():
    m = Metrics("decode")
    first = MetricsServer(m, "127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=f"cannot bind the metrics server to 127.0.0.1:{first.port}"):
            MetricsServer(m, "127.0.0.1", first.port)
    finally:
        first.stop()  # never started: must not wait for a serving loop
    first.stop()


# ------------------------------------------------------------------------------------ kvstore
def _blocks(n: int, seed: int) -> list[tuple[kv_block.BlockHeader, bytes]]:
    cache = KVCache(**DIMS, num_blocks=n, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for t in cache.k_caches + cache.v_caches:
        t.copy_(torch.randn(t.shape, generator=g))
    return [kv_block.encode_block(cache, i, hashlib.sha256(uuid.uuid4().bytes).digest(), "test-model")
            for i in range(n)]


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_kvstore_counts_bytes_and_calls(tmp_path, transport):
    server = serve(KVStoreConfig(port=0, metrics_port=0, capacity_gb=0.01, max_workers=4,
                                 shm_dir=str(tmp_path) if transport == "shm" else ""))
    client = KVStoreClient(server.address, use_shm=transport == "shm")
    try:
        assert client.transport == transport
        assert server.metrics_url.startswith("http://127.0.0.1:")
        before = scrape(server.metrics_url)
        assert_labelled(before, "kvstore", "")
        assert total(before, "splitserve_kv_transfer_bytes_total") == 0
        assert total(before, "splitserve_kv_cache_usage_perc") == 0

        first, second = _blocks(3, seed=1), _blocks(2, seed=2)
        client.put(first, lease_id="r1", lease_ttl_s=30)
        client.put(second)
        client.put(first[:1])  # already present: its payload still crossed the wire
        got = client.get([h.block_hash for h, _ in first])
        assert [bytes(p) for _, p in got] == [p for _, p in first]  # bytes, or a mapping (same host)
        partial = client.get([second[0][0].block_hash, b"\x01" * 32])
        assert len(partial) == 1  # stops at the missing one

        # A streamed Get the client breaks off at the missing block is recorded when the server's
        # side of the stream ends, which may be just after the client returned.
        after = scrape_until(server.metrics_url, "splitserve_kv_transfer_seconds_count", 2, direction="get")
        assert_labelled(after, "kvstore", "")
        size = len(first[0][1])
        assert total(after, "splitserve_kv_transfer_bytes_total", direction="put") == 6 * size
        assert total(after, "splitserve_kv_transfer_seconds_count", direction="put") == 3
        assert total(after, "splitserve_kv_transfer_bytes_total", direction="get") == 4 * size
        assert total(after, "splitserve_kv_transfer_seconds_count", direction="get") == 2
        assert total(after, "splitserve_kv_transfer_seconds_sum", direction="get") > 0
        assert total(after, "splitserve_kv_transfer_failures_total") == 0
        stats = server.store.stats()
        assert total(after, "splitserve_kv_cache_usage_perc") == pytest.approx(stats.used_bytes / stats.capacity_bytes)
        assert total(after, "splitserve_kv_cache_usage_perc") > 0

        # A damaged block is rejected: one failed put, no bytes counted for it.
        header, payload = _blocks(1, seed=3)[0]
        with pytest.raises(grpc.RpcError) as err:
            client.put([(header, payload[:-1] + bytes([payload[-1] ^ 1]))])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        failed = scrape(server.metrics_url)
        assert total(failed, "splitserve_kv_transfer_failures_total", direction="put") == 1
        assert total(failed, "splitserve_kv_transfer_bytes_total", direction="put") == 6 * size
        assert total(failed, "splitserve_kv_transfer_seconds_count", direction="put") == 3
    finally:
        client.close()
        server.stop(grace_s=0)
    # stop() freed the metrics port
    MetricsServer(Metrics("kvstore"), "127.0.0.1", int(server.metrics_url.rsplit(":", 1)[1].split("/")[0])).stop()


def test_kvstore_metrics_port_config():
    off = serve(KVStoreConfig(port=0, metrics_port=-1, capacity_gb=0.01, max_workers=2, shm_dir=""))
    try:
        assert off.metrics_server is None and off.metrics_url == ""
    finally:
        off.stop(grace_s=0)
    with pytest.raises(ValueError, match="metrics_port must be in"):
        KVStoreConfig(metrics_port=-2)
    port = free_port()
    fixed = serve(KVStoreConfig(port=0, metrics_port=port, capacity_gb=0.01, max_workers=2, shm_dir=""))
    try:
        assert fixed.metrics_url == f"http://127.0.0.1:{port}/metrics"
        with pytest.raises(OSError, match=f"cannot bind the metrics server to 127.0.0.1:{port}"):
            serve(KVStoreConfig(port=0, metrics_port=port, capacity_gb=0.01, max_workers=2, shm_dir=""))
    finally:
        fixed.stop(grace_s=0)


def test_worker_config_checks_metrics_port():
    from splitserve.config.worker import WorkerConfig

    assert WorkerConfig().metrics_port == 0
    WorkerConfig(metrics_port=-1)
    with pytest.raises(ValueError, match="metrics_port must be in"):
        WorkerConfig(metrics_port=70000)


# ------------------------------------------------------------------------------------ one stack
_METRICS_LINE = re.compile(r"^  (\S+) metrics  (http://127\.0\.0\.1:\d+/metrics)$")


@pytest.fixture(scope="module")
def stack(http_stack):
    """The session's `splitserve up` (conftest.py), shared with the other end-to-end tests: every
    check below compares scrapes taken before and after its own requests."""
    return http_stack


def _delta(after, before, name, **labels):
    return total(after, name, **labels) - total(before, name, **labels)


def test_stack_worker_and_kvstore_series(stack):
    from services_fixture import start_long_stream
    from splitserve.client import generate
    from splitserve.rpc import channel
    from splitserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

    printed = dict(m.groups() for m in map(_METRICS_LINE.match, stack.log) if m)  # the stable format
    assert printed == stack.metrics and set(printed) == {"gateway", "kvstore", "prefill-0", "decode-0"}, stack.log
    http_port = int(stack.metrics["gateway"].split(":")[2].split("/")[0])
    assert stack.http_base == f"http://127.0.0.1:{http_port}/v1"
    model_id = stack.prefill_load().model_id
    urls = {name: stack.metrics[name] for name in ("prefill-0", "decode-0", "kvstore")}
    before = {name: scrape(url) for name, url in urls.items()}

    # N requests with known lengths: ignore_eos makes every completion exactly max_tokens long.
    prompts = [
        "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz",
        "Photosynthesis converts light energy into chemical energy; in the chloroplasts of green plants",
        "A short guide to sourdough bread: feed the starter the night before, then mix flour and water",
    ]
    max_tokens = [2, 5, 9]
    usage = []
    for prompt, n in zip(prompts, max_tokens):
        _, _, final = generate(stack.gateway, prompt=prompt, timeout_s=120,
                               sampling={"max_tokens": n, "temperature": 0.0, "ignore_eos": True})
        assert final.usage.completion_tokens == n
        usage.append((final.usage.prompt_tokens, final.usage.completion_tokens))
    N = len(usage)
    assert all(p >= 16 for p, _ in usage), "each prompt must fill a block for the KV transfer"
    after = {name: scrape(url) for name, url in urls.items()}
    pre_b, pre_a = before["prefill-0"], after["prefill-0"]
    dec_b, dec_a = before["decode-0"], after["decode-0"]
    kv_b, kv_a = before["kvstore"], after["kvstore"]
    assert_labelled(pre_a, "prefill", model_id)
    assert_labelled(dec_a, "decode", model_id)
    assert_labelled(kv_a, "kvstore", "")

    # prefill: the whole prompt and one token per request, all answered with the 1-token run's reason
    assert _delta(pre_a, pre_b, "splitserve_prompt_tokens_total") == sum(p for p, _ in usage)
    assert _delta(pre_a, pre_b, "splitserve_generation_tokens_total") == N
    assert _delta(pre_a, pre_b, "splitserve_request_success_total", finished_reason="length") == N
    assert _delta(pre_a, pre_b, "splitserve_request_queue_time_seconds_count") == N
    assert _delta(pre_a, pre_b, "splitserve_request_prefill_time_seconds_count") == N
    assert _delta(pre_a, pre_b, "splitserve_prefix_cache_queries_total") == sum(p for p, _ in usage)
    # decode: the rest of each completion, k tokens streamed -> k - 1 inter-token gaps
    assert _delta(dec_a, dec_b, "splitserve_generation_tokens_total") == sum(c for _, c in usage) - N
    assert _delta(dec_a, dec_b, "splitserve_request_success_total", finished_reason="length") == N
    assert _delta(dec_a, dec_b, "splitserve_inter_token_latency_seconds_count") == sum(max(0, c - 2) for _, c in usage)
    assert _delta(dec_a, dec_b, "splitserve_inter_token_latency_seconds_sum") > 0
    assert _delta(dec_a, dec_b, "splitserve_request_decode_time_seconds_count") == N
    assert _delta(dec_a, dec_b, "splitserve_request_queue_time_seconds_count") == N
    assert _delta(dec_a, dec_b, "splitserve_prefix_cache_hits_total") == sum(16 * (p // 16) for p, _ in usage)
    assert _delta(dec_a, dec_b, "splitserve_requests_rejected_total") == 0
    # KV transfer: what the prefill worker put is what the kvstore took, and the same for get
    put = _delta(pre_a, pre_b, "splitserve_kv_transfer_bytes_total", direction="put")
    got = _delta(dec_a, dec_b, "splitserve_kv_transfer_bytes_total", direction="get")
    assert put > 0 and got > 0
    assert _delta(kv_a, kv_b, "splitserve_kv_transfer_bytes_total", direction="put") == put
    assert _delta(kv_a, kv_b, "splitserve_kv_transfer_bytes_total", direction="get") == got
    assert _delta(pre_a, pre_b, "splitserve_kv_transfer_seconds_count", direction="put") == N
    assert _delta(dec_a, dec_b, "splitserve_kv_transfer_seconds_count", direction="get") == N
    assert _delta(kv_a, kv_b, "splitserve_kv_transfer_seconds_count", direction="put") == N
    assert _delta(kv_a, kv_b, "splitserve_kv_transfer_seconds_count", direction="get") == N
    assert total(kv_a, "splitserve_kv_cache_usage_perc") > 0
    # idle gauges
    for samples in (pre_a, dec_a):
        assert total(samples, "splitserve_num_requests_running") == 0
        assert total(samples, "splitserve_num_requests_waiting") == 0
        assert total(samples, "splitserve_batch_size") == 0
        assert 0 <= total(samples, "splitserve_kv_cache_usage_perc") < 1

    # Refusals and failures, straight at the workers.
    with pytest.raises(grpc.RpcError) as err:
        list(prefill_pb2_grpc.PrefillStub(channel(stack.roles["prefill-0"])).Prefill(
            prefill_pb2.PrefillRequest(request_id="empty", prompt_token_ids=[]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    orphan = list(range(1000, 1040))  # no worker holds these blocks; the kvstore is unreachable
    msgs = list(decode_pb2_grpc.DecodeStub(channel(stack.roles["decode-0"])).Decode(decode_pb2.DecodeRequest(
        request_id="orphan", prompt_token_ids=orphan, output_token_ids=[7], kvstore_address="127.0.0.1:1",
        sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)), timeout=60))
    assert msgs[0].recomputed and msgs[-1].finish_reason == "length"
    stream = start_long_stream(stack.gateway, "Tell me a very long story about a lighthouse keeper.")
    stream.close()  # cancels the call: the decode worker counts an abort
    dec_c = scrape_until(urls["decode-0"], "splitserve_requests_rejected_total",
                         total(dec_a, "splitserve_requests_rejected_total", reason="abort") + 1, 30, reason="abort")
    pre_c = scrape(urls["prefill-0"])
    assert _delta(pre_c, pre_a, "splitserve_requests_rejected_total", reason="invalid") == 1
    assert _delta(dec_c, dec_a, "splitserve_kv_transfer_failures_total", direction="get") == 1
    assert _delta(dec_c, dec_a, "splitserve_requests_rejected_total", reason="abort") == 1
    assert _delta(dec_c, dec_a, "splitserve_request_success_total") == 1  # the orphan finished
    assert_labelled(pre_c, "prefill", model_id)
    assert_labelled(dec_c, "decode", model_id)


def test_stack_gateway_metrics_endpoint(stack):
    """The gateway serves its own series on its HTTP port, labelled like every other role's."""
    samples = scrape(stack.metrics["gateway"])
    assert_labelled(samples, "gateway")
