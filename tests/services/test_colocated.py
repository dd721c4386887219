"""`splitserve up --colocated`: the comparison baseline (one engine prefills and decodes, no
kvstore) behind the same gateway, serving the same outputs, with n-gram speculative decoding on
(the greedy answers are the same with it)."""
from __future__ import annotations

import json
import os
import re
import urllib.request

import pytest

from services_fixture import start_stack
from splitserve import LLM
from splitserve.client import generate
from splitserve.config.cpus import available_cpus, format_cpu_list, parse_cpu_list
from splitserve.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, in a small village,",
           "List the colours again: red, green, blue, yellow, red, green, blue, yellow, red, green,"]
SPECULATIVE = '{"method": "ngram", "num_speculative_tokens": 4}'


@pytest.mark.timeout(400)
def test_colocated_stack_serves_the_offline_engines_outputs(llm_f32):
    """Started without --dtype: the default, "auto", which on a CPU without native bf16 is float32,
    so the stack `make serve` starts answers as LLM(dtype="float32") does (issue 18)."""
    from splitserve.model.loader import resolve_model_dtype

    chosen, why = resolve_model_dtype("auto", "cpu")
    offline = llm_f32 if chosen == "float32" else LLM(dtype=chosen, kv_cache_memory_gb=0.05)
    refs = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    pin = str(available_cpus()[-1])  # pinned to one core (any machine has one): --prefill-cpus reaches it
    stack = start_stack("--colocated", "--kv-cache-memory-gb", "0.1", "--prefill-cpus", pin,
                        "--speculative-config", SPECULATIVE)
    try:
        assert any(f"dtype auto -> {chosen}" in line for line in stack.log), why
        assert set(stack.roles) >= {"colocated-0"} and "kvstore" not in stack.roles
        pid = stack.pids["colocated-0"]
        threads = os.listdir(f"/proc/{pid}/task")
        assert len(threads) > 3  # the engine loop, gRPC and torch's threads: all of them pinned
        for tid in threads:
            assert os.sched_getaffinity(int(tid)) == {int(pin)}, tid
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
        accepted = [line for line in text.splitlines()
                    if line.startswith("splitserve_spec_decode_num_accepted_tokens_total{")]
        assert accepted and float(accepted[0].split()[-1]) > 0  # the repeated colours were proposed
        with urllib.request.urlopen(stack.http_base.removesuffix("/v1") + "/health", timeout=30) as resp:
            health = json.loads(resp.read())
        assert health["prefill"] == health["decode"] == {"healthy": 1, "draining": 0, "total": 1}
    finally:
        assert stack.stop() == 0, "\n".join(stack.log[-30:])


def test_cpu_lists_parse_in_tasksets_format_and_name_what_is_wrong():
    cpus = available_cpus()
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus
    assert format_cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert parse_cpu_list(f"{cpus[0]}") == [cpus[0]]
    for bad, words in (("x", "'x' is not a core number"), ("3-1", "'3-1' is not a range"),
                       ("", "'' is not a core number"), ("4096", "[4096] are not available")):
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_cpu_list(bad)


def test_up_refuses_a_bad_cpu_list_before_starting_anything():
    import subprocess
    import sys

    for flags, words in ((["--decode-cpus", "99999"], "--decode-cpus: cpu list '99999'"),
                         (["--colocated", "--decode-cpus", "0"], "no decode workers")):
        out = subprocess.run([sys.executable, "-m", "splitserve.launch.cli", "up", *flags], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode != 0 and words in out.stderr, out.stderr
