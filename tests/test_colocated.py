"""`splitserve up --colocated`: the comparison baseline (one engine prefills and decodes, no
kvstore) behind the same gateway, serving the same outputs."""
from __future__ import annotations

import json
import urllib.request

import pytest

from services_fixture import start_stack
from splitserve.client import generate
from splitserve.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, in a small village,"]


@pytest.mark.timeout(400)
def test_colocated_stack_serves_the_offline_engines_outputs(llm_f32):
    refs = llm_f32.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    stack = start_stack("--colocated", "--dtype", "float32", "--kv-cache-memory-gb", "0.1")
    try:
        assert set(stack.roles) >= {"colocated-0"} and "kvstore" not in stack.roles
        for prompt, ref in zip(PROMPTS, refs):
            ids, text, final = generate(stack.gateway, prompt=prompt,
                                        sampling={"max_tokens": 10, "temperature": 0, "ignore_eos": True},
                                        timeout_s=120)
            assert ids == ref.token_ids and text == ref.text and final.finish_reason == "length"
        load = stack.prefill_load("colocated-0")
        assert load.worker_id.startswith("colocated:")
        assert load.num_imported_blocks == 0 and load.num_recomputed == 0  # decode used the local cache
        with urllib.request.urlopen(stack.metrics["colocated-0"], timeout=30) as resp:
            text = resp.read().decode()
        assert 'role="colocated"' in text
        with urllib.request.urlopen(stack.http_base.removesuffix("/v1") + "/health", timeout=30) as resp:
            health = json.loads(resp.read())
        assert health["prefill"] == {"healthy": 1, "total": 1} and health["decode"] == {"healthy": 1, "total": 1}
    finally:
        assert stack.stop() == 0, "\n".join(stack.log[-30:])
