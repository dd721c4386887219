"""splitserve (`splitserve up`) beside llama.cpp's `llama-server`, on the same GGUF file, in one command.

Both are driven through the same client code: the OpenAI-compatible `POST /v1/completions` with
`stream: true`, the prompt given as token ids (the same ids for both; cut by the default model's
tokenizer from seeded pseudo-English), greedy (`temperature: 0`) with `ignore_eos`, and
`cache_prompt: true` (llama-server's prompt cache; splitserve ignores the field, its prefix cache is
always on). Output tokens are counted from the final `usage` chunk (`stream_options.include_usage`),
not from the chunks: a server may hold a partial character back and send two tokens in one chunk.

Workloads, per system, after a warm-up (one request, then --streams concurrent ones, 4 tokens each):
  one stream      --single-requests requests one after the other, --output-len tokens each: decode
                  tok/s = tokens after the first / time from the first chunk to the last (summed over
                  the requests); ITL mean = its inverse, ITL p50 = median gap between chunks;
  N streams       --streams concurrent requests of --output-len tokens, each its own --prompt-len
                  prompt: output tok/s = all output tokens / (last chunk - first send);
  shared prefix   one request of a --prefix-len-token prefix plus --suffix-len (16) tokens warms the
                  cache, then --prefix-requests requests of the same prefix and other --suffix-len
                  tokens each, one after the other, 4 output tokens: hit TTFT = first chunk - send
                  (mean and p50);
  peak RSS        VmHWM of every process of the system (/proc/PID/status), read after the
                  workloads: llama-server's one process; splitserve's gateway, kvstore and workers
                  (the launcher's children) one by one and summed, and the launcher and Redis.
The systems never run at once (the machine has few cores): each round starts one system, runs
every workload, reads its RSS and stops it, then does the same with the next; odd rounds reverse
the order. Figures are medians over --rounds. Ratios are splitserve / llama.cpp.

llama-server runs with `-t 2 -tb 2 -ngl 0 --parallel --streams`, a unified KV cache of
--llama-ctx tokens (default: enough for every stream and the prefix at once) when the binary has
`--kv-unified`, else --parallel times the longest request per slot; splitserve with
`--torch-threads 2` on every worker. How to build llama-server: benchmarks/README.md.

    .venv/bin/python benchmarks/vs_llamacpp.py --llama-server PATH/llama-server
    .venv/bin/python benchmarks/vs_llamacpp.py --streams 4 --output-len 16 --prefix-len 256   # a smoke run
    .venv/bin/python benchmarks/vs_llamacpp.py --llama-server PATH --colocated --up-arg=--quantized-matmul=int8
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_services: prompts, percentiles, CPU meters
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # services_fixture.start_stack

from bench_services import CpuMeter, build_prompts, own_cpu, percentile, proc_tree_cpu

PREFIX_OUTPUT = 4  # output tokens of a prefix request (its TTFT is what is measured)
WARMUP_OUTPUT = 4
LLAMA_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # the default model: layers x (K, V) x kv heads x head dim x f16
TARGETS = {"single_tok_s": 1.0, "streams_tok_s": 2.0, "streams_tok_s_colocated": 2.5, "prefix_ttft_ms": 25.0}
MiB = 1 << 20
QUIET_CPUS = 0.2  # other processes' CPUs above which a measurement is called disturbed
MAX_NUM_SEQS = 64  # the engine's default batch limit: raised only for more streams


def log(msg: str) -> None:
    print(f"[vs-llamacpp] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the client
class Stream(NamedTuple):
    sent: float  # perf_counter seconds
    arrivals: list[float]  # one per chunk that carried text
    tokens: int  # completion tokens (usage)


def _connect(base: str) -> tuple[http.client.HTTPConnection, str]:
    url = urllib.parse.urlsplit(base)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=600), url.path.rstrip("/")


def get_json(base: str, path: str) -> dict:
    conn, prefix = _connect(base)
    try:
        conn.request("GET", prefix + path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {base}{path}: HTTP {resp.status}: {body[:300]!r}")
        return json.loads(body)
    finally:
        conn.close()


def complete(base: str, model: str, prompt: list[int], max_tokens: int, ignore_eos: bool = True) -> Stream:
    """One streamed completion; raises with the server's answer on anything but a full stream (all
    max_tokens with ignore_eos, else up to them)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": ignore_eos,
            "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True}
    conn, prefix = _connect(base)
    try:
        sent = time.perf_counter()
        conn.request("POST", prefix + "/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"POST {base}/completions: HTTP {resp.status}: {resp.read()[:300]!r}")
        arrivals, usage = [], None
        for raw in resp:  # server-sent events: "data: {...}" lines, then "data: [DONE]"
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{base}: error in the stream: {chunk['error']}")
            if any(c.get("text") for c in chunk.get("choices") or ()):
                arrivals.append(time.perf_counter())
            usage = chunk.get("usage") or usage
    finally:
        conn.close()
    if usage is None:
        raise RuntimeError(f"{base}: the stream ended without a usage chunk")
    if not arrivals or usage["completion_tokens"] > max_tokens or (ignore_eos and usage["completion_tokens"] != max_tokens):
        raise RuntimeError(f"{base}: {usage['completion_tokens']} tokens in {len(arrivals)} chunks, "
                           f"{max_tokens} asked for (ignore_eos)")
    return Stream(sent, arrivals, usage["completion_tokens"])


def concurrent(base: str, model: str, prompts: list[list[int]], max_tokens: int,
               ignore_eos: bool = True) -> list[Stream]:
    """All prompts at once (one thread each, released together)."""
    barrier = threading.Barrier(len(prompts))

    def one(p: list[int]) -> Stream:
        barrier.wait()
        return complete(base, model, p, max_tokens, ignore_eos)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(one, prompts))


