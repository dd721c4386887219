"""Speculative decoding against none, in one process, alternating: output tokens per second of the
same greedy workloads on the default model (float32) with and without proposals, at 1 and at 32
concurrent sequences, and the acceptance rate.

Workloads: "overlap" (the output copies from the prompt: code to repeat, a list to continue) and
"free" (stories, where nothing repeats). Each (workload, streams) cell runs --rounds times per
configuration, the configurations alternating, and reports the best of each and their ratio.

    .venv/bin/python benchmarks/spec_decode.py                       # ngram, k=4
    .venv/bin/python benchmarks/spec_decode.py --spec '{"method": "ngram", "num_speculative_tokens": 6}'
"""
from __future__ import annotations

import argparse
import json
import time

from splitserve import LLM, SamplingParams

CODE = '''def parse_record(line):
    fields = line.strip().split(",")
    name, age, city = fields[0], int(fields[1]), fields[2]
    return {"name": name, "age": age, "city": city}


def load(path):
    with open(path) as f:
        return [parse_record(line) for line in f if line.strip()]
'''
OVERLAP = [
    "Here is a Python file:\n\n" + CODE + "\nThe same file again, unchanged:\n\n",
    "Record: name=Alice Smith; age=34; city=Lisbon; job=engineer; team=storage.\n"
    "Copy the record exactly:\nRecord: name=",
    "Continue the list: Monday 09:00 standup, Monday 10:00 review, Monday 11:00 planning, "
    "Tuesday 09:00 standup, Tuesday 10:00 review, Tuesday 11:00 planning, Wednesday 09:00",
]
FREE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe a walk through a busy market in a city you invent.",
    "Tell a fable about a fox, a crow and a clever mouse.",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default='{"method": "ngram", "num_speculative_tokens": 4}')
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--streams", default="1,32")
    return p.parse_args(argv)


def run(llm: LLM, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    return time.perf_counter() - t0, sum(len(o.token_ids) for o in outs)


def main(argv=None) -> None:
    args = parse_args(argv)
    base = LLM(dtype="float32", kv_cache_memory_gb=0.5)
    configs = {"off": base.with_config(kv_cache_memory_gb=0.5, enable_prefix_caching=False),
               "spec": base.with_config(kv_cache_memory_gb=0.5, enable_prefix_caching=False,
                                        speculative_config=json.loads(args.spec))}
    stats = configs["spec"].engine.spec.stats
    results = []
    for workload, prompts in (("overlap", OVERLAP), ("free", FREE)):
        for streams in (int(s) for s in args.streams.split(",")):
            batch = [prompts[i % len(prompts)] for i in range(streams)]
            best = {"off": 0.0, "spec": 0.0}
            drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
            run(configs["off"], batch[:1], 4)  # warm-up
            for _ in range(args.rounds):
                for name, llm in configs.items():
                    seconds, tokens = run(llm, batch, args.max_tokens)
                    best[name] = max(best[name], tokens / seconds)
            d, a = stats.num_draft_tokens - drafted, stats.num_accepted_tokens - accepted
            row = {"workload": workload, "streams": streams, "off_tok_s": round(best["off"], 1),
                   "spec_tok_s": round(best["spec"], 1), "ratio": round(best["spec"] / best["off"], 2),
                   "draft_tokens": d, "acceptance": round(a / d, 2) if d else None}
            results.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
