"""Engine benchmark: splitserve continuous batching against HF transformers `generate` static batching.

Same machine, same prompt token ids, same dtype for both systems. Scenarios:
  equal   every request asks for --output-len new tokens (ignore_eos)
  mixed   output lengths drawn uniformly from [--min-len, --max-len] (seeded); static batching must
          decode the whole batch to its longest request, only the requested tokens count as output
  single  one request of --output-len tokens; decode tokens/s from the first token to the last
Targets (from the issue): engine >= 1.2x HF output tok/s at equal lengths, >= 2x at mixed lengths.

Each system runs in its own child process (this script with the hidden `--worker` flag), one after
the other, never concurrently, so that each one's peak RSS is its own. The parent sends the job as
JSON on stdin and reads the result from one marked JSON line on stdout. The engine child runs first
and tokenizes the prompts; the HF child receives exactly those token ids.

Only `generate` is timed, after a warm-up on both systems. The full default run takes long on a
small CPU; try it first with tiny settings:
  .venv/bin/python benchmarks/bench_engine.py --num-prompts 3 --words 20 --output-len 8 --min-len 4 --max-len 12
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

RESULT_MARKER = "@@BENCH_RESULT@@ "
AGREE_PREFIX = 16  # greedy agreement is checked on the first this-many tokens of each request
TARGETS = {"equal": 1.2, "mixed": 2.0}  # engine / HF output tok/s

# Fixed vocabulary for the pseudo-English prompts (no downloads; the seed picks the text).
WORDS = """the a of and to in is was for on that with as by at from it this be are or an which
have has had were not but all one can will would their there they been more when who what about
time people year day way man world life hand part child eye woman place work week case point number
group problem fact city river mountain garden market village road house school table window door
light water fire stone paper story letter song music picture voice language question answer idea
reason plan system program result change service power money history science nature animal bird
tree flower forest field sea island winter summer morning evening night small large old young long
short early late new good great high low little important different simple quiet bright dark warm
cold open free clear strong gentle careful walk talk find give tell ask work seem feel try leave
call keep begin help show hear play run move live believe bring write stand learn build carry
remember follow watch grow open close travel explain describe because however although while after
before during under over between through across toward slowly quickly often never always sometimes
together almost""".split()


# ----------------------------------------------------------------------------- job setup (parent)
def make_text(rng: random.Random, num_words: int) -> str:
    """About `num_words` words of seeded pseudo-English: capitalized sentences of 6-14 words."""
    sentences, left = [], num_words
    while left > 0:
        n = min(left, rng.randint(6, 14))
        words = [rng.choice(WORDS) for _ in range(n)]
        sentences.append(" ".join(words).capitalize() + ".")
        left -= n
    return " ".join(sentences)


def build_job(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    prompts = [make_text(rng, args.words) for _ in range(args.num_prompts)]
    # Warm-up prompts are distinct from the measured ones (a different seed stream).
    warm_rng = random.Random(args.seed + 1_000_003)
    warmup = [make_text(warm_rng, min(args.words, 20)) for _ in range(2)]
    len_rng = random.Random(args.seed + 7)
    lengths = {
        "equal": [args.output_len] * args.num_prompts,
        "mixed": [len_rng.randint(args.min_len, args.max_len) for _ in range(args.num_prompts)],
        "single": [args.output_len],
    }
    engine_kwargs = {"enable_prefix_caching": args.prefix_caching}
    for name in ("kv_cache_memory_gb", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) is not None:
            engine_kwargs[name] = getattr(args, name)
    return {
        "model": args.model,
        "dtype": args.dtype,
        "scenarios": args.scenarios,
        "prompts": prompts,
        "warmup_prompts": warmup,
        "lengths": {s: lengths[s] for s in args.scenarios},
        "engine_kwargs": engine_kwargs,
        "hf_batch_size": args.hf_batch_size or args.num_prompts,
    }


# ----------------------------------------------------------------------------- shared by workers
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_busy_seconds() -> float:
    """CPU seconds all processes on the machine have been busy since boot (/proc/stat), or nan."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall time of the timed regions, and how many CPUs other processes kept busy meanwhile.

    The machine may be shared: `other_cpus` (average CPUs busy outside this process) shows whether a
    measurement was disturbed. Resolution is one clock tick (10 ms) per region.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.other_cpu_seconds = 0.0

    def __enter__(self) -> "Meter":
        self._t, self._own, self._busy = time.perf_counter(), _own_cpu(), cpu_busy_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t
        own, busy = _own_cpu() - self._own, cpu_busy_seconds() - self._busy
        self.seconds += wall
        self.other_cpu_seconds += max(0.0, busy - own)

    @property
    def other_cpus(self) -> float:
        return self.other_cpu_seconds / self.seconds if self.seconds > 0 else float("nan")


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system  # all threads of this process