# ----------------------------------------------------------------------------- processes
def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (the process's peak resident set) in MiB; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _wait_http(base: str, proc: subprocess.Popen, timeout_s: float, logfile: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            get_json(base, "/models")
            conn, _ = _connect(base)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            if ok:
                return
        except (OSError, RuntimeError, ValueError):
            pass
        time.sleep(0.5)
    with open(logfile, errors="replace") as f:
        tail = f.read()[-3000:]
    raise RuntimeError(f"llama-server did not come up (exit code {proc.poll()}):\n{tail}")


class LlamaServer:
    """llama.cpp's server as one child process; its log goes to a temporary file."""

    def __init__(self, args: argparse.Namespace, model_path: str) -> None:
        from splitserve.launch.up import free_port

        self.name = "llama.cpp"
        port = free_port()
        self.base = f"http://127.0.0.1:{port}/v1"
        help_text = subprocess.run([args.llama_server, "--help"], capture_output=True, text=True).stdout
        extra = shlex.split(args.llama_args)
        unified = "--kv-unified" in help_text and not {"--no-kv-unified", "-no-kvu"} & set(extra)
        per_slot = max(args.prompt_len + args.output_len, args.prefix_len + args.suffix_len + PREFIX_OUTPUT)
        # unified: one pool for every slot, all streams at once plus the cached prefix; else each
        # slot gets ctx / parallel and must hold the longest request alone
        need = args.streams * (args.prompt_len + args.output_len) + per_slot if unified else args.streams * per_slot
        self.ctx = args.llama_ctx or max(args.streams * 256, -(-need // 256) * 256)
        cmd = [args.llama_server, "-m", model_path, "-t", str(args.threads), "-tb", str(args.threads),
               "-c", str(self.ctx), "--parallel", str(args.streams), "-ngl", "0", "--host", "127.0.0.1",
               "--port", str(port), *(["--kv-unified"] if unified else []), *extra]
        self.cmd = cmd
        self.logfile = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False).name
        log(f"llama.cpp: {shlex.join(cmd)} (log {self.logfile})")
        with open(self.logfile, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_http(f"http://127.0.0.1:{port}", self.proc, args.startup_timeout_s, self.logfile)
            self.model = get_json(self.base, "/models")["data"][0]["id"]
        except BaseException:
            self.stop()
            raise
        self.kv_mib = self.ctx * LLAMA_KV_BYTES_PER_TOKEN / MiB
        self.pid = self.proc.pid

    def rss(self) -> dict[str, dict]:
        return {"llama-server": {"peak_mib": peak_rss_mib(self.proc.pid), "kv_mib": self.kv_mib, "worker": True}}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_KV_LINE = re.compile(r"engine ready: .*blocks=\d+ x \d+ tokens \(([\d.]+) MiB\)")
WORKER_NAMES = ("gateway", "kvstore", "prefill", "decode", "colocated")


class Splitserve:
    """`splitserve up` (tests/services_fixture.start_stack), with --torch-threads and the extra flags."""

    def __init__(self, args: argparse.Namespace, name: str, extra: list[str]) -> None:
        from services_fixture import start_stack

        self.name = name
        flags = ["--torch-threads", str(args.threads), "--kv-cache-memory-gb", str(args.kv_cache_memory_gb),
                 *(["--max-num-seqs", str(args.streams)] if args.streams > MAX_NUM_SEQS else []), *extra]
        log(f"{name}: splitserve up {shlex.join(flags)}")
        self.stack = start_stack(*flags, timeout_s=args.startup_timeout_s)
        self.base = self.stack.http_base
        self.pid = self.stack.proc.pid  # the launcher: its process tree is the system
        self.model = get_json(self.base, "/models")["data"][0]["id"]

    def rss(self) -> dict[str, dict]:
        from services_fixture import _children

        by_pid = {pid: name for name, pid in self.stack.pids.items()}
        kv = [float(m.group(1)) for line in self.stack.log if (m := _KV_LINE.search(line))]
        out = {"launcher": {"peak_mib": peak_rss_mib(self.stack.proc.pid), "kv_mib": 0.0, "worker": False}}
        # the workers load at once, so their log lines come in any order and name no worker: a pool
        # is attributed only when every worker logged the same size (nan otherwise)
        pool = kv[0] if kv and all(k == kv[0] for k in kv) else float("nan")
        for pid, argv in sorted(_children(self.stack.proc.pid)):
            name = by_pid.get(pid) or next((a for a in argv if a in WORKER_NAMES), None) or \
                ("redis" if any("redis" in a for a in argv[:1]) else os.path.basename(argv[0]) if argv else str(pid))
            is_worker = name.startswith(("prefill", "decode", "colocated"))
            out[name] = {"peak_mib": peak_rss_mib(pid), "kv_mib": pool if is_worker else 0.0, "worker": name != "redis"}
        return out

    def stop(self) -> None:
        code = self.stack.stop()
        if code != 0:
            log(f"{self.name}: `splitserve up` exited with code {code}")


# ----------------------------------------------------------------------------- workloads
class Prompts(NamedTuple):
    warmup: list[list[int]]  # [1 + streams]
    single: list[list[int]]  # [single_requests]
    streams: list[list[int]]  # [streams]
    prefix: list[list[int]]  # [1 + prefix_requests]: the warming request first


def build_all(args: argparse.Namespace) -> Prompts:
    """Every prompt of a round (the same for every system and round), no two sharing a first block
    except the prefix requests, which share exactly their first --prefix-len tokens."""
    n = 1 + args.streams + args.single_requests + args.streams
    plain = build_prompts(args.model, n, args.prompt_len, args.seed)
    prefix = build_prompts(args.model, 1, args.prefix_len, args.seed + 1)[0]
    suffixes = build_prompts(args.model, 1 + args.prefix_requests, args.suffix_len, args.seed + 2)
    w, s = 1 + args.streams, 1 + args.streams + args.single_requests
    return Prompts(plain[:w], plain[w:s], plain[s:], [prefix + x for x in suffixes])


def run_workloads(server, prompts: Prompts, args: argparse.Namespace) -> dict:
    base, model = server.base, server.model
    complete(base, model, prompts.warmup[0], WARMUP_OUTPUT)
    concurrent(base, model, prompts.warmup[1:], WARMUP_OUTPUT)
    decode_s, decode_tokens, gaps, chunks = 0.0, 0, [], 0
    for p in prompts.single:
        r = complete(base, model, p, args.output_len)
        decode_s += r.arrivals[-1] - r.arrivals[0]
        decode_tokens += r.tokens - 1
        gaps += [b - a for a, b in zip(r.arrivals, r.arrivals[1:])]
        chunks += len(r.arrivals)
    rs = concurrent(base, model, prompts.streams, args.output_len)
    wall = max(r.arrivals[-1] for r in rs) - min(r.sent for r in rs)
    complete(base, model, prompts.prefix[0], PREFIX_OUTPUT)  # fills the cache with the prefix
    ttft = [(lambda r: r.arrivals[0] - r.sent)(complete(base, model, p, PREFIX_OUTPUT)) for p in prompts.prefix[1:]]
    return {"single_tok_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
            "single_itl_mean_ms": 1e3 * decode_s / decode_tokens if decode_tokens else float("nan"),
            "single_itl_p50_ms": 1e3 * percentile(gaps, 0.5),
            # 1.0 when every token came in its own chunk (the ITL p50 is then per token)
            "single_tokens_per_chunk": (decode_tokens + len(prompts.single)) / chunks,
            "streams_tok_s": sum(r.tokens for r in rs) / wall,
            "prefix_ttft_mean_ms": 1e3 * statistics.fmean(ttft), "prefix_ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
            "prefix_ttft_all_ms": [1e3 * t for t in ttft]}


def wait_quiet(name: str, sut_cpu, limit_s: float, busy_cpus: float = QUIET_CPUS) -> float:
    """Waits (up to limit_s) until, over one second, processes other than the system under test keep
    fewer than `busy_cpus` CPUs busy; returns what they kept busy in the last second."""
    deadline = time.monotonic() + limit_s
    while True:
        with CpuMeter(sut_cpu) as meter:
            time.sleep(1.0)
        others = meter.summary()["other_cpus"]
        if others < busy_cpus or time.monotonic() >= deadline:
            return others
        log(f"{name}: other processes keep {others:.2f} CPUs busy; waiting for a quiet machine "
            f"(up to {deadline - time.monotonic():.0f}s more)")
        time.sleep(4.0)


def run_round(system: tuple[str, callable], prompts: Prompts, args: argparse.Namespace) -> dict:
    name, start = system
    t0 = time.perf_counter()
    server = start()
    try:
        startup = time.perf_counter() - t0
        # the system's process tree and this client against the whole machine: other tenants show
        sut_cpu = lambda: proc_tree_cpu(server.pid) + own_cpu()
        others = wait_quiet(name, sut_cpu, args.wait_quiet_s)
        log(f"{name}: up in {startup:.1f}s, measuring (others on the machine: {others:.2f} CPUs)")
        meter = CpuMeter(sut_cpu)
        with meter:
            result = run_workloads(server, prompts, args)
        result |= meter.summary()
        result["rss"] = server.rss()
        result["startup_s"] = startup
        if isinstance(server, LlamaServer):
            result["command"] = server.cmd
        log(f"{name}: one stream {result['single_tok_s']:.1f} tok/s, {args.streams} streams "
            f"{result['streams_tok_s']:.1f} tok/s, prefix hit TTFT {result['prefix_ttft_mean_ms']:.1f} ms")
        return result
    finally:
        server.stop()


# ----------------------------------------------------------------------------- report
METRICS = (  # key, label, format, higher is better
    ("single_tok_s", "one stream, decode tok/s", "{:.1f}", True),
    ("single_itl_mean_ms", "one stream, ITL mean ms", "{:.2f}", False),
    ("single_itl_p50_ms", "one stream, ITL p50 ms", "{:.2f}", False),
    ("streams_tok_s", "{streams} streams x {output_len} tokens, out tok/s", "{:.1f}", True),
    ("prefix_ttft_mean_ms", "{prefix_len}-token shared prefix, hit TTFT mean ms", "{:.1f}", False),
    ("prefix_ttft_p50_ms", "{prefix_len}-token shared prefix, hit TTFT p50 ms", "{:.1f}", False),
    ("rss_workers_mib", "peak RSS, serving processes summed, MiB", "{:.0f}", False),
    ("rss_max_worker_minus_kv_mib", "peak RSS of the largest worker minus its KV, MiB", "{:.0f}", False),
)


def summarize(rounds: list[dict]) -> dict:
    """Medians over the rounds; RSS: the highest peak of each process over the rounds."""
    out = {key: statistics.median(r[key] for r in rounds) for key, *_ in METRICS if not key.startswith("rss")}
    rss: dict[str, dict] = {}
    for r in rounds:
        for name, row in r["rss"].items():
            best = rss.setdefault(name, dict(row))
            best["peak_mib"] = max(best["peak_mib"] or 0, row["peak_mib"] or 0)
    out["rss"] = rss
    out["single_tokens_per_chunk"] = statistics.median(r["single_tokens_per_chunk"] for r in rounds)
    out["sut_cpus"] = statistics.median(r["sut_cpus"] for r in rounds)
    out["other_cpus"] = max(r["other_cpus"] for r in rounds)
    serving = {n: row for n, row in rss.items() if row["worker"]}
    out["rss_workers_mib"] = sum(row["peak_mib"] or 0 for row in serving.values())  # None: exited early
    less_kv = [(row["peak_mib"] or 0) - row["kv_mib"] for n, row in serving.items() if n not in ("gateway", "kvstore")]
    out["rss_max_worker_minus_kv_mib"] = max(less_kv) if less_kv and all(map(math.isfinite, less_kv)) else float("nan")
    return out


def report(args: argparse.Namespace, results: dict[str, dict]) -> dict:
    names = list(results)
    ref = results.get("llama.cpp")
    ratios = {n: {} for n in names if n != "llama.cpp"}
    cols = names + [f"{n} / llama.cpp" for n in ratios] if ref else names
    width = max(48, *(len(m[1].format(**vars(args))) for m in METRICS))
    print(f"\n{'workload':<{width}} " + " ".join(f"{c:>22}" for c in cols))
    print("-" * (width + 23 * len(cols)))
    for key, label, fmt, _ in METRICS:
        cells = [fmt.format(results[n][key]) for n in names]
        for n in ratios if ref else ():
            ratios[n][key] = results[n][key] / ref[key] if ref[key] else float("nan")
            cells.append(f"{ratios[n][key]:.2f}x")
        print(f"{label.format(**vars(args)):<{width}} " + " ".join(f"{c:>22}" for c in cells))
    print(f"(medians over {args.rounds} round(s); {args.threads} threads each; ratios splitserve / llama.cpp: "
          "above 1 is better for tok/s, below 1 for ms and MiB)")
    print("output tokens per streamed chunk, one stream (1.00: the ITL p50 is per token): " + ", ".join(
        f"{n} {results[n]['single_tokens_per_chunk']:.2f}" for n in names))
    busiest = max(results[n]["other_cpus"] for n in names)
    print("CPUs busy while measuring: " + ", ".join(
        f"{n} {results[n]['sut_cpus']:.2f} (others on the machine {results[n]['other_cpus']:.2f})" for n in names))
    if busiest > QUIET_CPUS:
        print(f"WARNING: other processes kept up to {busiest:.2f} CPUs busy during a measurement: the figures "
              "are disturbed (spinning thread pools suffer most), rerun on a quiet machine")
    for n in names:
        rows = ", ".join(f"{p} {r['peak_mib']:.0f}" + (f" (KV {r['kv_mib']:.0f})" if r["kv_mib"] else "")
                         for p, r in results[n]["rss"].items())
        print(f"peak RSS MiB, {n}: {rows}")
    targets = {}
    if ref:
        for n, r in ratios.items():
            colocated = "colocated" in n
            t_streams = TARGETS["streams_tok_s_colocated" if colocated else "streams_tok_s"]
            checks = {"single_tok_s": (r["single_tok_s"], TARGETS["single_tok_s"], ">="),
                      "streams_tok_s": (r["streams_tok_s"], t_streams, ">=")}
            targets[n] = {k: {"ratio": v, "target": t, "verdict": "PASS" if v >= t else "MISS"}
                          for k, (v, t, _) in checks.items()}
    for n in ratios or names:
        if n == "llama.cpp":
            continue
        ttft = results[n]["prefix_ttft_mean_ms"]
        targets.setdefault(n, {})["prefix_ttft_ms"] = {"value": ttft, "target": TARGETS["prefix_ttft_ms"],
                                                       "verdict": "PASS" if ttft <= TARGETS["prefix_ttft_ms"] else "MISS"}
        line = ", ".join(f"{k} {v.get('ratio', v.get('value')):.2f} (target {'<=' if k.endswith('ms') else '>='} "
                         f"{v['target']}) {v['verdict']}" for k, v in targets[n].items())
        print(f"targets, {n}: {line}")
    return {"ratios": ratios, "targets": targets}


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server binary (none: its column is skipped)")
    p.add_argument("--llama-args", default="", help="extra llama-server flags, one shell-quoted string")
    p.add_argument("--llama-ctx", type=int, default=0, help="llama-server's -c (0: what the workloads need)")
    p.add_argument("--up-arg", action="append", default=[], metavar="FLAG",
                   help="an extra `splitserve up` flag for every splitserve system (repeat; e.g. "
                        "--up-arg=--quantized-matmul=int8)")
    p.add_argument("--colocated", action="store_true", help="also run `splitserve up --colocated` (one engine per worker)")
    p.add_argument("--no-disaggregated", action="store_true", help="skip the default (disaggregated) splitserve system")
    p.add_argument("--model", default=None, help="GGUF file (default: the default model's)")
    p.add_argument("--threads", type=int, default=2, help="threads of llama-server and of each splitserve worker")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams (and llama-server's --parallel)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens of the one-stream and N-stream requests")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of the one-stream and N-stream requests")
    p.add_argument("--single-requests", type=int, default=2, help="one-stream requests per round")
    p.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix tokens")
    p.add_argument("--prefix-requests", type=int, default=8, help="prefix-hit requests per round (after the warming one)")
    p.add_argument("--suffix-len", type=int, default=16, help="tokens after the shared prefix, other in every request")
    p.add_argument("--rounds", type=int, default=1, help="rounds; each starts and stops every system once")
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.5, help="splitserve's KV pool per worker, GiB")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt text")
    p.add_argument("--startup-timeout-s", type=float, default=400.0)
    p.add_argument("--wait-quiet-s", type=float, default=120.0,
                   help=f"before measuring a system, wait up to this long for other processes to keep fewer "
                        f"than {QUIET_CPUS} CPUs busy (0: measure at once)")
    p.add_argument("--json", metavar="FILE", help="write every round's figures here")
    args = p.parse_args(argv)
    for name in ("threads", "streams", "output_len", "prompt_len", "single_requests", "prefix_len",
                 "prefix_requests", "suffix_len", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.output_len < 2:
        p.error("--output-len must be >= 2 (decode speed needs a token after the first)")
    if not args.kv_cache_memory_gb > 0 or args.llama_ctx < 0 or args.wait_quiet_s < 0:
        p.error("--kv-cache-memory-gb must be > 0, --llama-ctx and --wait-quiet-s >= 0")
    if args.llama_server and not (os.path.isfile(args.llama_server) and os.access(args.llama_server, os.X_OK)):
        p.error(f"--llama-server {args.llama_server!r} is not an executable file")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json!r}: its folder does not exist")
    if args.no_disaggregated and not args.colocated and not args.llama_server:
        p.error("nothing to run: --no-disaggregated without --colocated or --llama-server")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from splitserve.model.paths import check_model_path

    try:
        model_path = str(check_model_path(args.model))
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"vs_llamacpp: --model: {exc}")
    if args.model is None:  # splitserve loads the same file as llama-server
        args.model = model_path
    extra = [*args.up_arg, "--model", model_path]
    systems: list[tuple[str, callable]] = []
    if args.llama_server:
        systems.append(("llama.cpp", lambda: LlamaServer(args, model_path)))
    if not args.no_disaggregated:
        systems.append(("splitserve", lambda: Splitserve(args, "splitserve", extra)))
    if args.colocated:
        systems.append(("splitserve colocated", lambda: Splitserve(args, "splitserve colocated", ["--colocated", *extra])))
    prompts = build_all(args)
    log(f"model {model_path}; {len(systems)} system(s), {args.rounds} round(s)")
    rounds: dict[str, list[dict]] = {name: [] for name, _ in systems}
    for r in range(args.rounds):
        for system in (systems if r % 2 == 0 else systems[::-1]):
            try:
                rounds[system[0]].append(run_round(system, prompts, args))
            except (RuntimeError, OSError, ValueError, http.client.HTTPException) as exc:
                # a server that did not start, broke a stream or answered garbage: its own words
                sys.exit(f"vs_llamacpp: {system[0]}, round {r + 1}: {exc}")
    results = {name: summarize(rs) for name, rs in rounds.items()}
    summary = report(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "rounds": rounds, **summary}, f, indent=1)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
