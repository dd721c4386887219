"""Speculative decoding against none, alternating: output tokens per second of the same greedy
workloads on the default model with and without proposals, at 1 and at 32 concurrent streams, and
the acceptance rate.

Workloads: "overlap" (the output copies from the prompt: code to repeat with one change, a record
to copy, a list to continue) and "free" (stories, where nothing repeats). Each (workload, streams)
cell runs --rounds times per configuration, the configurations alternating, and reports the best of
each and their ratio.

By default both configurations are served: two `splitserve up` stacks (disaggregated, the second
with --decode-speculative-config), each request streamed over the OpenAI HTTP API, and three rates
per cell: output tok/s (all tokens over the cell's wall time, prefill included), decode tok/s per
stream (tokens after the first over the time after the first: what speculation speeds up) and the
time to first token. --offline runs the same cells in one process through `LLM.generate` instead.

    .venv/bin/python benchmarks/spec_decode.py                       # served, ngram, k=8
    .venv/bin/python benchmarks/spec_decode.py --spec '{"method": "ngram", "num_speculative_tokens": 6}'
    .venv/bin/python benchmarks/spec_decode.py --offline --streams 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.request

from splitserve import LLM, SamplingParams

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # vs_llamacpp: the streaming HTTP client and `splitserve up` as a system

CODE = '''def parse_record(line):
    fields = line.strip().split(",")
    name, age, city = fields[0], int(fields[1]), fields[2]
    return {"name": name, "age": age, "city": city}


def load(path):
    with open(path) as f:
        return [parse_record(line) for line in f if line.strip()]
'''
RECORD = "name=Alice Smith; age=34; city=Lisbon; job=engineer; team=storage; id=A-10442; email=alice.smith@example.org"
# (kind, text): "chat" goes through the model's chat template (an instruction, as a user asks it),
# "text" is a plain prompt to continue. Each ends where the model stops (EOS) or at --max-tokens.
OVERLAP = [
    ("chat", "Rename the function `load` to `read_all` in this code and show the whole file:\n\n```python\n"
             + CODE + "```"),
    ("chat", "Copy this record exactly, then write it again with the age changed to 35.\nRecord: " + RECORD),
    ("text", ("Continue the list: Monday 09:00 standup, Monday 10:00 review, Monday 11:00 planning, "
              "Tuesday 09:00 standup, Tuesday 10:00 review, Tuesday 11:00 planning, Wednesday 09:00")),
]
FREE = [
    ("chat", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    ("chat", "Describe a walk through a busy market in a city you invent."),
    ("chat", "Tell a fable about a fox, a crow and a clever mouse."),
]
WORKLOADS = {"overlap": OVERLAP, "free": FREE}


def prompt_ids(tokenizer, prompts: list[tuple[str, str]]) -> list[list[int]]:
    """The prompts as token ids, the same for every configuration and for the served API."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}]) if kind == "chat"
            else tokenizer.encode(text) for kind, text in prompts]




def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default='{"method": "ngram", "num_speculative_tokens": 8}',
                   help="the speculative config of the second configuration (JSON)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens of every request")
    p.add_argument("--rounds", type=int, default=3, help="runs of each cell per configuration")
    p.add_argument("--streams", default="1,32", help="concurrent streams of the cells, comma-separated")
    p.add_argument("--workloads", default="overlap,free", help="overlap, free or both")
    p.add_argument("--offline", action="store_true", help="in this process (LLM.generate), not served")
    p.add_argument("--up-arg", action="append", default=[], metavar="FLAG",
                   help="an extra `splitserve up` flag for both stacks (repeat)")
    p.add_argument("--json", metavar="FILE", help="write the rows here")
    args = p.parse_args(argv)
    try:
        args.streams_list = [int(s) for s in args.streams.split(",")]
        json.loads(args.spec)
    except ValueError as exc:
        p.error(f"--streams must be integers and --spec JSON: {exc}")
    args.workload_list = args.workloads.split(",")
    if min(args.streams_list) < 1 or args.max_tokens < 2 or args.rounds < 1:
        p.error("--streams >= 1, --max-tokens >= 2 and --rounds >= 1")
    if not set(args.workload_list) <= set(WORKLOADS):
        p.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    return args


def cells(args, tokenizer):
    """(workload, streams, batches): one stream runs the workload's prompts one after the other;
    N streams send N requests at once, the prompts in turn."""
    for workload in args.workload_list:
        prompts = prompt_ids(tokenizer, WORKLOADS[workload])
        for streams in args.streams_list:
            if streams == 1:
                yield workload, streams, [[p] for p in prompts]
            else:
                yield workload, streams, [[prompts[i % len(prompts)] for i in range(streams)]]


