"""Would the target's own first layers make a useful draft ("early exit", self-speculation)?

For each workload prompt this runs the default model greedily (HF transformers, float32: the exact
path), then reads every layer's hidden state along prompt + output and asks, position by position,
whether the first L layers alone (then the final norm and the LM head) predict the token the whole
model chose. Those agreements decide exactly what an early-exit draft would get accepted: its j-th
proposal is scored only if the earlier ones were accepted, and then its input is the target's own
sequence. A draft step costs L/N of a one-row step's layers plus the LM head; a verification step
with k proposals costs a (k + 1)-row step, measured here on this machine with the engine. The
result, per exit layer L and proposal length k: the decode speedup over no speculation, beside
n-gram proposals on the same outputs under the same step costs.

    .venv/bin/python benchmarks/early_exit_eval.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spec_decode import WORKLOADS, prompt_ids
from splitserve import LLM, SamplingParams


def step_costs(llm: LLM, max_rows: int) -> tuple[dict[int, float], float]:
    """Median model time (ms) of a decode step of r rows (r sequences at once), r = 1..max_rows, and
    of the LM head for one row."""
    eng = llm.engine
    times: dict[int, list[float]] = {}
    execute = eng.runner.execute

    def timed(scheduled):
        t0 = time.perf_counter()
        out = execute(scheduled)
        rows = sum(n for _, n in scheduled)
        times.setdefault(rows, []).append(1e3 * (time.perf_counter() - t0))
        return out

    eng.runner.execute = timed
    try:
        for r in range(1, max_rows + 1):
            llm.generate([f"Tell me about the number {i}." for i in range(r)],
                         SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    finally:
        eng.runner.execute = execute
    cost = {r: statistics.median(times[r]) for r in range(1, max_rows + 1)}
    head = eng.model.lm_head
    x = torch.randn(1, eng.model.args.hidden_size)
    head(x)
    t0 = time.perf_counter()
    for _ in range(20):
        head(x)
    return cost, 1e3 * (time.perf_counter() - t0) / 20


def agreements(hf, ids: list[int], n_prompt: int) -> torch.Tensor:
    """[layers + 1, outputs]: whether the first L layers' prediction at each output position equals
    the token the whole model chose there (row L; row N is all true)."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        target = torch.tensor(ids[n_prompt:])
        rows = []
        for h in out.hidden_states:  # embeddings, then after each layer (the last one already normed)
            h = h[0, n_prompt - 1: len(ids) - 1]
            if len(rows) < len(out.hidden_states) - 1:
                h = hf.model.norm(h)
            rows.append(hf.lm_head(h).argmax(-1) == target)
    return torch.stack(rows)


def speedup(agree: torch.Tensor, k: int, layers: int, exit_layer: int, cost: dict[int, float], head: float) -> float:
    """Decode time without speculation over time with an early-exit draft of k tokens a step."""
    n = agree.shape[0]
    draft = exit_layer / layers * (cost[1] - head) + head
    pos, spent = 0, 0.0
    while pos < n:
        kk = min(k, n - pos - 1)
        accepted = 0
        while accepted < kk and bool(agree[pos + accepted]):
            accepted += 1
        spent += kk * draft + cost[kk + 1]
        pos += accepted + 1
    return n * cost[1] / spent


def ngram_speedup(ids: list[int], n_prompt: int, k: int, cost: dict[int, float]) -> float:
    """The same accounting for n-gram proposals (lookup 2..4, no draft cost), for comparison."""
    from splitserve.engine.speculative import ngram_proposal

    n, pos, spent = len(ids) - n_prompt, 0, 0.0
    while pos < n:
        proposal = ngram_proposal(ids[: n_prompt + pos], min(k, n - pos - 1), 2, 4)
        accepted = 0
        while accepted < len(proposal) and proposal[accepted] == ids[n_prompt + pos + accepted]:
            accepted += 1
        spent += cost[len(proposal) + 1]
        pos += accepted + 1
    return n * cost[1] / spent


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--exits", default="4,8,12,16,20,24")
    p.add_argument("--k", default="1,2,3,4")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    llm = LLM(kv_cache_memory_gb=0.3)
    ks = [int(k) for k in args.k.split(",")]
    exits = [int(e) for e in args.exits.split(",")]
    cost, head = step_costs(llm, max(ks) + 1)  # before HF's model shares the process
    path = llm.engine.model_path
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    print(json.dumps({"step_ms_by_rows": {r: round(c, 2) for r, c in cost.items()}, "lm_head_ms": round(head, 2)}))
    layers = hf.config.num_hidden_layers
    results = []
    for workload, prompts in WORKLOADS.items():
        agree, ngram = [], {k: [] for k in ks}
        for ids in prompt_ids(llm.tokenizer, prompts):
            out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=args.max_tokens))[0]
            agree.append(agreements(hf, ids + out.token_ids, len(ids)))
            for k in ks:
                ngram[k].append(ngram_speedup(ids + out.token_ids, len(ids), k, cost))
        results.append({"workload": workload, "method": "ngram",
                        **{f"speedup_k{k}": round(statistics.fmean(v), 2) for k, v in ngram.items()}})
        print(json.dumps(results[-1]), flush=True)
        for e in exits:
            row = {"workload": workload, "method": "early_exit", "exit_layer": e,
                   "agreement": round(float(torch.cat([a[e] for a in agree]).float().mean()), 3)}
            for k in ks:
                row[f"speedup_k{k}"] = round(statistics.fmean(
                    speedup(a[e], k, layers, e, cost, head) for a in agree), 2)
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"step_ms_by_rows": cost, "lm_head_ms": head, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
