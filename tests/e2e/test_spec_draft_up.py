"""Draft-model speculation through `splitserve up`, disaggregated, float32, with both drafts of the
offline tests (tests/engine/test_speculative.py): a seeded random 2-layer draft (few proposals
accepted: most verifications reject and roll back) and the default model as its own draft (every
greedy proposal accepted). Every greedy answer, logprobs included, is that of this process without
speculation, and the worker's speculation metrics add up. (The n-gram method through `up`:
tests/e2e/test_up_flags.py.)"""
from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services_fixture import start_stack
from splitserve import SamplingParams
from splitserve.client import stream_generate
from tests.engine.test_speculative import make_random_draft

PROMPTS = ["List the colours again: red, green, blue, yellow, red, green, blue, yellow, red, green,",
           "Write one sentence about the sea.",
           "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):"]
SAMPLING = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 2}
# Served logprobs differ from this process's in the last bits with or without speculation (the
# prompt's K/V arrive through the kvstore from the prefill worker); offline, speculation leaves
# them bit for bit (tests/engine/test_speculative.py).
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["random", "self"])
def draft_stack(request, tmp_path_factory, llm_f32):
    if request.param == "random":
        folder = make_random_draft(tmp_path_factory.mktemp("draft"), llm_f32)
    else:
        folder = str(llm_f32.engine.model_path)
    spec = json.dumps({"method": "draft_model", "model": folder, "num_speculative_tokens": 3})
    s = start_stack("--dtype", "float32", "--kv-cache-memory-gb", "0.1", "--decode-speculative-config", spec)
    s.draft = request.param
    yield s
    assert s.stop() == 0, "\n".join(s.log[-30:])


def spec_metrics(stack) -> dict[str, float]:
    with urllib.request.urlopen(stack.metrics["decode-0"], timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("splitserve_spec_decode_"):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_a_draft_model_through_up_keeps_greedy_output_and_logprobs(draft_stack, llm_f32):
    prompts = [llm_f32.tokenizer.encode(p) for p in PROMPTS]
    refs = llm_f32.with_config(kv_cache_memory_gb=0.05).generate(prompts, SamplingParams(**SAMPLING))
    before = spec_metrics(draft_stack)
    for prompt, ref in zip(prompts, refs):
        ids, lps = [], []
        for msg in stream_generate(draft_stack.gateway, token_ids=prompt, sampling=SAMPLING, timeout_s=120):
            ids.extend(msg.token_ids)
            lps.extend(msg.logprobs)
        assert ids == ref.token_ids
        assert [lp.token_id for lp in lps] == [lp.token_id for lp in ref.logprobs]
        for got, want in zip(lps, ref.logprobs):
            assert abs(got.logprob - want.logprob) < LOGPROB_TOLERANCE
            assert [t.token_id for t in got.top] == [t for t, _ in want.top]
    after = spec_metrics(draft_stack)
    drafted = after["splitserve_spec_decode_num_draft_tokens_total"] - before.get(
        "splitserve_spec_decode_num_draft_tokens_total", 0)
    accepted = after["splitserve_spec_decode_num_accepted_tokens_total"] - before.get(
        "splitserve_spec_decode_num_accepted_tokens_total", 0)
    assert drafted >= 3 * len(PROMPTS), "the draft proposed (almost) nothing"
    if draft_stack.draft == "random":
        assert accepted < drafted / 2  # most proposals rejected, and the answers still equal
    else:
        assert accepted == drafted  # the model agrees with itself
    assert after["splitserve_spec_decode_num_accepted_tokens_per_pos_total"] == \
        after["splitserve_spec_decode_num_accepted_tokens_total"]
