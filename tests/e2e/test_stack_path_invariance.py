"""Path-invariant greedy output across processes (issue 18): the session stack (`http_stack`: one
prefill and one decode worker, float32, on this machine at the default dtype as `make serve`
starts it, the KV moved through the kvstore) answers a greedy request with the tokens of a cold
prefill in this process (`llm_f32`), the first time (prefill computes
every block, decode imports them) and again (the prefill worker's prefix cache and the decode
worker's own blocks serve the prompt). The same comparison in bfloat16 and for every in-engine
path is tests/engine/test_path_invariance.py; the colocated stack, started at the default dtype,
is tests/services/test_colocated.py."""
from __future__ import annotations

from splitserve import SamplingParams
from splitserve.client import generate

TEXT = ("In the spring of that year the river rose higher than anyone in the village could remember, "
        "and the miller, who had lived beside it for sixty years, moved his family to the hill.")
LENGTHS = (6, 21, 38)
SAMPLING = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def test_disaggregated_stack_matches_the_cold_engine(http_stack, llm_f32):
    if http_stack.default_dtype:  # started as `make serve` starts it: the default "auto" chose float32
        assert any("dtype auto -> float32" in line for line in http_stack.log)
    ids = llm_f32.tokenizer.encode(TEXT)
    prompts = [ids[:n] for n in LENGTHS]
    cold = llm_f32.with_config(kv_cache_memory_gb=0.03, enable_prefix_caching=False)
    refs = [o.token_ids for o in cold.generate(prompts, SamplingParams(**SAMPLING))]
    for attempt in ("first", "cached"):
        for p, ref in zip(prompts, refs):
            got, _, final = generate(http_stack.gateway, token_ids=p, sampling=SAMPLING, timeout_s=120)
            assert got == ref, f"{attempt} run, {len(p)}-token prompt"
            assert final.finish_reason == "length"
