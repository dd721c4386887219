"""Serving benchmark: the disaggregated stack (`splitserve up`) against the engine in one process.

Part 1, requests. At each --concurrency level, --rounds batches of that many concurrent requests,
each with its own prompt of exactly --prompt-len token ids (no two prompts share a first block, so
no prefix-cache hits anywhere; nothing is disabled) and --output-len new tokens (temperature 0,
ignore_eos). Per system:
  colocated      the engine in one process (`LLM(...).engine`): a batch is added at once, then
                 stepped until done; TTFT and token times are stamped as the step outputs appear.
                 Runs in its own child process (this script with the hidden `--worker colocated`),
                 which takes one batch at a time over its stdin.
  disaggregated  `splitserve up` (gateway, 1 prefill worker, 1 decode worker, kvstore, Redis, each
                 its own process); one client thread per request calls Gateway/Generate with the
                 token ids; TTFT is measured at the client (time to the first streamed message),
                 the gateway's own timings (queue, prefill call, TTFT) are reported beside it.
Both are started before the first round and stay up; their rounds alternate (colocated first on
even rounds, the stack first on odd ones) and never overlap, so a change of the machine's speed
during the run (other tenants, thermal) hits both systems alike.
Output tok/s = all output tokens of a batch / wall time of the batch (first send to last token),
summed over the rounds. Target (from the issue): disaggregated TTFT at 1 request <= 1.2x colocated.

Part 2, KV transfer. --kv-mib of KV blocks of the default model's shape (30 layers, 3 KV heads,
head dim 64, block size 16, --dtype: 360 KiB a block in bfloat16; random contents, unique 32-byte
hashes) are put into a kvstore (one streaming Put under a lease) and read back (one streaming Get
that releases the lease), --kv-reps times; next to a plain loopback gRPC stream of the same number
of bytes (a generic-handler service sending raw bytes messages, no protobuf, same message-size
limits as splitserve.rpc), both directions. GB/s are 1e9 bytes of payload per second. Target: KV
transfer >= 1 GB/s (checked on the slower of put and get, median of the reps).

The full default run is long on a small CPU; validate it first with tiny settings:
  .venv/bin/python benchmarks/bench_services.py --prompt-len 40 --output-len 4 --concurrency 1,2 \
      --rounds 1 --kv-mib 8
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # bench_engine: the prompt text generator and the CPU helpers
sys.path.insert(0, os.path.join(REPO, "tests"))  # services_fixture.start_stack (imported when used)

from bench_engine import cpu_busy_seconds, cpu_model, make_text  # noqa: E402

RESULT_MARKER = "@@BENCH_RESULT@@ "
TARGET_TTFT_RATIO = 1.2  # disaggregated / colocated mean TTFT at concurrency 1
TARGET_KV_GBPS = 1.0  # kvstore put and get, 1e9 bytes/s
BLOCK_SIZE = 16  # tokens per KV block (the engine's and the launcher's default)
# The default model's KV shape (SmolLM2-135M): layers, KV heads, head dim.
KV_SHAPE = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}
PLAIN_SERVICE = "/splitserve.bench.Plain/"
MiB = 1 << 20


# ----------------------------------------------------------------------------- small helpers
def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in [0, 1]); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def proc_tree_cpu(root_pid: int) -> float:
    """CPU seconds (user + system) of `root_pid` and all its live descendants, from /proc."""
    parent, cpu = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue
        pid = int(name)
        parent[pid] = int(rest[1])  # fields: state ppid ... utime(14) stime(15)
        cpu[pid] = (int(rest[11]) + int(rest[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """Wall time of a timed region, CPUs the system under test kept busy (`sut_cpu()` before and
    after), and CPUs everything else on the machine kept busy meanwhile (/proc/stat minus that)."""

    def __init__(self, sut_cpu=own_cpu) -> None:
        self.sut_cpu = sut_cpu
        self.seconds = self.sut_seconds = self.other_seconds = 0.0

    def __enter__(self) -> "CpuMeter":
        self._t, self._sut, self._busy = time.perf_counter(), self.sut_cpu(), cpu_busy_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t
        sut, busy = self.sut_cpu() - self._sut, cpu_busy_seconds() - self._busy
        self.seconds += wall
        self.sut_seconds += sut
        self.other_seconds += max(0.0, busy - sut)

    def summary(self) -> dict:
        w = self.seconds or float("nan")
        return {"sut_cpus": self.sut_seconds / w, "other_cpus": self.other_seconds / w}


# ----------------------------------------------------------------------------- prompts (parent)
def build_prompts(model: str | None, count: int, prompt_len: int, seed: int) -> list[list[int]]:
    """`count` prompts of exactly `prompt_len` token ids from seeded pseudo-English, cut with the
    model's tokenizer; no two share their first block (so no prefix-cache hit between them)."""
    from pathlib import Path

    from splitserve.model.loader import default_model_path
    from splitserve.model.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(model).expanduser() if model else default_model_path())
    rng = random.Random(seed)
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < count:
        text, ids = "", []
        while len(ids) < prompt_len:
            text += (" " if text else "") + make_text(rng, prompt_len)
            ids = tok.encode(text)
        ids = ids[:prompt_len]
        key = tuple(ids[:BLOCK_SIZE])
        if key in seen:
            continue
        seen.add(key)
        out.append(ids)
    return out


