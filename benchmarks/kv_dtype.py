"""What a KV-cache dtype buys when the pool is what limits a batch: throughput of one engine per
--kv-cache-dtype over the same small pool, in this process, alternating dtypes round by round.

Workload: --requests prompts of --prompt-len random tokens (seeded), --output-len greedy tokens each
(ignore_eos), all submitted at once to an engine with a --kv-cache-memory-gb pool. A float32 pool of
0.1 GiB holds 2,320 tokens of the default model: with 512 + 64-token sequences, 4 run at a time;
the same bytes in int8 hold 3.8x the tokens, so ~15 do. Each dtype's engine shares the one loaded
model's weights (`LLM.with_config`), so only the cache differs. Figures: output tok/s (submission to
the last token), the most sequences one step ran, and the ratio to float32's in the same round.

    .venv/bin/python benchmarks/kv_dtype.py                      # float32, bfloat16, int8, fp8_e4m3
    .venv/bin/python benchmarks/kv_dtype.py --dtypes float32,int8 --rounds 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16,int8,fp8_e4m3", help="comma list; the first is the baseline")
    p.add_argument("--kv-cache-memory-gb", type=float, default=0.1)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name in ("requests", "prompt_len", "output_len", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run(llm, prompts: list[list[int]], output_len: int) -> dict:
    from splitserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"out_tok_s": tokens / seconds, "seconds": seconds, "max_batch": llm.engine.stats.max_batch_size,
            "pool_tokens": llm.engine.kv_cache.num_blocks * llm.engine.kv_cache.block_size,
            "outputs": [o.token_ids for o in outs]}


def main(argv=None) -> None:
    from splitserve import LLM

    args = parse_args(argv)
    base = LLM(dtype="float32", kv_cache_memory_gb=0.01)
    rng = random.Random(args.seed)
    vocab = base.engine.model.args.vocab_size
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    rounds = []
    for r in range(args.rounds):
        order = args.dtypes if r % 2 == 0 else list(reversed(args.dtypes))
        row = {}
        for dtype in order:
            llm = base.with_config(kv_cache_memory_gb=args.kv_cache_memory_gb, kv_cache_dtype=dtype,
                                   enable_prefix_caching=False)
            row[dtype] = run(llm, prompts, args.output_len)
            del llm
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{d} {row[d]['out_tok_s']:.1f} tok/s (batch {row[d]['max_batch']})"
                                            for d in args.dtypes), flush=True)
    first = args.dtypes[0]
    print(f"\n{args.requests} requests x ({args.prompt_len} prompt + {args.output_len} output) tokens, "
          f"{args.kv_cache_memory_gb} GiB pool; ratio: median over rounds of each round's tok/s against {first}'s")
    print(f"{'kv dtype':<10} {'pool tokens':>11} {'max batch':>9} {'best tok/s':>10} {'ratio':>6} {'same tokens':>11}")
    summary = {}
    for dtype in args.dtypes:
        best = max(r[dtype]["out_tok_s"] for r in rounds)
        ratio = statistics.median(r[dtype]["out_tok_s"] / r[first]["out_tok_s"] for r in rounds)
        ref, got = rounds[0][first]["outputs"], rounds[0][dtype]["outputs"]
        same = sum(a == b for x, y in zip(ref, got) for a, b in zip(x, y)) / sum(len(x) for x in ref)
        summary[dtype] = {"pool_tokens": rounds[0][dtype]["pool_tokens"], "max_batch": rounds[0][dtype]["max_batch"],
                          "best_tok_s": best, "ratio": ratio, "token_agreement": same}
        print(f"{dtype:<10} {summary[dtype]['pool_tokens']:>11} {summary[dtype]['max_batch']:>9} {best:>10.1f} "
              f"{ratio:>5.2f}x {same:>11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary,
                       "rounds": [{d: {k: v for k, v in x.items() if k != "outputs"} for d, x in r.items()}
                                  for r in rounds]}, f, indent=1)


if __name__ == "__main__":
    main()
