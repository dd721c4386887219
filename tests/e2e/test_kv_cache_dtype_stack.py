"""An 8-bit KV cache across processes (issue 22): `up --kv-cache-dtype int8` moves int8 blocks with
their scales from the prefill worker through the kvstore into the decode worker, which imports them
and answers with the tokens of a cold in-process engine with the same cache dtype; and a decode
worker whose cache has another dtype than the prefill worker's refuses the blocks (the header's
dtype), recomputes the prompt and answers as its own dtype does, never reading int8 bytes as
floats. In-engine paths (prefix hits, chunking, the wire format alone) are in
tests/engine/test_path_invariance.py and tests/engine/test_kv_cache.py."""
from __future__ import annotations

import pytest

from splitserve import SamplingParams
from splitserve.client import generate

TEXT = ("In the spring of that year the river rose higher than anyone in the village could remember, "
        "and the miller, who had lived beside it for sixty years, moved his family to the hill.")
LENGTHS = (21, 38)  # one and two full blocks to move
SAMPLING = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def _stack(*flags):
    from services_fixture import start_stack

    return start_stack("--dtype", "float32", "--kv-cache-memory-gb", "0.05", *flags)


@pytest.fixture(scope="module")
def int8_stack():
    s = _stack("--kv-cache-dtype", "int8")
    yield s
    assert s.stop() == 0, "\n".join(s.log[-30:])


@pytest.fixture(scope="module")
def mixed_stack():
    s = _stack("--prefill-kv-cache-dtype", "int8", "--decode-kv-cache-dtype", "float32")
    yield s
    assert s.stop() == 0, "\n".join(s.log[-30:])


def _cold(llm_f32, prompts, kv_cache_dtype):
    cold = llm_f32.with_config(kv_cache_memory_gb=0.03, enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype)
    return [o.token_ids for o in cold.generate(prompts, SamplingParams(**SAMPLING))]


@pytest.fixture(scope="module")
def prompts(llm_f32):
    ids = llm_f32.tokenizer.encode(TEXT)
    return [ids[:n] for n in LENGTHS]


def test_int8_blocks_travel_with_their_scales(int8_stack, llm_f32, prompts):
    assert any("kv_cache_dtype=int8" in line for line in int8_stack.log)
    refs = _cold(llm_f32, prompts, "int8")
    for p, ref in zip(prompts, refs):
        got, _, final = generate(int8_stack.gateway, token_ids=p, sampling=SAMPLING, timeout_s=120)
        assert got == ref, f"{len(p)}-token prompt"
    load = int8_stack.decode_load()
    # the 38-token prompt's two full blocks; the first is the 21-token one's, imported once
    assert load.num_imported_blocks == 38 // 16, load
    assert not any("KV block import failed" in line for line in int8_stack.log)


def test_a_decode_worker_of_another_kv_dtype_refuses_and_recomputes(mixed_stack, llm_f32, prompts):
    refs = _cold(llm_f32, prompts, "float32")
    for p, ref in zip(prompts, refs):
        got, _, final = generate(mixed_stack.gateway, token_ids=p, sampling=SAMPLING, timeout_s=120)
        assert got == ref, f"{len(p)}-token prompt"
    refused = [line for line in mixed_stack.log if "KV block import failed" in line]
    assert refused and all("dtype mismatch: block has 'int8', this cache has 'float32'" in line for line in refused)