def build_job(args: argparse.Namespace) -> dict:
    n_warm = 2
    total = n_warm + args.rounds * sum(args.concurrency)
    t0 = time.perf_counter()
    prompts = build_prompts(args.model, total, args.prompt_len, args.seed)
    log(f"{total} prompts of {args.prompt_len} tokens built in {time.perf_counter() - t0:.1f}s")
    it = iter(prompts)
    warmup = [next(it) for _ in range(n_warm)]
    levels = [{"concurrency": c, "rounds": [[next(it) for _ in range(c)] for _ in range(args.rounds)]}
              for c in args.concurrency]
    return {"model": args.model, "dtype": args.dtype, "kv_cache_memory_gb": args.kv_cache_memory_gb,
            "threads": args.colocated_threads, "output_len": args.output_len, "warmup": warmup,
            "warmup_output_len": min(4, args.output_len), "levels": levels}


def batch_stats(requests: list[dict], wall_s: float) -> dict:
    """Aggregates per-request records ({ttft_s, end_s, num_tokens}, times from the batch start)."""
    ttft = [r["ttft_s"] for r in requests]
    tpot = [(r["end_s"] - r["ttft_s"]) / (r["num_tokens"] - 1) for r in requests if r["num_tokens"] > 1]
    return {"ttft_s": ttft, "tpot_s": tpot, "output_tokens": sum(r["num_tokens"] for r in requests),
            "wall_s": wall_s}


def level_summary(concurrency: int, batches: list[dict], meter: CpuMeter, output_len: int) -> dict:
    ttft = [t for b in batches for t in b["ttft_s"]]
    tpot = [t for b in batches for t in b["tpot_s"]]
    tokens = sum(b["output_tokens"] for b in batches)
    wall = sum(b["wall_s"] for b in batches)
    expected = concurrency * len(batches) * output_len
    if tokens != expected:
        raise RuntimeError(f"concurrency {concurrency}: {tokens} output tokens, expected {expected}")
    return {
        "concurrency": concurrency, "requests": len(ttft), "rounds": len(batches),
        "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p90_s": percentile(ttft, 0.9), "tpot_mean_s": statistics.fmean(tpot) if tpot else float("nan"),
        "output_tokens": tokens, "seconds": wall, "tok_s": tokens / wall, **meter.summary(),
        "ttft_all_s": ttft,
    }


# ----------------------------------------------------------------------------- colocated (child)
def colocated_worker() -> None:
    """The child process of the colocated system: loads the engine, then runs one batch per JSON
    line read from stdin ({"prompts": [...], "n": N}) and answers each with a marked JSON line;
    an empty line (or EOF) ends it with the engine's totals."""
    import torch

    job = json.loads(sys.stdin.readline())
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    from splitserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], kv_cache_memory_gb=job["kv_cache_memory_gb"])
    load_s = time.perf_counter() - t0
    engine = llm.engine
    counter = iter(range(10**9))
    reply = lambda obj: print(RESULT_MARKER + json.dumps(obj), flush=True)  # noqa: E731
    reply({"load_seconds": load_s, "threads": torch.get_num_threads(), "model_path": str(engine.model_path)})
    for line in sys.stdin:
        if not line.strip():
            break
        cmd = json.loads(line)
        params = SamplingParams(temperature=0, max_tokens=cmd["n"], ignore_eos=True)
        ids = [f"coloc-{next(counter)}" for _ in cmd["prompts"]]
        first: dict[str, float] = {}
        end: dict[str, float] = {}
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        start = time.perf_counter()
        for rid, p in zip(ids, cmd["prompts"]):
            engine.add_request(rid, p, params)
        while engine.has_unfinished():
            for out in engine.step():
                now = time.perf_counter()
                if out.new_token_ids and out.request_id not in first:
                    first[out.request_id] = now
                tokens[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    end[out.request_id] = now
        wall = time.perf_counter() - start
        reqs = [{"ttft_s": first[r] - start, "end_s": end[r] - start, "num_tokens": len(tokens[r])} for r in ids]
        reply({"stats": batch_stats(reqs, wall), "tokens": [tokens[r] for r in ids]})
    reply({"prefix_cache_hits": engine.block_manager.stats.hits,
           "num_preemptions": engine.scheduler.num_preemptions})


class Colocated:
    """The engine in one process (a child running `colocated_worker`), driven batch by batch."""

    name = "colocated"

    def __init__(self, job: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "colocated"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=os.environ | {"TQDM_DISABLE": "1"})
        self._send(job)
        self.info = self._reply()

    def _send(self, obj) -> None:
        self.proc.stdin.write((json.dumps(obj) if obj is not None else "") + "\n")
        self.proc.stdin.flush()

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARKER):
                return json.loads(line[len(RESULT_MARKER):])
            if line.strip():
                print(f"[colocated stdout] {line.rstrip()}", file=sys.stderr)
        raise SystemExit(f"the colocated child exited (code {self.proc.wait()}); see its output above")

    def cpu(self) -> float:
        return proc_tree_cpu(self.proc.pid)

    def batch(self, prompts: list[list[int]], n: int) -> tuple[dict, list[list[int]], dict]:
        self._send({"prompts": prompts, "n": n})
        r = self._reply()
        return r["stats"], r["tokens"], {}

    def finish(self) -> dict:
        self._send(None)
        totals = self._reply()
        self.proc.wait(60)
        return {"system": "colocated", **self.info, **totals}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- disaggregated