def row(workload: str, streams: int, best: dict, rounds: dict, drafted: int, accepted: int) -> dict:
    """`best`: each configuration's best figures; `rounds`: its output tok/s of every round (a round
    runs both configurations back to back, so the median of the rounds' ratios is given too)."""
    out = {"workload": workload, "streams": streams}
    for key in best["off"]:
        out[f"off_{key}"], out[f"spec_{key}"] = round(best["off"][key], 1), round(best["spec"][key], 1)
    out["ratio_median_of_rounds"] = round(statistics.median(
        s / o for s, o in zip(rounds["spec"], rounds["off"])), 2)
    out["ratio"] = round(best["spec"]["tok_s"] / best["off"]["tok_s"], 2)
    if "decode_tok_s" in best["off"]:
        out["decode_ratio"] = round(best["spec"]["decode_tok_s"] / best["off"]["decode_tok_s"], 2)
    out["draft_tokens"], out["acceptance"] = drafted, round(accepted / drafted, 2) if drafted else None
    return out


def better(old: dict | None, new: dict) -> dict:
    """The best of each figure over the rounds (TTFT: the lowest)."""
    if old is None:
        return new
    return {k: (min if k.startswith("ttft") else max)(old[k], new[k]) for k in new}


# ----------------------------------------------------------------------------- offline
def run_offline(args) -> list[dict]:
    base = LLM(kv_cache_memory_gb=0.5)
    configs = {"off": base.with_config(kv_cache_memory_gb=0.5, enable_prefix_caching=False),
               "spec": base.with_config(kv_cache_memory_gb=0.5, enable_prefix_caching=False,
                                        speculative_config=json.loads(args.spec))}
    stats = configs["spec"].engine.spec.stats
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    rows = []
    for workload, streams, batches in cells(args, base.engine.tokenizer):
        best, rounds = {"off": None, "spec": None}, {"off": [], "spec": []}
        drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
        configs["off"].generate(batches[0][:1], SamplingParams(max_tokens=4))  # warm-up
        for r in range(args.rounds):
            for name in (("off", "spec") if r % 2 == 0 else ("spec", "off")):
                t0, tokens = time.perf_counter(), 0
                for batch in batches:
                    tokens += sum(len(o.token_ids) for o in configs[name].generate(batch, sp))
                rounds[name].append(tokens / (time.perf_counter() - t0))
                best[name] = better(best[name], {"tok_s": rounds[name][-1]})
        rows.append(row(workload, streams, best, rounds, stats.num_draft_tokens - drafted,
                        stats.num_accepted_tokens - accepted))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------- served
def spec_counters(stack) -> tuple[int, int]:
    """(draft tokens, accepted tokens) summed over the stack's decode workers' /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    drafted = accepted = 0
    for name, url in stack.metrics.items():
        if not name.startswith("decode"):
            continue
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "splitserve_spec_decode_num_draft_tokens_total":
                    drafted += int(s.value)
                elif s.name == "splitserve_spec_decode_num_accepted_tokens_total":
                    accepted += int(s.value)
    return drafted, accepted


def served_cell(system, batches: list[list[list[int]]], max_tokens: int) -> dict:
    """The batches one after the other, each batch's requests at once: output tok/s over the whole
    time, decode tok/s (tokens after a stream's first over its time after the first, summed over
    its requests) and the mean time to first token."""
    from vs_llamacpp import concurrent

    wall = tokens = decode_tokens = decode_s = 0.0
    ttft = []
    for batch in batches:
        rs = concurrent(system.base, system.model, batch, max_tokens, ignore_eos=False)
        wall += max(r.arrivals[-1] for r in rs) - min(r.sent for r in rs)
        tokens += sum(r.tokens for r in rs)
        decode_tokens += sum(r.tokens - 1 for r in rs)
        decode_s += sum(r.arrivals[-1] - r.arrivals[0] for r in rs)
        ttft += [r.arrivals[0] - r.sent for r in rs]
    return {"tok_s": tokens / wall, "decode_tok_s": decode_tokens / decode_s if decode_s else float("nan"),
            "ttft_ms": 1e3 * sum(ttft) / len(ttft)}


def run_served(args) -> list[dict]:
    from splitserve.model.paths import check_model_path
    from splitserve.model.tokenizer import load_tokenizer
    from vs_llamacpp import Splitserve, concurrent

    opts = argparse.Namespace(threads=2, kv_cache_memory_gb=0.5, streams=max(args.streams_list),
                              startup_timeout_s=400.0)
    systems = {"off": Splitserve(opts, "off", args.up_arg)}
    try:
        systems["spec"] = Splitserve(opts, "spec", [*args.up_arg, "--decode-speculative-config", args.spec])
        spec = systems["spec"].stack
        tokenizer = load_tokenizer(check_model_path(None))
        rows = []
        for workload, streams, batches in cells(args, tokenizer):
            best, rounds = {"off": None, "spec": None}, {"off": [], "spec": []}
            for system in systems.values():  # warm-up: the prompts' KV in both caches alike
                for batch in batches:
                    concurrent(system.base, system.model, batch, 2)
            drafted, accepted = spec_counters(spec)
            for r in range(args.rounds):
                for name in (("off", "spec") if r % 2 == 0 else ("spec", "off")):
                    cell = served_cell(systems[name], batches, args.max_tokens)
                    rounds[name].append(cell["tok_s"])
                    best[name] = better(best[name], cell)
            d, a = spec_counters(spec)
            rows.append(row(workload, streams, best, rounds, d - drafted, a - accepted))
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        for system in systems.values():
            system.stop()


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run_offline(args) if args.offline else run_served(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