def log(system: str, msg: str) -> None:
    print(f"[{system}] {msg}", file=sys.stderr, flush=True)


def throughput(name: str, lengths: list[int], meter: Meter, outputs: list[list[int]], generated: int) -> dict:
    useful, seconds = sum(lengths), meter.seconds
    return {
        "scenario": name,
        "requests": len(lengths),
        "output_tokens": useful,  # tokens the requests asked for
        "generated_tokens": generated,  # tokens the system decoded (static batching pads to the max)
        "seconds": seconds,
        "tok_s": useful / seconds,
        "other_cpus": meter.other_cpus,
        "output_ids": outputs,
    }


def decode_rate(arrivals: list[float], start: float, n: int, meter: Meter) -> dict:
    """Single-request timings from per-token arrival times (perf_counter seconds)."""
    if len(arrivals) != n:
        raise RuntimeError(f"single request produced {len(arrivals)} tokens, expected {n}")
    decode_s = arrivals[-1] - arrivals[0]
    return {
        "scenario": "single",
        "requests": 1,
        "output_tokens": n,
        "generated_tokens": n,
        "seconds": arrivals[-1] - start,
        "tok_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan"),  # decode only
        "ttft_s": arrivals[0] - start,
        "decode_seconds": decode_s,
        "other_cpus": meter.other_cpus,
    }