class Stack:
    """`splitserve up` (1 prefill, 1 decode worker), driven over Gateway/Generate batch by batch."""

    name = "disaggregated"

    def __init__(self, args: argparse.Namespace) -> None:
        from services_fixture import start_stack

        from splitserve.rpc import channel

        flags = ["--dtype", args.dtype, "--prefill-workers", "1", "--decode-workers", "1",
                 "--kv-cache-memory-gb", str(args.kv_cache_memory_gb)]
        if args.model:
            flags += ["--model", args.model]
        if args.stack_torch_threads:
            flags += ["--torch-threads", str(args.stack_torch_threads)]
        self.args = args
        t0 = time.perf_counter()
        self.stack = start_stack(*flags, timeout_s=args.startup_timeout_s)
        self.startup_s = time.perf_counter() - t0
        log(f"stack up in {self.startup_s:.1f}s: gateway {self.stack.gateway}, {self.stack.roles}")
        self.channel = channel(self.stack.gateway)
        self.before = _stack_counters(self.stack)

    def cpu(self) -> float:
        return proc_tree_cpu(self.stack.proc.pid) + own_cpu()  # the stack and this client

    def _one(self, ids: list[int], n: int, barrier: threading.Barrier) -> dict:
        from splitserve.client import stream_generate

        barrier.wait()
        sent = time.perf_counter()
        first, tokens, final = None, [], None
        for msg in stream_generate(self.stack.gateway, token_ids=ids, channel=self.channel, timeout_s=600.0,
                                   sampling={"temperature": 0.0, "max_tokens": n, "ignore_eos": True}):
            now = time.perf_counter()
            if msg.token_ids and first is None:
                first = now
            tokens.extend(msg.token_ids)
            if msg.finish_reason:
                final = msg
        end = time.perf_counter()
        if final is None:
            raise RuntimeError("the gateway ended a stream without a finish reason")
        t = final.timings
        return {"sent": sent, "first": first, "end": end, "tokens": tokens,
                "gateway": {"ttft_s": t.ttft_s, "queue_s": t.queue_s, "prefill_s": t.prefill_s,
                            "decode_s": t.decode_s, "e2e_s": t.e2e_s},
                "cached_tokens": final.usage.cached_tokens}

    def batch(self, prompts: list[list[int]], n: int) -> tuple[dict, list[list[int]], dict]:
        barrier = threading.Barrier(len(prompts))
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            rs = list(pool.map(lambda p: self._one(p, n, barrier), prompts))
        start = min(r["sent"] for r in rs)
        wall = max(r["end"] for r in rs) - start
        # TTFT from each request's own send; token times from the batch start (as colocated,
        # where every request of the batch is added at the same instant).
        reqs = [{"ttft_s": r["first"] - r["sent"], "end_s": r["end"] - r["sent"], "num_tokens": len(r["tokens"])}
                for r in rs]
        extra = {"gateway": [r["gateway"] for r in rs], "cached_tokens": sum(r["cached_tokens"] for r in rs)}
        return batch_stats(reqs, wall), [r["tokens"] for r in rs], extra

    def finish(self) -> dict:
        after = _stack_counters(self.stack)
        counters = {k: after[k] - self.before.get(k, 0) for k in after}
        self.kill()
        return {"system": "disaggregated", "startup_seconds": self.startup_s, "counters": counters,
                "threads": _stack_threads(self.args)}

    def kill(self) -> None:
        if self.stack.proc.poll() is None:
            code = self.stack.stop()
            log(f"stack stopped (exit code {code})")


