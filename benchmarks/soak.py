"""Soak: mixed load against `splitserve up` for --minutes while a worker is killed (SIGKILL) every
--kill-every-s seconds, alternating roles (prefill-0, decode-0, prefill-1, decode-1, ...; the
kvstore too with --kill-kvstore). `splitserve up` restarts each on its ports; the gateway retries
prefills and resumes decode streams. Not part of the test suite (it runs for minutes).

Load: --concurrency client threads, each sending one request after another until the time is up,
each a prompt drawn (seeded) from a pool of --num-prompts: short questions and long documents, half
of them behind one long shared preamble (so prefix routing has something to route), with 8 to
--max-tokens new tokens (greedy, ignore_eos). The API is drawn too: 60% gRPC Generate streams,
20% HTTP completions streamed (server-sent events), 20% HTTP completions in one response.

Every answer is checked against a reference made before the stack starts, by the engine in this
process (`LLM(dtype=--dtype).generate`, the same greedy settings). Outcome of each request:
  served    completed (a finish reason arrived);
  refused   UNAVAILABLE / RESOURCE_EXHAUSTED (gRPC) or 503 / 429 (HTTP) before any output;
  failed    anything else: an error after output began, another status, a stream cut short.
For served gRPC streams (token ids): tokens lost = reference tokens missing from the stream,
duplicated = tokens beyond it (a resume that skipped or repeated a token changes the length: the
decode worker counts max_tokens over prompt + tokens already streamed), diverged = same length but
other tokens (numerics, not loss). HTTP answers are compared as text.
Peak RSS per role: the largest VmHWM (kernel-tracked peak resident set) of any incarnation of any
process of that role, sampled every second from /proc.

    .venv/bin/python benchmarks/soak.py                      # 10 minutes, a kill a minute
    .venv/bin/python benchmarks/soak.py --minutes 2 --kill-every-s 30 --concurrency 2   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # bench_engine: the seeded pseudo-English generator
sys.path.insert(0, os.path.join(REPO, "tests"))  # services_fixture.start_stack

from bench_engine import make_text  # noqa: E402

REFUSED_GRPC = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
REFUSED_HTTP = (503, 429)


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- prompts and references
def build_pool(args: argparse.Namespace, tokenizer) -> list[dict]:
    """The prompt pool: {"ids", "max_tokens"}; distinct first blocks except the shared-preamble half."""
    rng = random.Random(args.seed)
    preamble = tokenizer.encode("You are a careful assistant. " + make_text(rng, 120))[:96]  # six full blocks
    pool = []
    for i in range(args.num_prompts):
        words = rng.choice((12, 30, 160, 260))
        body = tokenizer.encode(f"Request {i}: " + make_text(rng, words))
        ids = (preamble + body) if i % 2 else body
        pool.append({"ids": ids[:1500], "max_tokens": rng.randint(8, args.max_tokens)})
    return pool


def add_references(args: argparse.Namespace, pool: list[dict]) -> None:
    from splitserve import LLM, SamplingParams

    llm = LLM(model=args.model or None, dtype=args.dtype, kv_cache_memory_gb=0.5)
    params = [SamplingParams(temperature=0, max_tokens=p["max_tokens"], ignore_eos=True) for p in pool]
    for p, out in zip(pool, llm.generate([p["ids"] for p in pool], params)):
        p["ref_ids"], p["ref_text"] = list(out.token_ids), out.text
    del llm


# ----------------------------------------------------------------------------- one request per API
def grpc_stream(stack, prompt: dict, request_id: str) -> dict:
    import grpc

    from splitserve.client import stream_generate

    ids, final = [], None
    try:
        for msg in stream_generate(stack.gateway, token_ids=prompt["ids"], request_id=request_id, timeout_s=300,
                                   sampling={"max_tokens": prompt["max_tokens"], "temperature": 0.0,
                                             "ignore_eos": True}):
            ids.extend(msg.token_ids)
            final = msg if msg.finish_reason else final
    except grpc.RpcError as exc:
        name = exc.code().name
        if not ids and name in REFUSED_GRPC:
            return {"outcome": "refused", "why": name}
        return {"outcome": "failed", "why": f"{name}: {(exc.details() or '')[:160]}", "tokens": len(ids)}
    if final is None:
        return {"outcome": "failed", "why": "stream ended without a finish reason", "tokens": len(ids)}
    ref = prompt["ref_ids"]
    return {"outcome": "served", "lost": max(0, len(ref) - len(ids)), "duplicated": max(0, len(ids) - len(ref)),
            "diverged": int(len(ids) == len(ref) and ids != ref), "text_mismatch": 0}


def http_completion(stack, model: str, prompt: dict, request_id: str, stream: bool) -> dict:
    body = {"model": model, "prompt": prompt["ids"], "max_tokens": prompt["max_tokens"], "temperature": 0,
            "ignore_eos": True, "stream": stream}
    req = urllib.request.Request(stack.http_base + "/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "x-request-id": request_id})
    text, finish = "", None
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            if not stream:
                choice = json.loads(resp.read())["choices"][0]
                text, finish = choice["text"], choice["finish_reason"]
            else:
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        return {"outcome": "failed", "why": f"stream error: {event['error'].get('message', '')[:160]}"}
                    for choice in event.get("choices", []):
                        text += choice.get("text", "")
                        finish = choice.get("finish_reason") or finish
    except urllib.error.HTTPError as exc:
        if exc.code in REFUSED_HTTP:
            return {"outcome": "refused", "why": f"HTTP {exc.code}"}
        return {"outcome": "failed", "why": f"HTTP {exc.code}: {exc.read()[:160]!r}"}
    except (OSError, ValueError) as exc:  # connection reset, a cut stream, bad JSON
        return {"outcome": "failed", "why": f"{type(exc).__name__}: {exc}"[:200]}
    if not finish:
        return {"outcome": "failed", "why": "no finish_reason"}
    return {"outcome": "served", "lost": 0, "duplicated": 0, "diverged": 0,
            "text_mismatch": int(text != prompt["ref_text"])}


# ----------------------------------------------------------------------------- processes
def role_processes(stack) -> dict[int, str]:
    """pid -> role ("gateway", "prefill", "decode", "kvstore", "redis") of the launcher's live children."""
    out = {}
    for pid in stack.child_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv and "redis-server" in argv[0]:
            out[pid] = "redis"
        elif "splitserve.launch.cli" in argv:
            out[pid] = argv[argv.index("splitserve.launch.cli") + 1]
    return out


