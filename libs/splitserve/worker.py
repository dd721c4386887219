"""What prefill and decode workers share: config, the engine in its loop thread, load reports,
Redis ownership of the blocks in the worker's prefix cache, Prometheus metrics, and the process
lifecycle.

Metrics: the servicers record per-request series as requests end (tokens, successes, rejections,
latencies, KV transfers); what the engine already counts (prefix-cache tokens, preemptions) and
its load (queues, KV usage, batch size) are read on each scrape, without waiting for the loop
thread, so a scrape never slows a step down and the step loop carries no metrics code.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import grpc

from splitserve import heap, tracing
from splitserve.config.cpus import available_cpus, parse_cpu_list, pin_process, team_cores
from splitserve.config.worker import WorkerConfig
from splitserve.drain import Drain
from splitserve.engine.engine_loop import EngineLoop, QueueFullError, RequestStream
from splitserve.engine.hashing import block_hashes, hash_namespace
from splitserve.engine.llm_engine import LLMEngine, StepOutput
from splitserve.kvstore.client import KVStoreClient
from splitserve.lifeline import SignalFlag
from splitserve.metrics import Metrics, MetricsServer
from splitserve.ownership.membership import WorkerRecord, WorkerRegistration
from splitserve.ownership.registry import OwnershipRegistry, OwnershipReporter, OwnershipUnavailable
from splitserve.rpc import add_health_and_reflection, add_servicer, create_server, format_address, mtls_credentials
from splitserve.sampling_params import SamplingParams
from splitserve.v1 import prefill_pb2

logger = logging.getLogger(__name__)


class Worker:
    """An engine in its loop thread plus what every worker role reports about it."""

    def __init__(self, config: WorkerConfig, role: str) -> None:
        self.config = config
        self.role = role
        heap.limit_arenas()  # before the engine loop's and gRPC's threads
        cpus = parse_cpu_list(config.cpus) if config.cpus else None
        if cpus is not None:
            pin_process(cpus)
        import torch

        threads = config.torch_threads or (len(cpus) if cpus else torch.get_num_threads())
        # Every step runs on the loop thread. The model is loaded on this thread with one torch
        # thread, so that no OpenMP thread team is ever made here: libgomp counts the threads of all
        # teams, and once they outnumber the cores it cuts the spin of idle threads (GOMP_SPINCOUNT)
        # to a throttled 1,000 rounds, so each of the hundreds of small ops of a step waits for its
        # threads to wake from sleep: measured 20% slower prefix hits and decode steps.
        torch.set_num_threads(1)
        self.engine = LLMEngine(config.engine_config())
        self.engine.block_manager.track_evictions = bool(config.redis_url)
        pin = team_cores(config.pin_threads, threads, cpus or available_cpus())
        self.loop = EngineLoop(self.engine, max_pending=config.max_pending, num_threads=threads, pin_cores=pin).start()
        heap.freeze_objects()  # what startup built stays: no full collection walks it again
        self.address = ""  # set by serve() once the port is bound
        self.counters = None  # () -> dict of extra LoadResponse counters, set by the servicer
        self.reporter: OwnershipReporter | None = None
        self.registration: WorkerRegistration | None = None  # in Redis, for gateways to discover
        self.drain = Drain(role)
        self.health = None  # the grpc.health.v1 servicer, set by serve_worker
        self.metrics = Metrics(role, self.engine.model_id)
        self.metrics_server: MetricsServer | None = None  # started by serve_worker unless metrics_port is -1
        self.metrics.touch("generation_tokens", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions")
        if role == "prefill":
            self.metrics.touch("prompt_tokens")
        if self.engine.spec is not None:  # exported from the first scrape, at zero
            self.metrics.touch("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                               "spec_decode_num_accepted_tokens")
            for pos in range(self.engine.spec.config.num_speculative_tokens):
                self.metrics.touch("spec_decode_num_accepted_tokens_per_pos", position=str(pos))
        self.metrics.on_collect(self._refresh_metrics)

    @property
    def worker_id(self) -> str:
        return f"{self.role}:{self.address}"

    def start_ownership(self) -> None:
        if not self.config.redis_url:
            return
        registry = OwnershipRegistry(self.config.redis_url, ttl_s=self.config.ownership_ttl_s)
        self.reporter = OwnershipReporter(
            registry, self.worker_id, self._snapshot, refresh_s=self.config.ownership_ttl_s / 3
        )
        self.reporter.start()

    def start_registration(self) -> None:
        """Registers this worker in Redis under a lease (gateways discover it; splitserve.ownership.membership)."""
        cfg = self.config
        if not cfg.redis_url or not cfg.registration_ttl_s:
            return
        e = self.engine
        record = WorkerRecord(self.role, self.address, e.model_id, e.block_manager.num_blocks,
                              e.config.scheduler.max_num_seqs)
        self.registration = WorkerRegistration(cfg.redis_url, record, cfg.registration_ttl_s).start()

    def begin_drain(self) -> None:
        """Takes no new request from now: health NOT_SERVING, GetLoad and the registration say draining."""
        self.drain.begin()
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        if self.registration is not None:
            self.registration.set_draining()

    def _snapshot(self) -> list[bytes]:
        return self.loop.call(lambda e: e.block_manager.cached_hashes()).result(timeout=30)

    def sync_ownership(self, held: list[bytes]) -> None:
        """Records `held` (now in this worker's prefix cache) and drops what was evicted since."""
        if self.reporter is None:
            return
        evicted = self.loop.call(lambda e: e.block_manager.take_evicted()).result(timeout=30)
        if evicted:
            self.reporter.remove(evicted)
        if held:
            self.reporter.record(held)

    # ----------------------------------------------------------------- what the servicers call
    def prompt_hashes(self, prompt: list[int], cache_salt: str | None) -> list[bytes]:
        """The hashes of a prompt's full blocks under this model's namespace (a pure function of
        the prompt: computed on the calling thread, never taken from a peer)."""
        return block_hashes(prompt, self.engine.config.cache.block_size,
                            hash_namespace(self.engine.model_id, cache_salt or None))

    def num_local_prefix_blocks(self, hashes: list[bytes]) -> int:
        """Leading blocks of `hashes` this worker's prefix cache holds now (asked on the loop thread)."""
        return self.loop.call(lambda e: e.num_local_prefix_blocks(hashes)).result()

    def kvstore_client(self, address: str) -> KVStoreClient:
        """A client of the kvstore at `address`, with this worker's message limit and TLS."""
        return KVStoreClient(address, self.config.max_message_bytes, credentials=self.config.channel_credentials())

    def reject_invalid(self, context: grpc.ServicerContext, exc: Exception) -> None:
        """Ends the call with INVALID_ARGUMENT naming the problem, counted as requests_rejected{invalid}."""
        self.metrics.rejected("invalid")
        abort_invalid(context, exc)

    def admit(self, context: grpc.ServicerContext, request_id: str, prompt: list[int], params: SamplingParams,
              **kwargs) -> RequestStream:
        """Queues a request on the engine loop (kwargs as EngineLoop.add_request) and ties it to the
        call: the caller going away aborts it and frees its blocks. A request the engine refuses
        ends the call: INVALID_ARGUMENT naming the problem, RESOURCE_EXHAUSTED when the queue is full."""
        try:
            stream = self.loop.add_request(request_id, prompt, params, **kwargs)
        except ValueError as exc:
            self.reject_invalid(context, exc)
        except QueueFullError as exc:
            self.metrics.rejected("queue_full")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if not context.add_callback(stream.abort):  # the call already ended: nobody will read the outputs
            stream.abort()
        return stream

    def load(self) -> prefill_pb2.LoadResponse:
        """Read without waiting for the loop thread: the queues as it last published them, and
        counters that are plain ints (a step may be running)."""
        e = self.engine
        q = self.loop.queue_state
        return prefill_pb2.LoadResponse(
            worker_id=self.worker_id, num_running=q.num_running, num_waiting=q.num_waiting,
            queued_tokens=q.queued_tokens, kv_cache_usage=e.block_manager.usage,
            num_free_blocks=e.block_manager.num_free_blocks, num_total_blocks=e.block_manager.num_blocks,
            model_id=e.model_id, block_size=e.config.cache.block_size, max_model_len=e.max_model_len,
            vocab_size=e.model.args.vocab_size, model_path=str(e.model_path), batch_size=e.stats.last_batch_size,
            prefix_cache_queries=e.block_manager.stats.queries, prefix_cache_hits=e.block_manager.stats.hits,
            max_batch_size=e.stats.max_batch_size, num_preemptions=e.scheduler.num_preemptions,
            prompt_tokens_computed=e.stats.prompt_tokens, draining=self.drain.draining, **self.role_counters(),
        )

    def _refresh_metrics(self) -> None:
        """Before each scrape: gauges from the queues the loop thread last published and the block
        manager's plain-int counts (as load() reads them), and the engine's cumulative counters."""
        e = self.engine
        q = self.loop.queue_state
        bm = e.block_manager
        stats = bm.stats
        self.metrics.set_load(running=q.num_running, waiting=q.num_waiting, kv_cache_usage=bm.usage,
                              batch_size=e.stats.last_batch_size if q.num_running else 0)
        self.metrics.sync_totals(prefix_cache_queries=stats.queries, prefix_cache_hits=stats.hits,
                                 num_preemptions=e.scheduler.num_preemptions)
        if e.spec is not None:
            st = e.spec.stats
            self.metrics.sync_spec_decode(st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens,
                                          list(st.accepted_per_pos))

    def observe_engine_times(self, out: StepOutput) -> None:
        """Queue time (arrival at the worker to its first engine step) of a finished request."""
        if out.first_scheduled_time and out.arrival_time:
            self.metrics.observe_queue(max(0.0, out.first_scheduled_time - out.arrival_time))

    @property
    def metrics_url(self) -> str:
        """http://HOST:PORT/metrics, or "" when the endpoint is off (or not started yet)."""
        return self.metrics_server.url if self.metrics_server is not None else ""

    def role_counters(self) -> dict:
        """Role-specific LoadResponse counters (set by the role's servicer)."""
        return self.counters() if self.counters else {}

    def close(self, forget: bool = False) -> None:
        """Stops every thread; with `forget` (a drained worker leaving for good) also deletes its
        registration and its ownership entries: its prefix cache goes with the process."""
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        if self.registration is not None:
            self.registration.stop(deregister=forget)
            self.registration = None
        if self.reporter is not None:
            self.reporter.stop()
            if forget:
                try:
                    self.reporter.registry.clear_owner(self.worker_id)
                except OwnershipUnavailable as exc:  # the entries expire with their TTL instead
                    logger.warning("ownership entries not cleared: owner=%s error=%s", self.worker_id, exc)
        self.loop.stop()


class WorkerServicer:
    """The RPC every worker role answers besides its own: GetLoad, the worker's load report (the
    gateway polls it for routing and health)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def GetLoad(self, request, context):
        return self.worker.load()


class WorkerRole(NamedTuple):
    """What makes a worker process one role: its servicer over the worker, and how that servicer is
    registered on a gRPC server. Each role's shell declares one and exposes its `serve` and `main`."""

    name: str  # "prefill" | "decode" | "colocated": the role label of its metrics and logs
    make_servicer: Callable[[Worker], object]
    add_to_server: Callable[[object, grpc.Server], None]
    services: str | list[str]  # full gRPC service names, for the health service and reflection

    def serve(self, config: WorkerConfig):
        """Loads the engine and serves the role's servicer; returns (server, worker, servicer)."""
        worker = Worker(config, self.name)
        servicer = self.make_servicer(worker)
        server, _ = serve_worker(worker, lambda s: self.add_to_server(servicer, s), self.services)
        return server, worker, servicer

    def main(self, argv: list[str] | None = None) -> int:
        """`splitserve ROLE [flags]`: flags from WorkerConfig, serve until SIGTERM/SIGINT."""
        from splitserve.config.flags import parse_role_args

        config = parse_role_args(WorkerConfig, argv, f"splitserve {self.name}", f"Run one {self.name} worker.")
        server, worker, _ = self.serve(config)
        run_until_signal(server, worker)
        exit_now(0)
        return 0


def servicer_adder(service) -> Callable[[object, grpc.Server], None]:
    """The role's `add_to_server(servicer, server)` for one service of a proto's DESCRIPTOR:
    registers it so that malformed requests are INVALID_ARGUMENT (splitserve.rpc.add_servicer)."""
    return lambda servicer, server: add_servicer(servicer, service, server)


def serve_worker(worker: Worker, add_servicer, service_name: str | list[str]) -> tuple[grpc.Server, int]:
    """Binds, registers the servicer, health and reflection; starts serving and the metrics
    endpoint (unless metrics_port is -1); returns (server, port)."""
    cfg = worker.config
    server_creds, _ = mtls_credentials(cfg.tls_ca_file, cfg.tls_cert_file, cfg.tls_key_file)
    server, port = create_server(cfg.host, cfg.port, max_workers=cfg.grpc_threads,
                                 max_message_bytes=cfg.max_message_bytes, credentials=server_creds)
    if cfg.metrics_port >= 0:
        try:  # bound before serving, so a taken port fails the start-up, not a scrape later
            worker.metrics_server = MetricsServer(worker.metrics, cfg.metrics_host or cfg.host, cfg.metrics_port)
        except OSError:
            server.stop(0)
            raise
    worker.address = cfg.advertise_address or advertised_address(cfg.host, port)
    add_servicer(server)
    names = [service_name] if isinstance(service_name, str) else list(service_name)
    worker.health = add_health_and_reflection(server, names)
    server.start()
    if worker.metrics_server is not None:
        worker.metrics_server.start()
    worker.start_ownership()
    worker.start_registration()
    logger.info("%s worker serving on %s (model %s), metrics %s", worker.role, worker.address,
                worker.engine.model_id, worker.metrics_url or "off")
    return server, port


def advertised_address(host: str, port: int) -> str:
    """host:port where other machines reach a server bound to `host`: a wildcard bind (0.0.0.0, ::)
    is no address to dial, so it advertises this host's own address (what its hostname resolves
    to, else the interface of its default route, else loopback)."""
    if host not in ("0.0.0.0", "::", "", "[::]"):
        return format_address(host, port)
    try:
        ip = socket.gethostbyname(socket.gethostname())
    except OSError:
        ip = ""
    if not ip or ip.startswith("127."):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
                ip = s.getsockname()[0]
        except OSError:
            ip = "127.0.0.1"
    return format_address(ip, port)


def run_until_signal(server: grpc.Server, worker: Worker, grace_s: float = 5.0) -> None:
    """Blocks until SIGTERM/SIGINT, then drains (splitserve.drain) and stops the server."""
    SignalFlag().wait()  # a handler must take no lock (see SignalFlag)
    drain_and_stop(server, worker, grace_s)


def drain_and_stop(server: grpc.Server, worker: Worker, grace_s: float = 5.0) -> None:
    """Takes no new work, lets running calls finish within drain_timeout_s, ends the rest with
    UNAVAILABLE (the gateway resumes them elsewhere), then stops the server and the worker."""
    timeout_s = worker.config.drain_timeout_s
    logger.info("%s worker draining: calls=%d drain_timeout_s=%g", worker.role, worker.drain.num_calls, timeout_s)
    worker.begin_drain()
    if not worker.drain.wait_idle(timeout_s):
        handed = worker.drain.expire()
        logger.warning("%s worker drain timed out after %g s: handing %d running request(s) back to the gateway",
                       worker.role, timeout_s, handed)
        worker.drain.wait_idle(grace_s)
    logger.info("%s worker drained, shutting down", worker.role)
    start = time.monotonic()
    server.stop(grace_s).wait(grace_s + 1)
    stopped = time.monotonic()
    worker.close(forget=True)
    logger.info("%s worker stopped: server_stop_s=%.2f close_s=%.2f", worker.role, stopped - start,
                time.monotonic() - stopped)


def exit_now(status: int) -> None:
    """Ends a worker process that has drained and closed everything, skipping the interpreter's
    teardown: unloading torch, its OpenMP team and gRPC's threads took 1.7 s on an idle 2-core
    machine and 4-5 s on a loaded one, all of it between the drain's end and the exit that
    `splitserve up` and Kubernetes wait for."""
    tracing.flush()  # the batch of spans not exported yet (no-op when tracing is off)
    logging.shutdown()  # flushes every log handler
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def abort_invalid(context: grpc.ServicerContext, exc: Exception) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def wait_deadline(context: grpc.ServicerContext, limit_s: float = 600.0) -> float:
    """Seconds left before the caller's deadline (at most limit_s; grpc reports no deadline as huge)."""
    remaining = context.time_remaining()
    return limit_s if remaining is None else max(0.0, min(remaining, limit_s))