def run_requests(args: argparse.Namespace, job: dict) -> tuple[dict | None, dict | None]:
    """Both systems alive at once, their rounds interleaved (colocated first on even rounds, the
    stack first on odd ones), so a drift of the machine's speed during the run hits both alike.
    Only one system runs at any instant; the idle one only waits on its sockets and pipes."""
    systems: list = []
    try:
        if not args.skip_colocated:
            log("colocated: the engine in a child process")
            systems.append(Colocated(job))
        if not args.skip_stack:
            log("disaggregated: starting `splitserve up`")
            systems.append(Stack(args))
        for system in systems:
            system.batch(job["warmup"], job["warmup_output_len"])
        levels = {s.name: [] for s in systems}
        outputs = {s.name: [] for s in systems}
        for level in job["levels"]:
            meters = {s.name: CpuMeter(s.cpu) for s in systems}
            batches = {s.name: [] for s in systems}
            outs = {s.name: [] for s in systems}
            extras = {s.name: [] for s in systems}
            for r, prompts in enumerate(level["rounds"]):
                for system in (systems if r % 2 == 0 else systems[::-1]):
                    with meters[system.name]:
                        stats, toks, extra = system.batch(prompts, job["output_len"])
                    batches[system.name].append(stats)
                    outs[system.name].append(toks)
                    extras[system.name].append(extra)
            for system in systems:
                s = level_summary(level["concurrency"], batches[system.name], meters[system.name], job["output_len"])
                if system.name == "disaggregated":
                    gw = [g for e in extras[system.name] for g in e["gateway"]]
                    s["gateway"] = {k: statistics.fmean(g[k] for g in gw) for k in gw[0]}  # means, seconds
                    s["cached_tokens"] = sum(e["cached_tokens"] for e in extras[system.name])
                levels[system.name].append(s)
                outputs[system.name].append(outs[system.name])
                log(f"{system.name} concurrency {s['concurrency']}: TTFT mean {s['ttft_mean_s'] * 1e3:.0f} ms, "
                    f"{s['tok_s']:.1f} out tok/s")
        results = {s.name: {**s.finish(), "levels": levels[s.name], "outputs": outputs[s.name]} for s in systems}
    finally:
        for system in systems:
            system.kill()
    return results.get("colocated"), results.get("disaggregated")


def _stack_counters(stack) -> dict:
    """Load counters of the workers (cumulative): blocks put, imported, recomputed prompts..."""
    p, d = stack.prefill_load(), stack.decode_load()
    return {"prefill_blocks_put": p.num_blocks_put, "decode_imported_blocks": d.num_imported_blocks,
            "decode_recomputed": d.num_recomputed, "prefill_prompt_tokens": p.prompt_tokens_computed,
            "decode_prompt_tokens": d.prompt_tokens_computed, "decode_preemptions": d.num_preemptions,
            "decode_max_batch": d.max_batch_size}


def _stack_threads(args: argparse.Namespace) -> int:
    return args.stack_torch_threads or (os.cpu_count() or 1)  # the launcher's default: all cores, shared


# ----------------------------------------------------------------------------- KV transfer
def start_plain_server():
    """A loopback gRPC server with raw-bytes methods (generic handlers, identity serializers) and
    splitserve.rpc's message-size limits: Download(total, size) streams `total` bytes in messages
    of `size`; Upload counts the bytes of a client stream."""
    import grpc

    from splitserve import rpc

    def download(request: bytes, context):
        total, size = struct.unpack("<QQ", request)
        buf = os.urandom(size)
        sent = 0
        while sent < total:
            n = min(size, total - sent)
            yield buf if n == size else buf[:n]
            sent += n

    def upload(request_iterator, context):
        return struct.pack("<Q", sum(len(m) for m in request_iterator))

    server, port = rpc.create_server("127.0.0.1", 0)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("splitserve.bench.Plain", {
        "Download": grpc.unary_stream_rpc_method_handler(download),
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
    }),))
    server.start()
    return server, f"127.0.0.1:{port}"


def start_kv_servers(capacity_gb: float):
    from splitserve.services.kvstore.server import serve
    from splitserve.config.kvstore import KVStoreConfig

    kv = serve(KVStoreConfig(host="127.0.0.1", port=0, capacity_gb=capacity_gb))
    plain, plain_address = start_plain_server()
    return kv, plain, {"kvstore": kv.address, "plain": plain_address}


def run_kv_server_child(capacity_gb: float) -> None:
    """`--worker kvserver`: both servers in this process until stdin closes."""
    kv, plain, addresses = start_kv_servers(capacity_gb)
    print(RESULT_MARKER + json.dumps(addresses), flush=True)
    sys.stdin.read()  # the parent closes it when done
    plain.stop(0)
    kv.stop(grace_s=0)