# ----------------------------------------------------------------------------- engine worker
def run_engine(job: dict) -> dict:
    import torch

    from splitserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], **job["engine_kwargs"])
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mib()
    prompt_ids = [llm.tokenizer.encode(t) for t in job["prompts"]]
    warm_ids = [llm.tokenizer.encode(t) for t in job["warmup_prompts"]]
    log("engine", f"loaded in {load_s:.1f}s; prompt tokens {min(map(len, prompt_ids))}-{max(map(len, prompt_ids))}")
    llm.generate(warm_ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))

    results = {}
    for name in job["scenarios"]:
        lengths = job["lengths"][name]
        if name == "single":
            results[name] = engine_single(llm.engine, prompt_ids[0], lengths[0], SamplingParams)
        else:
            params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
            with Meter() as meter:
                outs = llm.generate(prompt_ids, params)
            for i, (out, n) in enumerate(zip(outs, lengths)):
                if len(out.token_ids) != n:
                    raise RuntimeError(
                        f"engine {name}: request {i} produced {len(out.token_ids)} tokens, asked for {n} "
                        f"(finish_reason={out.finish_reason})"
                    )
            results[name] = throughput(name, lengths, meter, [o.token_ids for o in outs], sum(lengths))
        log("engine", f"{name}: {results[name]['tok_s']:.1f} tok/s")
    return {
        "system": "engine",
        "model_path": str(llm.engine.model_path),
        "prompt_ids": prompt_ids,
        "warmup_ids": warm_ids,
        "results": results,
        "load_seconds": load_s,
        "rss_after_load_mib": rss_loaded,
        "peak_rss_mib": peak_rss_mib(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "engine_steps": llm.engine.stats.num_steps,
        "max_batch_size": llm.engine.stats.max_batch_size,
        "kv_pool_mib": llm.engine.kv_cache.num_blocks * llm.engine.kv_cache.bytes_per_block / 2**20,
    }


def engine_single(engine, prompt: list[int], n: int, SamplingParams) -> dict:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    arrivals: list[float] = []
    with Meter() as meter:
        start = time.perf_counter()
        engine.add_request("bench-single", prompt, params)
        while engine.has_unfinished():
            for out in engine.step():
                now = time.perf_counter()
                arrivals.extend(now for _ in out.new_token_ids)
    return decode_rate(arrivals, start, n, meter)


# ----------------------------------------------------------------------------- HF worker
def run_hf(job: dict) -> dict:
    from pathlib import Path

    import torch
    import transformers
    from transformers import AutoTokenizer

    from splitserve.bench.hf_batcher import load_dense_model

    path = Path(job["model_path"])
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[job["dtype"]]
    t0 = time.perf_counter()
    if path.is_dir():
        tok = AutoTokenizer.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = load_dense_model(path, dtype)
    # What the baseline really computes with, shown in the report.
    linear = next((m for n, m in model.named_modules() if n.endswith("mlp.down_proj")), None)
    weight = getattr(linear, "weight", None)
    weights = f"{type(linear).__name__} weights in {weight.dtype if weight is not None else '?'}, "
    weights += f"attention {model.config._attn_implementation}"
    load_s = time.perf_counter() - t0
    rss_loaded = current_rss_mib()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompt_ids = job["prompt_ids"]
    same_tokens = all(list(tok(t)["input_ids"]) == ids for t, ids in zip(job["prompts"], prompt_ids))
    log("hf", f"loaded in {load_s:.1f}s; HF tokenizer gives the engine's prompt ids: {same_tokens}")
    hf_batch(model, job["warmup_ids"], [4, 4], pad_id, len(job["warmup_ids"]))

    results = {}
    for name in job["scenarios"]:
        lengths = job["lengths"][name]
        if name == "single":
            results[name] = hf_single(model, prompt_ids[0], lengths[0], pad_id)
        else:
            meter, outputs, generated = hf_batch(model, prompt_ids, lengths, pad_id, job["hf_batch_size"])
            results[name] = throughput(name, lengths, meter, outputs, generated)
        log("hf", f"{name}: {results[name]['tok_s']:.1f} tok/s")
    return {
        "system": "hf",
        "results": results,
        "load_seconds": load_s,
        "rss_after_load_mib": rss_loaded,
        "peak_rss_mib": peak_rss_mib(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "tokenizers_agree": same_tokens,
        "weights": weights,
    }


def _generate_kwargs(n: int, pad_id: int) -> dict:
    # The equivalent of ignore_eos: no EOS stopping criterion (EOS may be generated and decoding goes
    # on, as in the engine), and min_new_tokens as a guard should a config bring an EOS back.
    return dict(
        do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id, eos_token_id=None,
        temperature=None, top_p=None, top_k=None,
    )


def hf_batch(model, prompts: list[list[int]], lengths: list[int], pad_id: int, batch_size: int):
    """Static batching: left-padded batches, each decoded to its longest request. Times generate only."""
    import torch

    meter, generated = Meter(), 0
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # [B, S], left-padded
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = prompts[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        n = max(lengths[i] for i in idx)
        with meter:
            out = model.generate(input_ids=input_ids, attention_mask=mask, **_generate_kwargs(n, pad_id))
        new = out[:, width:]
        if new.shape[1] != n:
            raise RuntimeError(f"HF generate returned {new.shape[1]} new tokens, asked for {n}")
        generated += len(idx) * n
        for row, i in enumerate(idx):
            outputs[i] = new[row, : lengths[i]].tolist()
    return meter, outputs, generated


def hf_single(model, prompt: list[int], n: int, pad_id: int) -> dict:
    """One request through `generate`; a streamer stamps each new token's arrival."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value) -> None:
            if not self.seen_prompt:  # generate first puts the prompt itself
                self.seen_prompt = True
                return
            now = time.perf_counter()
            self.times.extend(now for _ in range(value.numel()))

        def end(self) -> None:
            pass

    stamps = Stamps()
    input_ids = torch.tensor([prompt], dtype=torch.long)
    with Meter() as meter:
        start = time.perf_counter()
        model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=stamps, **_generate_kwargs(n, pad_id)
        )
    return decode_rate(stamps.times, start, n, meter)


# ----------------------------------------------------------------------------- parent
def run_worker(system: str, job: dict) -> dict:
    """Runs one system in a child process and waits for it (children never overlap)."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", system],
        input=json.dumps(job), stdout=subprocess.PIPE, text=True,
        env=os.environ | {"TQDM_DISABLE": "1"},  # no GGUF-conversion progress bars in the log
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
        elif line.strip():
            print(f"[{system} stdout] {line}", file=sys.stderr)
    if proc.returncode != 0 or result is None:
        raise SystemExit(f"the {system} worker failed (exit code {proc.returncode}); see its output above")
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def agreement(engine_ids: list[list[int]], hf_ids: list[list[int]]) -> dict:
    agree, prefix = 0, []
    for e, h in zip(engine_ids, hf_ids):
        k = min(AGREE_PREFIX, len(e), len(h))
        agree += e[:k] == h[:k]
        common = next((j for j, (a, b) in enumerate(zip(e, h)) if a != b), min(len(e), len(h)))
        prefix.append(common)
    return {"fraction": agree / len(engine_ids), "mean_common_prefix": sum(prefix) / len(prefix)}


def report(args: argparse.Namespace, job: dict, eng: dict, hf: dict | None) -> dict:
    rows, ratios = [], {}
    print()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    threads = f"engine {eng['threads']}" + (f", HF {hf['threads']}" if hf else "")
    versions = f"torch {eng['torch']}" + (f", transformers {hf['transformers']}" if hf else "")
    print(f"{versions}; torch threads: {threads}")
    print(f"model: {eng['model_path']} ({args.dtype})")
    plen = [len(p) for p in eng["prompt_ids"]]
    print(f"prompts: {len(plen)} x ~{args.words} words = {min(plen)}-{max(plen)} tokens (mean {sum(plen) / len(plen):.0f})")
    if "mixed" in job["lengths"]:
        m = job["lengths"]["mixed"]
        print(f"mixed output lengths: uniform [{args.min_len}, {args.max_len}], drawn {min(m)}-{max(m)}, sum {sum(m)}")
    print(f"engine: {job['engine_kwargs']}; HF static batch size: {job['hf_batch_size']}")
    print()
    header = (f"{'scenario':<8} {'system':<7} {'reqs':>5} {'out tok':>8} {'seconds':>9} {'out tok/s':>10} "
              f"{'eng/HF':>7} {'peak RSS MiB':>13} {'other CPUs':>10}")
    print(header)
    print("-" * len(header))
    for name in job["scenarios"]:
        e = eng["results"][name]
        h = hf["results"][name] if hf else None
        ratio = e["tok_s"] / h["tok_s"] if h else None
        ratios[name] = ratio
        for system, r, rss in (("engine", e, eng["peak_rss_mib"]), ("HF", h, hf["peak_rss_mib"] if hf else None)):
            if r is None:
                continue
            cell = f"{ratio:.2f}x" if system == "engine" and ratio is not None else ""
            print(f"{name:<8} {system:<7} {r['requests']:>5} {r['output_tokens']:>8} {r['seconds']:>9.2f} "
                  f"{r['tok_s']:>10.1f} {cell:>7} {rss:>13.0f} {r['other_cpus']:>10.2f}")
            rows.append({k: v for k, v in r.items() if k != "output_ids"} | {"system": system})
    busiest = max(r["other_cpus"] for r in rows)
    single_note = "single: out tok/s is decode only, first token to last; " if "single" in job["scenarios"] else ""
    print(f"({single_note}other CPUs: average CPUs other processes kept busy during the timed part, "
          f"of {os.cpu_count()})")
    if busiest > 0.2:
        print(f"WARNING: other processes used up to {busiest:.2f} CPUs during the measurements; "
              f"the numbers are disturbed, rerun on a quiet machine")
    print()
    if "single" in job["scenarios"]:
        for system, res in (("engine", eng), ("HF", hf)):
            if res:
                s = res["results"]["single"]
                print(f"single {system}: decode {s['tok_s']:.1f} tok/s (first to last token, "
                      f"{s['output_tokens'] - 1} tokens in {s['decode_seconds']:.2f}s), TTFT {s['ttft_s'] * 1000:.0f} ms")
    if hf and "mixed" in job["scenarios"]:
        m = hf["results"]["mixed"]
        print(f"HF mixed decoded {m['generated_tokens']} tokens for {m['output_tokens']} useful ones "
              f"({m['output_tokens'] / m['generated_tokens']:.0%} useful)")
    for system, res in (("engine", eng), ("HF", hf)):
        if res:
            print(f"{system}: load {res['load_seconds']:.1f}s (not timed), RSS after load {res['rss_after_load_mib']:.0f} MiB, "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB (own process)")
    print(f"engine peak RSS includes its preallocated KV pool of {eng['kv_pool_mib']:.0f} MiB (--kv-cache-memory-gb)")
    if hf:
        print(f"HF baseline model: {hf['weights']}")
    agree = None
    if hf and "equal" in job["scenarios"]:
        agree = agreement(eng["results"]["equal"]["output_ids"], hf["results"]["equal"]["output_ids"])
        print(f"greedy agreement (equal): {agree['fraction']:.0%} of requests agree on the first {min(AGREE_PREFIX, args.output_len)} "
              f"tokens; mean common prefix {agree['mean_common_prefix']:.1f} tokens (informative: bf16 differs)")
    if hf and not hf["tokenizers_agree"]:
        print("note: the HF tokenizer encodes the prompts differently; both systems still got the engine's ids")
    print()
    targets = {}
    for name, goal in TARGETS.items():
        if name not in job["scenarios"]:
            continue
        r = ratios.get(name)
        verdict = "n/a (HF skipped)" if r is None else ("PASS" if r >= goal else "MISS")
        targets[name] = {"target": goal, "ratio": r, "verdict": verdict}
        shown = "-" if r is None else f"{r:.2f}x"
        print(f"target {name:<6} engine >= {goal:.1f}x HF: {shown:>7}  {verdict}")
    return {"rows": rows, "ratios": ratios, "targets": targets, "agreement": agree}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=32, help="requests per batch scenario")
    p.add_argument("--words", type=int, default=100, help="words per prompt (pseudo-English)")
    p.add_argument("--output-len", type=int, default=128, help="new tokens per request (equal, single)")
    p.add_argument("--min-len", type=int, default=16, help="shortest output of the mixed scenario")
    p.add_argument("--max-len", type=int, default=256, help="longest output of the mixed scenario")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt text and the mixed lengths")
    p.add_argument("--scenarios", default="equal,mixed,single", help="comma list of equal, mixed, single")
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--skip-hf", action="store_true", help="run the engine only")
    p.add_argument("--hf-batch-size", type=int, default=None, help="HF static batch size (default: all prompts)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=None, help="engine KV pool (default: the engine's, 1.0)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine batch size limit (default: the engine's, 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="engine token budget per step (default: the engine's, 512)")
    p.add_argument("--prefix-caching", action="store_true",
                   help="keep the engine's prefix cache on (off by default: the scenarios reuse the same "
                        "prompts, and cache hits would skip prefill work HF has to do)")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    p.add_argument("--worker", choices=["engine", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in ("equal", "mixed", "single")]
    if bad or not args.scenarios:
        p.error(f"--scenarios takes a comma list of equal, mixed, single; got {bad or 'nothing'}")
    for name in ("num_prompts", "words", "output_len", "min_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_len < args.min_len:
        p.error("--max-len must be >= --min-len")
    if args.hf_batch_size is not None and args.hf_batch_size < 1:
        p.error("--hf-batch-size must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(sys.stdin.read())
        result = run_engine(job) if args.worker == "engine" else run_hf(job)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return
    job = build_job(args)
    eng = run_worker("engine", job)
    hf = None
    if not args.skip_hf:
        job_hf = job | {"model_path": eng["model_path"], "prompt_ids": eng["prompt_ids"], "warmup_ids": eng["warmup_ids"]}
        hf = run_worker("hf", job_hf)
    summary = report(args, job, eng, hf)
    if args.json:
        out = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "cpu": cpu_model(),
               "engine": eng, "hf": hf, "lengths": job["lengths"]} | summary
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