def peak_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    from services_fixture import start_stack
    from splitserve.model.loader import default_model_path
    from splitserve.model.tokenizer import load_tokenizer
    from pathlib import Path

    tokenizer = load_tokenizer(Path(args.model).expanduser() if args.model else default_model_path())
    pool = build_pool(args, tokenizer)
    t0 = time.monotonic()
    add_references(args, pool)
    log(f"{len(pool)} references in {time.monotonic() - t0:.0f} s; starting splitserve up")
    flags = ["--dtype", args.dtype, "--prefill-workers", str(args.prefill_workers), "--decode-workers",
             str(args.decode_workers), "--kv-cache-memory-gb", str(args.kv_cache_memory_gb)]
    if args.model:
        flags += ["--model", args.model]
    stack = start_stack(*flags)
    try:
        with urllib.request.urlopen(stack.http_base + "/models", timeout=30) as resp:
            model = json.loads(resp.read())["data"][0]["id"]
        log(f"stack up: gateway {stack.gateway}, {stack.http_base}; load for {args.minutes:g} min")
        return soak(args, stack, pool, model)
    finally:
        status = stack.stop()
        log(f"stack stopped (exit status {status})")


def soak(args: argparse.Namespace, stack, pool: list[dict], model: str) -> dict:
    end = time.monotonic() + args.minutes * 60
    stop = threading.Event()
    results: list[dict] = []
    lock = threading.Lock()
    peaks: dict[str, float] = defaultdict(float)
    kills: list[dict] = []

    def client(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        n = 0
        while time.monotonic() < end:
            prompt, api = rng.choice(pool), rng.random()
            rid = f"soak-{index}-{n}"
            n += 1
            start = time.monotonic()
            if api < 0.6:
                r = grpc_stream(stack, prompt, rid) | {"api": "grpc"}
            else:
                r = http_completion(stack, model, prompt, rid, stream=api < 0.8) | {
                    "api": "http-stream" if api < 0.8 else "http"}
            r.update(request_id=rid, seconds=time.monotonic() - start, at=start)
            with lock:
                results.append(r)
            if r["outcome"] == "refused":
                time.sleep(0.5)  # nothing to serve it right now: do not spin

    def killer() -> None:
        victims = [f"{role}-{i}" for i in range(max(args.prefill_workers, args.decode_workers))
                   for role in ("prefill", "decode") if i < (args.prefill_workers if role == "prefill"
                                                             else args.decode_workers)]
        if args.kill_kvstore:
            victims.append("kvstore")
        turn = 0
        while not stop.wait(args.kill_every_s):
            name = victims[turn % len(victims)]
            turn += 1
            pid = stack.pid(name)
            if pid is None:
                log(f"{name} is down (restarting): no kill this turn")
                continue
            os.kill(pid, signal.SIGKILL)
            kills.append({"name": name, "pid": pid, "at": time.monotonic()})
            log(f"killed {name} (pid {pid})")

    def sampler() -> None:
        while not stop.wait(1.0):
            for pid, role in role_processes(stack).items():
                rss = peak_rss_mib(pid)
                if rss is not None:
                    peaks[role] = max(peaks[role], rss)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.concurrency)]
    helpers = [threading.Thread(target=killer, daemon=True), threading.Thread(target=sampler, daemon=True)]
    for t in threads + helpers:
        t.start()
    last = time.monotonic()
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        if time.monotonic() - last >= 30:
            last = time.monotonic()
            with lock:
                counts = Counter(r["outcome"] for r in results)
            log(f"{sum(counts.values())} requests so far: {dict(counts)}")
    stop.set()
    for t in helpers:
        t.join(10)
    restarts = sum(1 for line in list(stack.log) if " restarted: pid=" in line and "splitserve.up" in line)
    return summarize(args, results, dict(peaks), kills, restarts)