def run_kv(args: argparse.Namespace) -> dict:
    import grpc
    import torch

    from splitserve import rpc
    from splitserve.transfer.block import encode_block, import_block
    from splitserve.engine.kv_cache import KVCache
    from splitserve.kvstore.client import CHUNK_BYTES, KVStoreClient

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    block_bytes = KVCache.block_nbytes(KV_SHAPE["num_layers"], KV_SHAPE["num_kv_heads"], KV_SHAPE["head_dim"],
                                       BLOCK_SIZE, dtype)
    n_blocks = max(1, math.ceil(args.kv_mib * MiB / block_bytes))
    total = n_blocks * block_bytes
    pool = min(n_blocks, args.kv_pool_blocks)
    capacity_gb = (2 * total + 64 * MiB) / (1 << 30)  # a rep's blocks stay pinned until its get
    torch.manual_seed(args.seed)
    src = KVCache(**KV_SHAPE, block_size=BLOCK_SIZE, num_blocks=pool, dtype=dtype)
    for k, v in src.layers:
        k.normal_()
        v.normal_()
    dst = KVCache(**KV_SHAPE, block_size=BLOCK_SIZE, num_blocks=pool, dtype=dtype)
    model_id = "bench-kv"

    child = None
    if args.kv_server == "process":
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "kvserver",
                                  "--kv-capacity-gb", repr(capacity_gb)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline()
        if not line.startswith(RESULT_MARKER):
            child.kill()
            raise SystemExit(f"the kv server child did not start: {line!r}")
        addresses, servers = json.loads(line[len(RESULT_MARKER):]), None
    else:
        kv, plain, addresses = start_kv_servers(capacity_gb)
        servers = (kv, plain)
    client = KVStoreClient(addresses["kvstore"], timeout_s=600.0)  # same host: the shared-memory path
    streams = KVStoreClient(addresses["kvstore"], timeout_s=600.0, use_shm=False)  # what another host gets
    ch = rpc.channel(addresses["plain"])
    download = ch.unary_stream(PLAIN_SERVICE + "Download")
    upload = ch.stream_unary(PLAIN_SERVICE + "Upload")
    per_call = args.kv_blocks_per_call or n_blocks
    rates: dict[str, list[float]] = {k: [] for k in ("encode", "put", "get", "put_grpc", "get_grpc", "import",
                                                       "plain_up_1mib",
                                                       "plain_down_1mib", "plain_down_block")}

    def plain_down(size: int) -> float:
        t = time.perf_counter()
        got = sum(len(m) for m in download(struct.pack("<QQ", total, size), timeout=600))
        dt = time.perf_counter() - t
        if got != total:
            raise RuntimeError(f"plain download returned {got} bytes, expected {total}")
        return total / dt / 1e9

    def plain_up(size: int) -> float:
        buf = os.urandom(size)

        def msgs():
            sent = 0
            while sent < total:
                n = min(size, total - sent)
                yield buf if n == size else buf[:n]
                sent += n
        t = time.perf_counter()
        got = struct.unpack("<Q", upload(msgs(), timeout=600))[0]
        dt = time.perf_counter() - t
        if got != total:
            raise RuntimeError(f"plain upload counted {got} bytes, expected {total}")
        return total / dt / 1e9

    try:
        # warm-up: connections, code paths (small, not counted)
        warm = [encode_block(src, i % pool, hashlib.sha256(b"warm%d" % i).digest(), model_id) for i in range(4)]
        client.put(warm)
        client.get([h.block_hash for h, _ in warm])
        sum(len(m) for m in download(struct.pack("<QQ", 4 * MiB, MiB), timeout=60))
        upload(iter([b"x" * MiB] * 4), timeout=60)
        for rep in range(args.kv_reps):
            hashes = [hashlib.sha256(b"bench-kv|%d|%d|%d" % (args.seed, rep, i)).digest() for i in range(n_blocks)]
            t = time.perf_counter()
            blocks = [encode_block(src, i % pool, h, model_id) for i, h in enumerate(hashes)]
            rates["encode"].append(total / (time.perf_counter() - t) / 1e9)
            lease = f"bench-kv-{rep}"
            t = time.perf_counter()
            stored = 0
            for s in range(0, n_blocks, per_call):
                stored += client.put(blocks[s:s + per_call], lease_id=lease, lease_ttl_s=600.0).num_stored
            rates["put"].append(total / (time.perf_counter() - t) / 1e9)
            if stored != n_blocks:
                raise RuntimeError(f"kvstore stored {stored} of {n_blocks} blocks")
            t = time.perf_counter()
            got = []
            for s in range(0, n_blocks, per_call):
                got += client.get(hashes[s:s + per_call], release_lease_id=lease)
            rates["get"].append(total / (time.perf_counter() - t) / 1e9)
            if len(got) != n_blocks or any(bytes(g[1]) != b[1] for g, b in zip(got[:8], blocks[:8])):
                raise RuntimeError(f"kvstore get returned {len(got)} of {n_blocks} blocks or other bytes")
            # The same blocks through the gRPC streams (new hashes: the store has the others).
            moved = [(dataclasses.replace(h, block_hash=hashlib.sha256(b"grpc" + h.block_hash).digest()), p)
                     for h, p in blocks]
            t = time.perf_counter()
            for s in range(0, n_blocks, per_call):
                streams.put(moved[s:s + per_call], lease_id=lease + "-grpc", lease_ttl_s=600.0)
            rates["put_grpc"].append(total / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            got_grpc = []
            for s in range(0, n_blocks, per_call):
                got_grpc += streams.get([h.block_hash for h, _ in moved[s:s + per_call]], release_lease_id=lease + "-grpc")
            rates["get_grpc"].append(total / (time.perf_counter() - t) / 1e9)
            if len(got_grpc) != n_blocks or any(g[1] != b[1] for g, b in zip(got_grpc[:8], moved[:8])):
                raise RuntimeError(f"kvstore stream get returned {len(got_grpc)} of {n_blocks} blocks or other bytes")
            del moved, got_grpc
            t = time.perf_counter()
            for i, (header, payload) in enumerate(got):
                import_block(dst, i % pool, header, payload, model_id, hashes[i])
            rates["import"].append(total / (time.perf_counter() - t) / 1e9)
            del blocks, got
            rates["plain_up_1mib"].append(plain_up(MiB))
            rates["plain_down_1mib"].append(plain_down(MiB))
            rates["plain_down_block"].append(plain_down(block_bytes))
            log(f"kv rep {rep + 1}/{args.kv_reps}: put {rates['put'][-1]:.3f} GB/s, get {rates['get'][-1]:.3f} GB/s "
                f"(streams: {rates['put_grpc'][-1]:.3f} / {rates['get_grpc'][-1]:.3f}), "
                f"plain down {rates['plain_down_1mib'][-1]:.3f} GB/s")
    finally:
        client.close()
        streams.close()
        ch.close()
        if servers is not None:
            servers[1].stop(0)
            servers[0].stop(grace_s=0)
        if child is not None:
            child.stdin.close()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    stats = {k: {"best": max(v), "median": statistics.median(v), "all": v} for k, v in rates.items()}
    return {"block_bytes": block_bytes, "num_blocks": n_blocks, "total_bytes": total, "reps": args.kv_reps,
            "distinct_payloads": pool, "blocks_per_call": per_call, "chunk_bytes": CHUNK_BYTES,
            "server": args.kv_server, "grpc": grpc.__version__, "rates_gbps": stats}


# ----------------------------------------------------------------------------- report
def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.0f}" if s == s else "-"


