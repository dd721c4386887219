"""The three measurements of docs/performance.md, one command each; every figure comes from one run.

    .venv/bin/python benchmarks/perf_report.py batching   # continuous batching vs HF static batching
    .venv/bin/python benchmarks/perf_report.py prefix     # prefix-cache hit TTFT vs distinct prefixes
    .venv/bin/python benchmarks/perf_report.py itl        # p99 ITL under long prefills: pinned disagg vs colocated

Each starts the servers it measures (`splitserve up ...`, `splitserve hf-serve`) one after the other,
so only the system under test is busy; drives them over the OpenAI completions API with the
`splitserve bench` client (streamed, token-id prompts of exact lengths, seeded); prints the tables
and the target line; `--result-json FILE` keeps the summaries and every request's timings.

- batching: --num-prompts prompts of --input-len tokens (+-25%), output lengths uniform in
  [--min-output, --max-output] (ignore_eos), at most --concurrency in flight, against HF
  transformers static batching (`splitserve hf-serve`, batches of --concurrency), the
  disaggregated stack and the colocated one. Target: splitserve output tokens/s >= 2x HF.
- prefix: one request fills the cache with a --prefix-len prefix; then, one at a time, --num-requests
  misses (distinct prefixes of the same length) alternate with as many hits (the shared prefix),
  each with its own --suffix-len suffix. Target: mean hit TTFT <= 1/20 of mean miss TTFT.
- itl: --decodes requests with short prompts and --decode-output tokens each start together; after
  --first-prefill-s a long prompt (--prefill-len tokens, distinct) arrives every --prefill-every-s
  seconds. The ITL of the decodes (not of the long prompts) is measured against: the disaggregated
  stack with prefill and decode workers pinned to different cores (--prefill-cpus/--decode-cpus),
  and the colocated stack (one worker on all cores). Target: disaggregated p99 ITL <= 0.5x colocated.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # bench_engine: cpu_model, cpu_busy_seconds
sys.path.insert(0, os.path.join(REPO, "tests"))  # services_fixture.start_stack

from bench_engine import cpu_model  # noqa: E402
from services_fixture import start_stack  # noqa: E402

from splitserve.bench import datasets, runner  # noqa: E402
from splitserve.bench.metrics import RequestRecord, latency_stats, summarize  # noqa: E402
from splitserve.bench.report import format_compare, format_table, write_json  # noqa: E402
from splitserve.launch.up import free_port  # noqa: E402

TARGET_BATCHING = 2.0  # splitserve output tok/s over HF static batching
TARGET_PREFIX = 20.0  # miss TTFT over hit TTFT
TARGET_ITL = 0.5  # disaggregated p99 ITL over colocated


def log(msg: str) -> None:
    print(f"[perf] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- servers
class Server:
    """A server under test: its OpenAI base URL and how to stop it."""

    def __init__(self, name: str, base_url: str, stop) -> None:
        self.name, self.base_url, self._stop = name, base_url, stop

    def stop(self) -> None:
        self._stop()


def start_up(name: str, *flags: str) -> Server:
    log(f"starting {name}: splitserve up {' '.join(flags)}")
    stack = start_stack(*flags)

    def stop():
        code = stack.stop()
        if code != 0:
            log(f"{name} exited with {code}; its last lines:\n" + "\n".join(stack.log[-20:]))
    return Server(name, stack.http_base, stop)


def start_hf(name: str, dtype: str, max_batch_size: int, timeout_s: float = 400.0) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "splitserve.launch.cli", "hf-serve", "--port", str(port), "--dtype", dtype,
            "--max-batch-size", str(max_batch_size)]
    log(f"starting {name}: splitserve {' '.join(argv[3:])}")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(f"/tmp/perf-{name}-{port}.log", "w"),
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} (log: /tmp/perf-{name}-{port}.log)")
        try:
            with urllib.request.urlopen(base + "/models", timeout=5) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{name} did not answer in {timeout_s:.0f}s")
        time.sleep(0.5)

    def stop():
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return Server(name, base, stop)


# ----------------------------------------------------------------------------- running workloads
def tokenizer_ids():
    from splitserve.model.loader import default_model_path
    from splitserve.model.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path())
    return datasets.candidate_token_ids(tok.vocab_size, tok.all_special_ids)


def model_of(base_url: str) -> str:
    return asyncio.run(runner.fetch_server_info(base_url)).model


def run_flow(base_url: str, requests, arrivals, concurrency: int | None = None, model: str | None = None):
    model = model or model_of(base_url)
    return asyncio.run(runner.run(base_url, model, requests, arrivals, max_concurrency=concurrency,
                                  progress=False, timeout_s=1800.0))


async def _two_flows(base_url: str, model: str, flows):
    return await asyncio.gather(*(runner.run(base_url, model, reqs, arr, progress=False, timeout_s=1800.0)
                                  for reqs, arr in flows))


def warm_up(base_url: str, ids: np.ndarray, n: int = 2) -> None:
    """A couple of short requests of their own (first-call costs out of the way; no shared prefix)."""
    reqs = datasets.random_requests(n, 24, 4, ids, seed=991)
    records, _ = run_flow(base_url, reqs, [0.0] * n, concurrency=1)
    bad = [r.error for r in records if not r.success]
    if bad:
        raise SystemExit(f"warm-up against {base_url} failed: {bad[0]}")


def header() -> None:
    import torch

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; "
          f"command: {' '.join(sys.argv)}")


def check_ok(name: str, records: list[RequestRecord]) -> None:
    bad = [r for r in records if not r.success]
    if bad:
        raise SystemExit(f"{name}: {len(bad)} of {len(records)} requests failed; first: {bad[0].error}")


# ----------------------------------------------------------------------------- 1. batching
def cmd_batching(args) -> dict:
    ids = tokenizer_ids()
    rng = np.random.default_rng([args.seed, 7])
    reqs = datasets.random_requests(args.num_prompts, args.input_len, 1, ids, range_ratio=0.25, seed=args.seed)
    outs = rng.integers(args.min_output, args.max_output + 1, size=len(reqs))
    reqs = [dataclasses.replace(r, output_len=int(o)) for r, o in zip(reqs, outs)]
    arrivals = [0.0] * len(reqs)
    systems = [("hf-static", lambda: start_hf("hf-static", args.dtype, args.concurrency)),
               ("disaggregated", lambda: start_up("disaggregated", "--dtype", args.dtype)),
               ("colocated", lambda: start_up("colocated", "--colocated", "--dtype", args.dtype))]
    summaries, runs = {}, {}
    for name, start in systems:
        if name in args.skip:
            continue
        server = start()
        try:
            warm_up(server.base_url, ids)
            log(f"{name}: {len(reqs)} requests, concurrency {args.concurrency}")
            records, duration = run_flow(server.base_url, reqs, arrivals, args.concurrency)
        finally:
            server.stop()
        check_ok(name, records)
        summaries[name] = summarize(records, duration)
        runs[name] = (records, duration)
    header()
    print(f"{len(reqs)} requests: prompts {min(r.prompt_len for r in reqs)}-{max(r.prompt_len for r in reqs)} "
          f"tokens, outputs {int(outs.min())}-{int(outs.max())} (mean {outs.mean():.0f}, ignore_eos), "
          f"{args.concurrency} in flight, greedy, {args.dtype}; each system alone on the machine")
    for name, s in summaries.items():
        print(format_table(s, title=name))
    print(format_compare(summaries))
    result = {"summaries": summaries}
    if "hf-static" in summaries:
        base = summaries["hf-static"]["output_throughput"]
        for name in summaries:
            if name == "hf-static":
                continue
            ratio = summaries[name]["output_throughput"] / base
            print(f"target {name} output tok/s >= {TARGET_BATCHING:.0f}x HF static batching: {ratio:.2f}x  "
                  f"{'PASS' if ratio >= TARGET_BATCHING else 'MISS'}")
            result[f"ratio_{name}"] = ratio
    return result


# ----------------------------------------------------------------------------- 2. prefix cache
def cmd_prefix(args) -> dict:
    ids = tokenizer_ids()
    n = args.num_requests
    shared = datasets.prefix_repetition_requests(n + 1, args.prefix_len, args.suffix_len, args.output_len, ids,
                                                 num_prefixes=1, seed=args.seed)
    distinct = datasets.prefix_repetition_requests(n, args.prefix_len, args.suffix_len, args.output_len, ids,
                                                   num_prefixes=n, seed=args.seed + 1)
    server = start_up("disaggregated", "--dtype", args.dtype)
    try:
        warm_up(server.base_url, ids)
        log(f"one request fills the shared prefix, then {n} misses (distinct prefixes) alternate with {n} hits, "
            f"one at a time")
        # Alternating, a miss and a hit see the same minutes of a machine whose speed drifts (all
        # misses first, then all hits, made the ratio swing with the drift).
        model = model_of(server.base_url)
        hit, miss = run_flow(server.base_url, shared[:1], [0.0], 1, model)[0], []
        for i in range(n):
            miss += run_flow(server.base_url, distinct[i:i + 1], [0.0], 1, model)[0]
            hit += run_flow(server.base_url, shared[i + 1:i + 2], [0.0], 1, model)[0]
    finally:
        server.stop()
    check_ok("distinct", miss)
    check_ok("shared", hit)
    fill, hits = hit[0], hit[1:]
    miss_ttft = [r.ttft * 1000 for r in miss]
    hit_ttft = [r.ttft * 1000 for r in hits]
    header()
    prompt_len = args.prefix_len + args.suffix_len
    print(f"prompts of {prompt_len} tokens: a {args.prefix_len}-token prefix + a {args.suffix_len}-token suffix of "
          f"their own; {args.output_len} output tokens; one request at a time, misses and hits alternating; {args.dtype}; "
          f"disaggregated stack (1 prefill, 1 decode worker)")
    print(f"{'requests':<34} {'n':>3} {'TTFT mean':>10} {'median':>8} {'min':>8} {'max':>8} {'cached tok':>11}")

    def row(label, recs, ttfts):
        cached = sorted({r.cached_tokens for r in recs if r.cached_tokens is not None})
        s = latency_stats([t / 1000 for t in ttfts])
        print(f"{label:<34} {len(recs):>3} {s['mean']:>10.1f} {s['median']:>8.1f} {min(ttfts):>8.1f} "
              f"{max(ttfts):>8.1f} {','.join(map(str, cached)) or '-':>11}")
        return s
    miss_s_ = row("distinct prefixes (misses), ms", miss, miss_ttft)
    row("shared: the first (fills), ms", [fill], [fill.ttft * 1000])
    hit_s_ = row("shared: the rest (hits), ms", hits, hit_ttft)
    ratio = miss_s_["mean"] / hit_s_["mean"]
    print(f"hit TTFT {hit_s_['mean']:.1f} ms mean, {hit_s_['median']:.1f} ms median; "
          f"miss/hit (means) {ratio:.1f}x, (medians) {miss_s_['median'] / hit_s_['median']:.1f}x")
    print(f"target hit TTFT >= {TARGET_PREFIX:.0f}x faster than a miss: {ratio:.1f}x  "
          f"{'PASS' if ratio >= TARGET_PREFIX else 'MISS'}")
    return {"miss_ttft_ms": miss_ttft, "hit_ttft_ms": hit_ttft, "fill_ttft_ms": fill.ttft * 1000,
            "hit_cached_tokens": [r.cached_tokens for r in hits], "ratio": ratio}


# ----------------------------------------------------------------------------- 3. ITL under prefills
def cmd_itl(args) -> dict:
    ids = tokenizer_ids()
    decodes = datasets.random_requests(args.decodes, args.decode_prompt, args.decode_output, ids, seed=args.seed)
    prefills = datasets.random_requests(args.prefills, args.prefill_len, args.prefill_output, ids,
                                        seed=args.seed + 1)
    prefill_at = [args.first_prefill_s + i * args.prefill_every_s for i in range(args.prefills)]
    systems = [("disaggregated, pinned", ("--dtype", args.dtype, "--prefill-cpus", args.prefill_cpus,
                                          "--decode-cpus", args.decode_cpus)),
               ("colocated", ("--colocated", "--dtype", args.dtype))]
    results = {}
    for name, flags in systems:
        server = start_up(name, *flags)
        try:
            warm_up(server.base_url, ids)
            log(f"{name}: {args.decodes} decodes of {args.decode_output} tokens; {args.prefills} prompts of "
                f"{args.prefill_len} tokens from {args.first_prefill_s}s every {args.prefill_every_s}s")
            model = model_of(server.base_url)
            (dec, dec_s), (pre, pre_s) = asyncio.run(_two_flows(
                server.base_url, model, [(decodes, [0.0] * len(decodes)), (prefills, prefill_at)]))
        finally:
            server.stop()
        check_ok(name + " decodes", dec)
        check_ok(name + " prefills", pre)
        itl = [g for r in dec for g in r.itl]
        stats = latency_stats(itl, (90, 99))
        results[name] = {"itl_ms": stats, "itl_max_ms": max(itl) * 1000, "itl_samples": len(itl),
                         "decode_tokens_per_s": sum(r.output_tokens for r in dec) / dec_s,
                         "prefill_ttft_ms": latency_stats([r.ttft for r in pre])["mean"],
                         "decode_seconds": dec_s}
    header()
    print(f"{args.decodes} decodes ({args.decode_prompt}-token prompts, {args.decode_output} tokens each, ignore_eos) "
          f"while {args.prefills} prompts of {args.prefill_len} tokens ({args.prefill_output} output tokens) arrive "
          f"from {args.first_prefill_s:g}s every {args.prefill_every_s:g}s; {args.dtype}; disaggregated: prefill on "
          f"cores {args.prefill_cpus}, decode on {args.decode_cpus} (gateway, kvstore, Redis unpinned)")
    print(f"{'system':<24} {'ITL mean':>9} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'samples':>8} "
          f"{'decode tok/s':>13} {'long TTFT':>10}")
    for name, r in results.items():
        m = r["itl_ms"]
        print(f"{name:<24} {m['mean']:>9.1f} {m['median']:>7.1f} {m['p90']:>7.1f} {m['p99']:>7.1f} "
              f"{r['itl_max_ms']:>7.1f} {r['itl_samples']:>8} {r['decode_tokens_per_s']:>13.1f} "
              f"{r['prefill_ttft_ms']:>10.0f}")
    print("(ms; ITL of the decodes only; long TTFT: mean TTFT of the long prompts)")
    ratio = results["disaggregated, pinned"]["itl_ms"]["p99"] / results["colocated"]["itl_ms"]["p99"]
    print(f"target disaggregated p99 ITL <= {TARGET_ITL}x colocated: {ratio:.2f}x  "
          f"{'PASS' if ratio <= TARGET_ITL else 'MISS'}")
    results["ratio"] = ratio
    return results


# ----------------------------------------------------------------------------- CLI
def _add_numbers(parser: argparse.ArgumentParser, **defaults: int | float) -> None:
    """One --flag-name per keyword, typed like its default."""
    for name, default in defaults.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--result-json", default=None)

    b = sub.add_parser("batching", parents=[common], help="continuous batching vs HF static batching")
    _add_numbers(b, num_prompts=64, concurrency=32, input_len=128, min_output=16, max_output=256)
    b.add_argument("--skip", nargs="*", default=[], choices=["hf-static", "disaggregated", "colocated"])

    x = sub.add_parser("prefix", parents=[common], help="prefix-cache hit TTFT vs distinct prefixes")
    _add_numbers(x, prefix_len=1000, suffix_len=16, output_len=4, num_requests=8)

    i = sub.add_parser("itl", parents=[common], help="p99 ITL under long prefills: pinned disagg vs colocated")
    _add_numbers(i, decodes=4, decode_prompt=32, decode_output=200, prefills=6, prefill_len=1536, prefill_output=4,
                 first_prefill_s=2.0, prefill_every_s=4.0)
    i.add_argument("--prefill-cpus", default="0")
    i.add_argument("--decode-cpus", default="1")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = {"batching": cmd_batching, "prefix": cmd_prefix, "itl": cmd_itl}[args.what](args)
    if args.result_json:
        write_json(args.result_json, {"what": args.what, "argv": sys.argv, "result": result})
        log(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
