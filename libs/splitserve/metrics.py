"""Prometheus metrics of every role (DESIGN.md "Metrics"), and the HTTP endpoint that serves them.

Every series is named `splitserve_<name>` and carries the labels `model_name` and `role`
(gateway | prefill | decode | kvstore); counters get prometheus-client's `_total` suffix. One
`Metrics` per process, on its own registry (tests build several in one process).

Who records what (each number counted once, where it happens):
- gateway: the request-level histograms (TTFT, inter-token latency, end-to-end, queue, prefill,
  decode), prompt/generation tokens of finished requests, successes by finish reason, rejections by
  reason, routing decisions, and requests running (in progress) and waiting (not yet routed).
- prefill / decode workers: their engine's view: prompt tokens computed (prefill) or tokens
  generated (decode), prefix-cache queries and hits (tokens), preemptions, running and waiting
  requests, KV-cache usage, batch size, KV transfer (bytes, seconds, failures) on their side, and
  with speculative decoding on, its proposals (spec_decode_*: drafts, draft tokens, accepted tokens,
  accepted tokens by position).
- kvstore: KV transfer bytes and seconds per direction (put = in, get = out), failures, and
  its usage of capacity as kv_cache_usage_perc.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

# No `<name>_created` series: they double the output and carry nothing a scraper needs (the process
# start is in every counter's reset). Process-wide in prometheus-client, which is what we want.
prometheus_client.disable_created_metrics()

PREFIX = "splitserve_"
ROLES = ("gateway", "prefill", "decode", "kvstore", "colocated")

# the speculative-decoding counters (vLLM's names, after the prefix): short name, help, extra labels
SPEC_DECODE_SERIES = (
    ("num_drafts", "proposals verified (one sequence's run of proposed tokens in a step).", ()),
    ("num_draft_tokens", "tokens proposed.", ()),
    ("num_accepted_tokens", "proposed tokens the model agreed with (<= draft tokens).", ()),
    ("num_accepted_tokens_per_pos", "accepted tokens by position in the proposal (0 = first).", ("position",)),
)

# Buckets in seconds: from a fast CPU token (ms) to a long prefill on a busy machine (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 10.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _observer(histogram: str) -> Callable[["Metrics", float], None]:
    """A Metrics method that records one observation, in seconds, in the named histogram."""

    def observe(self: "Metrics", seconds: float) -> None:
        self._l(getattr(self, histogram)).observe(seconds)

    return observe


class Metrics:
    """The DESIGN.md series for one process. Label values `model_name` and `role` are bound here;
    the per-series extra labels are finished_reason, reason, (target, reason) and direction."""

    def __init__(self, role: str, model_name: str = "", registry: CollectorRegistry | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        self.role = role
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        base = ("model_name", "role")
        r = self.registry
        self._series: dict[str, object] = {}  # short name -> metric (for touch)

        def hist(name, doc, buckets=LATENCY_BUCKETS, extra=()):
            self._series[name] = Histogram(PREFIX + name, doc, base + extra, registry=r, buckets=buckets)
            return self._series[name]

        def counter(name, doc, extra=()):
            self._series[name] = Counter(PREFIX + name, doc, base + extra, registry=r)
            return self._series[name]

        def gauge(name, doc):
            self._series[name] = Gauge(PREFIX + name, doc, base, registry=r)
            return self._series[name]

        self._ttft = hist("time_to_first_token_seconds", "Arrival at the gateway to the first token sent.")
        self._itl = hist("inter_token_latency_seconds", "Time between two consecutive output tokens.", ITL_BUCKETS)
        self._e2e = hist("e2e_request_latency_seconds", "Arrival to the last token of a finished request.")
        self._queue = hist("request_queue_time_seconds", "Arrival to the start of prefill (gateway) or of the "
                           "first engine step (workers).")
        self._prefill = hist("request_prefill_time_seconds", "Time in prefill: the prefill call (gateway) or "
                             "first engine step to first token (workers).")
        self._decode = hist("request_decode_time_seconds", "First token to last token.")
        self._kv_seconds = hist("kv_transfer_seconds", "Duration of one KV transfer call (put or get).",
                                TRANSFER_BUCKETS, ("direction",))
        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens: of finished requests (gateway), "
                                      "computed or taken from the prefix cache (prefill).")
        self._generation_tokens = counter("generation_tokens", "Output tokens produced.")
        self._success = counter("request_success", "Requests finished, by finish reason.", ("finished_reason",))
        self._rejected = counter("requests_rejected", "Requests refused or failed, by reason.", ("reason",))
        self._prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self._prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self._preemptions = counter("num_preemptions", "Sequences preempted (to be recomputed) for lack of KV blocks.")
        self._kv_bytes = counter("kv_transfer_bytes", "KV block bytes moved, by direction (put = towards the "
                                 "kvstore, get = from it).", ("direction",))
        self._kv_failures = counter("kv_transfer_failures", "KV transfers that failed (the decode worker "
                                    "recomputes).", ("direction",))
        self._routing = counter("routing_decisions", "Worker choices by the gateway, by target and reason.",
                                ("target", "reason"))
        self._spec = {name: counter("spec_decode_" + name, "Speculative decoding: " + doc, extra)
                      for name, doc, extra in SPEC_DECODE_SERIES}
        self._running = gauge("num_requests_running", "Requests being processed.")
        self._waiting = gauge("num_requests_waiting", "Requests queued, not yet running.")
        self._kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache capacity in use, 0 to 1.")
        self._batch = gauge("batch_size", "Sequences in the last engine step.")
        self._fetch_buffer = gauge("kv_fetch_buffer_bytes", "Decode: fetched KV payloads held before import.")
        self._redis_up = gauge("redis_up", "Gateway: 1 while the ownership Redis answers its periodic PING, else 0 "
                               "(absent without Redis).")
        self._labels = {"model_name": model_name, "role": role}
        self._collect_hooks: list[Callable[[], None]] = []
        self._hook_lock = threading.Lock()
        self._totals: dict[str, int] = {}  # last cumulative values seen by sync_totals
        self._totals_lock = threading.Lock()

    def set_model_name(self, model_name: str) -> None:
        """The gateway learns its model from the workers after it starts: series recorded from then
        on carry the name (none are recorded before)."""
        self.model_name = model_name
        self._labels = {"model_name": model_name, "role": self.role}

    def _l(self, metric, **extra):
        return metric.labels(**self._labels, **extra)

    def touch(self, *names: str, **extra: str) -> None:
        """Creates the named series (short names, e.g. "prompt_tokens") at zero with this process's
        labels plus `extra` (e.g. direction="put"), so they are exported from the first scrape: a
        counter that first appears at 1 loses that increase in Prometheus' rate()."""
        for name in names:
            metric = self._series.get(name)
            if metric is None:
                raise ValueError(f"unknown series {name!r}; known: {', '.join(sorted(self._series))}")
            wanted = set(metric._labelnames) - {"model_name", "role"}
            if wanted != set(extra):
                raise ValueError(f"series {name!r} takes the extra labels {sorted(wanted)}, got {sorted(extra)}")
            self._l(metric, **extra)

    # ---------------------------------------------------------------- recording (thread-safe)
    observe_ttft = _observer("_ttft")
    observe_itl = _observer("_itl")
    observe_e2e = _observer("_e2e")
    observe_queue = _observer("_queue")
    observe_prefill = _observer("_prefill")
    observe_decode = _observer("_decode")

    def add_prompt_tokens(self, n: int) -> None:
        if n:
            self._l(self._prompt_tokens).inc(n)

    def add_generation_tokens(self, n: int) -> None:
        if n:
            self._l(self._generation_tokens).inc(n)

    def success(self, finished_reason: str) -> None:
        self._l(self._success, finished_reason=finished_reason or "unknown").inc()

    def rejected(self, reason: str) -> None:
        self._l(self._rejected, reason=reason).inc()

    def prefix_cache(self, queries: int, hits: int) -> None:
        if queries:
            self._l(self._prefix_queries).inc(queries)
        if hits:
            self._l(self._prefix_hits).inc(hits)

    def preempted(self, n: int = 1) -> None:
        if n:
            self._l(self._preemptions).inc(n)

    def kv_transfer(self, direction: str, nbytes: int, seconds: float) -> None:
        self._l(self._kv_bytes, direction=direction).inc(nbytes)
        self._l(self._kv_seconds, direction=direction).observe(seconds)

    def kv_transfer_failed(self, direction: str) -> None:
        self._l(self._kv_failures, direction=direction).inc()

    def routed(self, target: str, reason: str) -> None:
        self._l(self._routing, target=target, reason=reason).inc()

    def set_load(self, running: int | None = None, waiting: int | None = None,
                 kv_cache_usage: float | None = None, batch_size: int | None = None) -> None:
        if running is not None:
            self._l(self._running).set(running)
        if waiting is not None:
            self._l(self._waiting).set(waiting)
        if kv_cache_usage is not None:
            self._l(self._kv_usage).set(kv_cache_usage)
        if batch_size is not None:
            self._l(self._batch).set(batch_size)

    def set_fetch_buffer(self, nbytes: int) -> None:
        self._l(self._fetch_buffer).set(nbytes)

    def set_redis_up(self, up: bool) -> None:
        self._l(self._redis_up).set(1 if up else 0)

    def sync_totals(self, prefix_cache_queries: int | None = None, prefix_cache_hits: int | None = None,
                    num_preemptions: int | None = None) -> None:
        """Advances counters the engine keeps itself as cumulative totals (prefix-cache tokens,
        preemptions) by what they grew since the last call, so the engine needs no metrics hook in
        its step loop. A total below the last one (its source was replaced) only sets the new base:
        the exported counters never go down."""
        with self._totals_lock:
            deltas = {}
            for name, total in (("prefix_cache_queries", prefix_cache_queries),
                                ("prefix_cache_hits", prefix_cache_hits), ("num_preemptions", num_preemptions)):
                if total is None:
                    continue
                last = self._totals.get(name, 0)
                deltas[name] = total - last if total >= last else 0
                self._totals[name] = total
            self.prefix_cache(deltas.get("prefix_cache_queries", 0), deltas.get("prefix_cache_hits", 0))
            self.preempted(deltas.get("num_preemptions", 0))

    def sync_spec_decode(self, num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int,
                         accepted_per_pos: list[int]) -> None:
        """The speculative-decoding counters from the engine's cumulative totals (as sync_totals)."""
        totals = {f"spec_decode_{name}": (self._spec[name], {}, total) for name, total in
                  (("num_drafts", num_drafts), ("num_draft_tokens", num_draft_tokens),
                   ("num_accepted_tokens", num_accepted_tokens))}
        for pos, n in enumerate(accepted_per_pos):
            totals[f"spec_decode_num_accepted_tokens_per_pos/{pos}"] = (
                self._spec["num_accepted_tokens_per_pos"], {"position": str(pos)}, n)
        with self._totals_lock:
            for name, (metric, extra, total) in totals.items():
                last = self._totals.get(name, 0)
                self._totals[name] = total
                if total > last:
                    self._l(metric, **extra).inc(total - last)

    def on_collect(self, hook: Callable[[], None]) -> None:
        """Runs `hook` before every scrape (to refresh gauges from live state); its errors are logged."""
        with self._hook_lock:
            self._collect_hooks.append(hook)

    # --------------------------------------------------------------------------- exposition
    def render(self) -> bytes:
        """The text exposition format of every series (after the collect hooks ran)."""
        with self._hook_lock:
            hooks = list(self._collect_hooks)
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("metrics collect hook failed")
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes every few seconds would flood the log
        pass


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request, client_address):  # one thread per scrape
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def _handle(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


class MetricsServer:
    """`GET /metrics` (and `/`) on host:port in a background thread; port 0 picks a free one."""

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 0) -> None:
        self.metrics = metrics

        def app(environ, start_response):
            path = environ.get("PATH_INFO", "/")
            if path not in ("/", "/metrics"):
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"not found: the metrics are at /metrics\n"]
            body = metrics.render()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
            return [body]

        try:
            self._server = make_server(host, port, app, server_class=_ThreadingWSGIServer,
                                       handler_class=_QuietHandler)
        except OSError as e:
            raise OSError(f"cannot bind the metrics server to {host}:{port}: {e}") from None
        self.host = host
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and frees the port (also when never started; a second call does nothing)."""
        if self._thread.is_alive():  # shutdown() would wait forever for a loop that never ran
            self._server.shutdown()
        self._server.server_close()


__all__ = ["Metrics", "MetricsServer", "ROLES"]