def summarize(args, results: list[dict], peaks: dict, kills: list[dict], restarts: int) -> dict:
    outcomes = Counter(r["outcome"] for r in results)
    served = [r for r in results if r["outcome"] == "served"]
    failures = Counter(r["why"] for r in results if r["outcome"] == "failed")
    refusals = Counter(r["why"] for r in results if r["outcome"] == "refused")
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "requests": {"sent": len(results), "served": outcomes["served"], "refused": outcomes["refused"],
                     "failed": outcomes["failed"]},
        "by_api": {api: dict(Counter(r["outcome"] for r in results if r["api"] == api))
                   for api in sorted({r["api"] for r in results})},
        "tokens": {"lost": sum(r["lost"] for r in served), "duplicated": sum(r["duplicated"] for r in served),
                   "diverged_streams": sum(r["diverged"] for r in served),
                   "http_text_mismatches": sum(r["text_mismatch"] for r in served)},
        "failures": dict(failures.most_common(10)), "refusals": dict(refusals),
        "kills": [k["name"] for k in kills], "restarts_logged": restarts,
        "peak_rss_mib": {role: round(v, 1) for role, v in sorted(peaks.items())},
    }


def print_report(report: dict) -> None:
    r, t = report["requests"], report["tokens"]
    print(f"requests: sent {r['sent']}, served {r['served']}, refused {r['refused']}, failed {r['failed']}")
    for api, counts in report["by_api"].items():
        print(f"  {api:<12} {counts}")
    print(f"tokens: lost {t['lost']}, duplicated {t['duplicated']}; streams diverged {t['diverged_streams']}, "
          f"HTTP texts differing {t['http_text_mismatches']}")
    print(f"kills: {len(report['kills'])} ({', '.join(report['kills'])}); restarts logged: {report['restarts_logged']}")
    if report["refusals"]:
        print(f"refusals: {report['refusals']}")
    for why, n in report["failures"].items():
        print(f"failed x{n}: {why}")
    print("peak RSS (MiB): " + ", ".join(f"{role} {mib:.0f}" for role, mib in report["peak_rss_mib"].items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--kill-every-s", type=float, default=60.0)
    p.add_argument("--kill-kvstore", action="store_true", help="put the kvstore in the rotation of kills")
    p.add_argument("--concurrency", type=int, default=4, help="client threads, each one request at a time")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default="")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="float32 (default): greedy streams are compared token for token with the reference")
    p.add_argument("--prefill-workers", type=int, default=2)
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the report to this file")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.kill_every_s <= 0 or args.concurrency < 1 or args.max_tokens < 8:
        p.error("--minutes and --kill-every-s must be > 0, --concurrency >= 1, --max-tokens >= 8")
    report = run(args)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if not report["tokens"]["lost"] and not report["tokens"]["duplicated"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
