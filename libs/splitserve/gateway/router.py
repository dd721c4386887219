"""Routing policy of the gateway: which prefill and which decode worker gets a request.

Pure and synchronous (no gRPC, no Redis): the gateway feeds it load reports and block owners and
asks for a decision. All costs are in units of KV blocks of work.

Prefill (the form NVIDIA Dynamo's KV router uses):

    cost(w) = overlap_weight * uncached_prompt_blocks(w) + queued_tokens(w) / block_size
    uncached_prompt_blocks(w) = ceil(prompt_len / block_size) - hit_blocks(w)

where hit_blocks(w) is the longest leading run of the prompt's full blocks whose Redis owner set
holds w's worker id (a prefix cache only helps from the first block on, so a hole ends the run).

Decode:

    cost(w) = overlap_weight * (num_full_blocks - held_blocks(w))
              + decode_seq_weight * sequences(w) + decode_kv_usage_weight * kv_cache_usage(w)

Candidates are the healthy workers not excluded (already tried for this request). Workers over a
busy threshold are skipped unless every candidate is busy. Ties go to the worker with the fewest
in-flight requests from this gateway, then to the smallest address, so a decision depends only on
the state given. The reason of a decision, in order of precedence:
    "only"      one candidate, nothing excluded;
    "fallback"  off the policy's first choice: every candidate busy, or a retry after a failure;
    "prefix"    the chosen worker holds more leading blocks than some other candidate;
    "load"      otherwise (the load terms decided).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from splitserve.config.gateway import RouterConfig

PREFILL, DECODE = "prefill", "decode"
ROLES = (PREFILL, DECODE)
_COST_DIGITS = 9  # costs equal to 1e-9 blocks tie (float noise must not decide)


class NoWorkerAvailable(RuntimeError):
    """No healthy worker of `role` is left to route to (the gateway answers UNAVAILABLE)."""

    def __init__(self, role: str, detail: str) -> None:
        super().__init__(f"no {role} worker available: {detail}")
        self.role = role


@dataclass
class WorkerState:
    """What the gateway knows of one worker: its last load report and its own in-flight work.

    The load fields are as of the last GetLoad answer; the in-flight counters are this gateway's
    requests sent and not yet answered, which covers the work a stale report cannot show yet.
    """

    address: str
    role: str
    worker_id: str = ""  # "prefill:HOST:PORT" / "decode:HOST:PORT" (the Redis owner id); "" until it answers
    healthy: bool = False  # answered its last poll and no call to it failed since
    draining: bool = False  # said so (GetLoad or its registration): finishes its own work, gets none
    last_error: str = ""
    num_running: int = 0
    num_waiting: int = 0
    queued_tokens: int = 0  # tokens accepted by the worker and not yet computed
    kv_cache_usage: float = 0.0  # 0..1
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    inflight_requests: int = 0  # calls this gateway has open to the worker
    inflight_tokens: int = 0  # prefill: uncached prompt tokens of those calls

    @property
    def routable(self) -> bool:
        """Whether new work may go to it."""
        return self.healthy and not self.draining

    @property
    def effective_queued_tokens(self) -> int:
        """Queued tokens, counting this gateway's in-flight ones when the report lags behind them.
        The max (not the sum): a fresh report already includes most of our in-flight tokens."""
        return max(self.queued_tokens, self.inflight_tokens)

    @property
    def effective_sequences(self) -> int:
        return max(self.num_running + self.num_waiting, self.inflight_requests)


class RouteDecision(NamedTuple):
    worker: WorkerState
    hit_blocks: int  # leading prompt blocks the worker holds (prefix cache or imported blocks)
    cost: float  # in blocks, see the module docstring
    reason: str  # "prefix" | "load" | "only" | "fallback"


def prefix_hit_blocks(owners: Sequence[set[str]], worker_id: str) -> int:
    """Length of the longest leading run of blocks whose owner set contains `worker_id`."""
    if not worker_id:
        return 0
    n = 0
    for block_owners in owners:
        if worker_id not in block_owners:
            break
        n += 1
    return n


class Router:
    """Owns the table of workers (by role and address) and picks one per request.

    Not thread-safe: the gateway calls it from its event loop only. `decisions` counts successful
    picks by (target role, reason) for the `routing_decisions` metric.
    """

    def __init__(self, config: RouterConfig, block_size: int, prefill: Sequence[str], decode: Sequence[str]) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.config = config
        self.block_size = block_size
        self._workers: dict[str, dict[str, WorkerState]] = {PREFILL: {}, DECODE: {}}
        for role, addresses in ((PREFILL, prefill), (DECODE, decode)):
            for address in addresses:
                if address in self._workers[role]:
                    raise ValueError(f"{role} address {address!r} is listed twice")
                self._workers[role][address] = WorkerState(address=address, role=role)
        self.decisions: Counter[tuple[str, str]] = Counter()

    # ------------------------------------------------------------------ worker table
    def workers(self, role: str) -> list[WorkerState]:
        """The workers of `role`, sorted by address."""
        table = self._workers[_check_role(role)]
        return [table[a] for a in sorted(table)]

    def owners_matter(self) -> bool:
        """Whether the prompt's Redis owners can change a decision: some role has two or more
        routable workers. With one of each (`splitserve up`, colocated or not) every pick is that
        worker whatever it holds, and the gateway skips the owners' read (~1 ms of a request)."""
        return any(sum(w.routable for w in table.values()) > 1 for table in self._workers.values())

    def worker(self, role: str, address: str) -> WorkerState:
        return self._workers[_check_role(role)][address]

    def has_worker(self, role: str, address: str) -> bool:
        return address in self._workers[_check_role(role)]

    def add_worker(self, role: str, address: str) -> WorkerState:
        """A worker that joined (discovered): unhealthy until its first good poll."""
        return self._workers[_check_role(role)].setdefault(address, WorkerState(address=address, role=role))

    def remove_worker(self, role: str, address: str) -> None:
        """Forgets a worker that left: its load, health and prefix entries go with it (calls
        already sent to it keep their WorkerState object and end as they would)."""
        self._workers[_check_role(role)].pop(address, None)

    def observe_load(self, role: str, address: str, load) -> WorkerState:
        """Records a GetLoad answer (a LoadResponse or anything with its fields); marks it healthy."""
        w = self.worker(role, address)
        w.worker_id = load.worker_id
        for name in ("num_running", "num_waiting", "queued_tokens", "num_free_blocks", "num_total_blocks"):
            setattr(w, name, int(getattr(load, name)))
        w.kv_cache_usage = float(load.kv_cache_usage)
        w.healthy, w.last_error = True, ""
        w.draining = bool(getattr(load, "draining", False))
        return w

    def observe_failure(self, role: str, address: str, error: str) -> WorkerState:
        """Marks a worker unhealthy (a poll or a call failed); the next good poll heals it."""
        w = self.worker(role, address)
        w.healthy, w.last_error = False, error
        return w

    @staticmethod
    def begin(worker: WorkerState, tokens: int = 0) -> None:
        """Counts a call sent to `worker` (prefill: its uncached prompt tokens) until end()."""
        worker.inflight_requests += 1
        worker.inflight_tokens += tokens

    @staticmethod
    def end(worker: WorkerState, tokens: int = 0) -> None:
        worker.inflight_requests = max(0, worker.inflight_requests - 1)
        worker.inflight_tokens = max(0, worker.inflight_tokens - tokens)

    # ------------------------------------------------------------------ decisions
    def pick_prefill(
        self, block_hashes: Sequence[bytes], owners: Sequence[set[str]], prompt_len: int,
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> RouteDecision:
        """The prefill worker of least cost for a prompt of `prompt_len` tokens whose full blocks
        are `block_hashes` with Redis owner sets `owners` (empty sets when Redis is unavailable).
        `exclude`: addresses already tried for this request. Raises NoWorkerAvailable."""
        self._check_blocks(block_hashes, owners, prompt_len)
        bs, cfg = self.block_size, self.config
        prompt_blocks = -(-prompt_len // bs)  # the partial last block must be computed too

        def score(w: WorkerState) -> tuple[int, float]:
            hit = prefix_hit_blocks(owners, w.worker_id)
            return hit, cfg.overlap_weight * (prompt_blocks - hit) + w.effective_queued_tokens / bs

        def busy(w: WorkerState) -> bool:
            return cfg.busy_queued_tokens > 0 and w.effective_queued_tokens > cfg.busy_queued_tokens

        return self._pick(PREFILL, exclude, score, busy)

    def pick_decode(
        self, block_hashes: Sequence[bytes], owners: Sequence[set[str]], num_tokens: int = 0,
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> RouteDecision:
        """The decode worker of least cost: fewest prompt blocks to import (blocks it already
        holds count as a bonus), fewest sequences, most free KV cache. `num_tokens` (prompt plus
        output so far) makes a worker with fewer free blocks than it needs count as busy."""
        self._check_blocks(block_hashes, owners, max(num_tokens, len(block_hashes) * self.block_size))
        bs, cfg = self.block_size, self.config
        need_blocks = -(-num_tokens // bs)

        def score(w: WorkerState) -> tuple[int, float]:
            held = prefix_hit_blocks(owners, w.worker_id)
            cost = (cfg.overlap_weight * (len(block_hashes) - held) + cfg.decode_seq_weight * w.effective_sequences
                    + cfg.decode_kv_usage_weight * w.kv_cache_usage)
            return held, cost

        def busy(w: WorkerState) -> bool:
            held = prefix_hit_blocks(owners, w.worker_id)
            short = w.num_total_blocks > 0 and w.num_free_blocks < need_blocks - held
            return w.kv_cache_usage >= cfg.decode_busy_kv_usage or short

        return self._pick(DECODE, exclude, score, busy)

    def _pick(self, role: str, exclude, score, busy) -> RouteDecision:
        workers = self._workers[role]
        candidates = [w for a, w in sorted(workers.items()) if w.routable and a not in exclude]
        if not candidates:
            tried = f" ({len(exclude)} tried)" if exclude else ""
            draining = sum(w.draining for w in workers.values())
            detail = "none configured" if not workers else \
                f"none of {len(workers)} is healthy{tried}" + (f" ({draining} draining)" if draining else "")
            raise NoWorkerAvailable(role, detail)
        idle = {w.address for w in candidates if not busy(w)}
        scored = [(w, *score(w)) for w in candidates]  # (worker, hit blocks, cost)
        pool = [s for s in scored if s[0].address in idle] or scored
        best, hit, cost = min(pool, key=lambda s: (round(s[2], _COST_DIGITS), s[0].inflight_requests, s[0].address))
        if len(candidates) == 1 and not any(a in workers for a in exclude):
            reason = "only"
        elif not idle or any(a in workers for a in exclude):
            reason = "fallback"  # off the policy's first choice: all busy, or a retry after a failure
        elif hit > min(s[1] for s in scored):
            reason = "prefix"  # it holds more of the prefix than another candidate
        else:
            reason = "load"
        self.decisions[(role, reason)] += 1
        return RouteDecision(best, hit, cost, reason)

    def _check_blocks(self, block_hashes: Sequence[bytes], owners: Sequence[set[str]], num_tokens: int) -> None:
        if len(owners) != len(block_hashes):
            raise ValueError(f"owners has {len(owners)} entries for {len(block_hashes)} block hashes")
        if len(block_hashes) * self.block_size > num_tokens:
            raise ValueError(f"{len(block_hashes)} full blocks do not fit in {num_tokens} tokens")


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role