def report(args: argparse.Namespace, job: dict | None, coloc: dict | None, disagg: dict | None,
           kv: dict | None) -> dict:
    summary: dict = {"ratios": {}, "targets": {}}
    print()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs, {affinity} usable by this process)")
    if coloc or disagg:
        print(f"requests: prompts of {args.prompt_len} tokens (all distinct: no prefix-cache hits), "
              f"{args.output_len} output tokens, temperature 0, ignore_eos, {args.dtype}, "
              f"{args.rounds} round(s) per concurrency level")
        print(f"KV cache: {args.kv_cache_memory_gb} GiB per engine (colocated; each stack worker)")
        if coloc:
            print(f"colocated: the engine in one process, {coloc['threads']} torch thread(s)")
        if disagg:
            print(f"disaggregated: `splitserve up` (gateway, prefill, decode, kvstore, Redis: one process each), "
                  f"{disagg['threads']} torch thread(s) per worker; the client (this process) runs on the same "
                  f"CPUs")
        if coloc and disagg and os.cpu_count() and os.cpu_count() <= 4:
            print(f"NOTE: {os.cpu_count()} cores: the stack's prefill and decode workers share them "
                  f"({disagg['threads']} thread(s) each, idle threads sleep), colocated runs one model on "
                  f"{coloc['threads']} thread(s); when both workers are busy they compete for the same cores")
        print()
        header = (f"{'conc':>4} {'system':<13} {'reqs':>4} {'TTFT mean':>9} {'p50':>6} {'p90':>6} {'TPOT ms':>7} "
                  f"{'out tok':>7} {'seconds':>8} {'out tok/s':>9} {'SUT CPUs':>8} {'other CPUs':>10}")
        print(header + "\n" + "-" * len(header))
        for i, c in enumerate(args.concurrency):
            rows = [(name, res["levels"][i]) for name, res in (("colocated", coloc), ("disaggregated", disagg)) if res]
            for name, s in rows:
                print(f"{c:>4} {name:<13} {s['requests']:>4} {fmt_ms(s['ttft_mean_s']):>9} {fmt_ms(s['ttft_p50_s']):>6} "
                      f"{fmt_ms(s['ttft_p90_s']):>6} {s['tpot_mean_s'] * 1e3:>7.1f} {s['output_tokens']:>7} "
                      f"{s['seconds']:>8.2f} {s['tok_s']:>9.1f} {s['sut_cpus']:>8.2f} {s['other_cpus']:>10.2f}")
            if coloc and disagg:
                a, b = disagg["levels"][i], coloc["levels"][i]
                r = {"ttft_mean": a["ttft_mean_s"] / b["ttft_mean_s"], "ttft_p50": a["ttft_p50_s"] / b["ttft_p50_s"],
                     "ttft_p90": a["ttft_p90_s"] / b["ttft_p90_s"], "tpot": a["tpot_mean_s"] / b["tpot_mean_s"],
                     "tok_s": a["tok_s"] / b["tok_s"]}
                summary["ratios"][str(c)] = r
                print(f"{c:>4} {'disagg/coloc':<13} {'':>4} {r['ttft_mean']:>8.2f}x {r['ttft_p50']:>5.2f}x "
                      f"{r['ttft_p90']:>5.2f}x {r['tpot']:>6.2f}x {'':>7} {'':>8} {r['tok_s']:>8.2f}x")
        print("(TTFT in ms, at the client for the stack; TPOT: mean ms per output token after the first; "
              "out tok/s: output tokens / wall time of the batches; SUT CPUs: CPUs the system under test kept "
              "busy (the stack's process tree plus this client); other CPUs: the rest of the machine)")
        busiest = max([s["other_cpus"] for res in (coloc, disagg) if res for s in res["levels"]] or [0])
        if busiest > 0.2:
            print(f"WARNING: other processes kept up to {busiest:.2f} CPUs busy during the measurements; "
                  f"the numbers are disturbed, rerun on a quiet machine")
        if disagg:
            print()
            for s in disagg["levels"]:
                g = s["gateway"]
                print(f"stack at concurrency {s['concurrency']}, gateway timings (means): queue {fmt_ms(g['queue_s'])} ms, "
                      f"prefill call {fmt_ms(g['prefill_s'])} ms (prefill worker incl. its KV put), TTFT "
                      f"{fmt_ms(g['ttft_s'])} ms vs {fmt_ms(s['ttft_mean_s'])} ms at the client, decode "
                      f"{fmt_ms(g['decode_s'])} ms; cached prompt tokens {s['cached_tokens']}")
            c = disagg["counters"]
            print(f"stack counters over the run (incl. warm-up): blocks put by prefill {c['prefill_blocks_put']}, "
                  f"imported by decode {c['decode_imported_blocks']}, prompts recomputed by decode "
                  f"{c['decode_recomputed']}, decode preemptions {c['decode_preemptions']}, decode max batch "
                  f"{c['decode_max_batch']}; startup {disagg['startup_seconds']:.1f}s (not timed)")
        if coloc:
            print(f"colocated: load {coloc['load_seconds']:.1f}s (not timed), prefix-cache hit tokens "
                  f"{coloc['prefix_cache_hits']}, preemptions {coloc['num_preemptions']}")
        if coloc and disagg:
            same = total = 0
            for lc, ld in zip(coloc["outputs"], disagg["outputs"]):
                for rc, rd in zip(lc, ld):
                    for a, b in zip(rc, rd):
                        total += 1
                        same += a == b
            summary["greedy_agreement"] = same / total if total else None
            print(f"greedy outputs identical in {same} of {total} requests (informative: bf16 results may "
                  f"differ with the thread count)")
    if kv:
        print()
        print(f"KV transfer: {kv['num_blocks']} blocks x {kv['block_bytes']} bytes = {kv['total_bytes'] / MiB:.1f} MiB "
              f"per transfer, {kv['reps']} rep(s); {kv['blocks_per_call']} blocks per put/get call; servers "
              f"{'in this process (threads)' if kv['server'] == 'thread' else 'in a child process'}; grpc {kv['grpc']}")
        r = kv["rates_gbps"]
        names = [("put", "kvstore put, same host (shm)"), ("put_grpc", "kvstore put, gRPC stream"),
                 ("plain_up_1mib", "plain gRPC upload, 1 MiB msgs"),
                 ("get", "kvstore get, same host (shm)"), ("get_grpc", "kvstore get, gRPC stream"),
                 ("plain_down_1mib", "plain gRPC download, 1 MiB msgs"),
                 ("plain_down_block", f"plain gRPC download, {kv['block_bytes'] // 1024} KiB msgs"),
                 ("encode", "encode_block (read_block + xxh3)"), ("import", "import_block (xxh3 + write_block)")]
        header = f"{'transfer':<36} {'best GB/s':>9} {'median GB/s':>11}"
        print(header + "\n" + "-" * len(header))
        for key, label in names:
            print(f"{label:<36} {r[key]['best']:>9.3f} {r[key]['median']:>11.3f}")
        kv_ratio = {"put/plain_up": r["put"]["median"] / r["plain_up_1mib"]["median"],
                    "get/plain_down": r["get"]["median"] / r["plain_down_1mib"]["median"],
                    "put_grpc/plain_up": r["put_grpc"]["median"] / r["plain_up_1mib"]["median"],
                    "get_grpc/plain_down": r["get_grpc"]["median"] / r["plain_down_1mib"]["median"]}
        summary["ratios"]["kv"] = kv_ratio
        print(f"(GB/s = 1e9 payload bytes/s; medians against plain gRPC: shm put {kv_ratio['put/plain_up']:.2f}x, "
              f"get {kv_ratio['get/plain_down']:.2f}x; gRPC-stream put {kv_ratio['put_grpc/plain_up']:.2f}x, "
              f"get {kv_ratio['get_grpc/plain_down']:.2f}x. `splitserve up` takes the shm path; a kvstore on "
              f"another host, the streams. encode and import are the CPU work around a transfer on the "
              f"prefill and decode side)")
    print()
    if coloc and disagg and 1 in args.concurrency:
        ratio = summary["ratios"]["1"]["ttft_mean"]
        verdict = "PASS" if ratio <= TARGET_TTFT_RATIO else "MISS"
        summary["targets"]["ttft_1"] = {"target": TARGET_TTFT_RATIO, "ratio": ratio, "verdict": verdict}
        print(f"target TTFT at 1 request, disaggregated <= {TARGET_TTFT_RATIO}x colocated (mean): {ratio:.2f}x  {verdict}")
    elif coloc or disagg:
        print("target TTFT at 1 request: n/a (needs both systems and concurrency 1)")
    if kv:
        slow = min(kv["rates_gbps"]["put"]["median"], kv["rates_gbps"]["get"]["median"])
        verdict = "PASS" if slow >= TARGET_KV_GBPS else "MISS"
        summary["targets"]["kv"] = {"target_gbps": TARGET_KV_GBPS, "slower_median_gbps": slow, "verdict": verdict}
        print(f"target KV transfer >= {TARGET_KV_GBPS:.1f} GB/s (slower of put/get, median, same-host path): "
              f"{slow:.3f} GB/s  {verdict}")
    return summary


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompt-len", type=int, default=500, help="prompt tokens per request (exact)")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    p.add_argument("--concurrency", default="1,16", help="comma list of concurrent-request levels")
    p.add_argument("--rounds", type=int, default=3, help="batches per concurrency level (fresh prompts each)")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt text and the KV contents")
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.5,
                   help="KV pool of the colocated engine and of each stack worker, GiB")
    p.add_argument("--colocated-threads", type=int, default=0, help="torch threads of the colocated engine "
                   "(0: torch's default, all cores)")
    p.add_argument("--stack-torch-threads", type=int, default=0,
                   help="torch threads per stack worker (0: the launcher splits the cores)")
    p.add_argument("--startup-timeout-s", type=float, default=400.0, help="how long `splitserve up` may take")
    p.add_argument("--kv-mib", type=float, default=256, help="MiB of KV blocks per transfer")
    p.add_argument("--kv-reps", type=int, default=3, help="repetitions of each transfer (best and median shown)")
    p.add_argument("--kv-blocks-per-call", type=int, default=0,
                   help="blocks per put/get call (0: all in one stream; a 500-token prompt is 31 blocks)")
    p.add_argument("--kv-pool-blocks", type=int, default=64,
                   help="distinct random blocks the payloads cycle through (their hashes are all unique)")
    p.add_argument("--kv-server", choices=["thread", "process"], default="thread",
                   help="run the kvstore and the plain server in this process (thread) or in a child process")
    p.add_argument("--skip-stack", action="store_true", help="do not run the disaggregated stack")
    p.add_argument("--skip-colocated", action="store_true", help="do not run the colocated engine")
    p.add_argument("--skip-kv", action="store_true", help="do not measure KV transfer")
    p.add_argument("--json", metavar="FILE", help="write all results here")
    p.add_argument("--worker", choices=["colocated", "kvserver"], help=argparse.SUPPRESS)
    p.add_argument("--kv-capacity-gb", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error(f"--concurrency takes a comma list of integers, got {args.concurrency!r}")
    if not args.concurrency or min(args.concurrency) < 1:
        p.error("--concurrency needs at least one level, each >= 1")
    for name in ("prompt_len", "output_len", "rounds", "kv_reps", "kv_pool_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.kv_mib > 0 or args.kv_blocks_per_call < 0:
        p.error("--kv-mib must be > 0 and --kv-blocks-per-call >= 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker == "colocated":
        colocated_worker()
        return
    if args.worker == "kvserver":
        run_kv_server_child(args.kv_capacity_gb)
        return
    wanted = not (args.skip_stack and args.skip_colocated)
    need_blocks = max(args.concurrency) * math.ceil((args.prompt_len + args.output_len) / BLOCK_SIZE)
    per_block = 2 * BLOCK_SIZE * KV_SHAPE["num_layers"] * KV_SHAPE["num_kv_heads"] * KV_SHAPE["head_dim"] * (
        4 if args.dtype == "float32" else 2)
    have = int(args.kv_cache_memory_gb * (1 << 30)) // per_block
    if wanted and have < need_blocks:
        log(f"WARNING: --kv-cache-memory-gb {args.kv_cache_memory_gb} holds {have} blocks, "
            f"{need_blocks} needed for {max(args.concurrency)} requests of {args.prompt_len}+{args.output_len} "
            f"tokens (default model): expect preemptions")
    job = build_job(args) if wanted else None
    coloc = disagg = kv = None
    if wanted:
        coloc, disagg = run_requests(args, job)
    if not args.skip_kv:
        log("KV transfer")
        kv = run_kv(args)
    summary = report(args, job, coloc, disagg, kv)
    if args.json:
        out = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "kv_capacity_gb")},
               "cpu": cpu_model(), "cpu_count": os.cpu_count(),
               "prompts": {"warmup": job["warmup"], "levels": job["levels"]} if job else None,
               "colocated": coloc, "disaggregated": disagg, "kv": kv} | summary
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
