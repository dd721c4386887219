"""Path-invariant greedy output: for one model and dtype, a request's greedy tokens do not depend on
how its prompt was computed (issue 18).

The paths, each on its own KV cache sharing the session's weights (`LLM.with_config`):
    cold       prefix caching off, the request alone
    full hit   the same prompt run before: its full blocks come from the cache, only the rest
               is computed
    partial    a donor prompt sharing the first len-2 tokens cached before: the hit ends inside a
               block (the shared tokens' KV copied into a fresh block)
    chunked    prefill split by max_num_batched_tokens 7 (chunks of 7 and less, with other
               sequences' decodes in the step) and by long_prefill_token_threshold 5
    batch      the prompts inside one batch of 32 prompts of other lengths
in float32 (the session's engine, which is also the one compared with HF transformers) and in
bfloat16 (bf16-rounded weights, a bf16 KV cache; on a CPU without bf16 instructions the arithmetic
is float32). In bfloat16 the cold prefill used to attend over its freshly computed float32 K/V
while every other path read them back rounded from the cache: greedy answers differed. And float32
with an 8-bit KV cache (`kv_cache_dtype` int8, fp8_e4m3: one scale per token and KV head, so a
token's stored bits never depend on its block's other tokens or on how its prefill was cut).
"""
from __future__ import annotations

import pytest

from splitserve import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
TEXT = ("In the spring of that year the river rose higher than anyone in the village could remember, "
        "and the miller, who had lived beside it for sixty years, moved his family to the hill.")
LENGTHS = (6, 21, 38)  # inside one block, just past one, past two
FILLER = " The weather report for tomorrow says light rain in the morning and sun after noon."
SMALL_CACHE = 0.03


class KVVariant:
    """The session's float32 model with another KV-cache dtype on every engine the tests derive."""

    def __init__(self, base, kv_cache_dtype: str) -> None:
        self.base, self.kv_cache_dtype = base, kv_cache_dtype
        self.tokenizer, self.config = base.tokenizer, base.config

    def with_config(self, **overrides):
        return self.base.with_config(kv_cache_dtype=self.kv_cache_dtype, **overrides)


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float32-kv-int8", "float32-kv-fp8_e4m3"])
def llm(request, llm_f32, llm_bf16):
    if request.param.startswith("float32-kv-"):
        return KVVariant(llm_f32, request.param.removeprefix("float32-kv-"))
    return llm_f32 if request.param == "float32" else llm_bf16


@pytest.fixture(scope="module")
def prompts(llm_f32):
    ids = llm_f32.tokenizer.encode(TEXT)
    assert len(ids) >= max(LENGTHS)
    return [ids[:n] for n in LENGTHS]


@pytest.fixture(scope="module")
def cold(llm, prompts):
    """The reference: each prompt alone, nothing cached."""
    fresh = llm.with_config(kv_cache_memory_gb=SMALL_CACHE, enable_prefix_caching=False)
    if isinstance(llm, KVVariant):
        assert fresh.engine.kv_cache.dtype_name == llm.kv_cache_dtype
    return [fresh.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_full_prefix_hit(llm, prompts, cold):
    cached = llm.with_config(kv_cache_memory_gb=SMALL_CACHE)
    cached.generate(prompts, GREEDY)
    for p, ref in zip(prompts, cold):
        (out,) = cached.generate([p], GREEDY)
        # The prompts are prefixes of one text, so the 38-token one's two full blocks serve the
        # others too: 6 -> 5 and 21 -> 20 tokens (all but the last, whose logits are needed; the
        # hit ends inside a block), 38 -> its 32 (its third block was never full, so never cached).
        assert out.num_cached_tokens == {6: 5, 21: 20, 38: 32}[len(p)]
        assert out.token_ids == ref, f"{len(p)}-token prompt, {out.num_cached_tokens} cached"


def test_partial_block_hit(llm, prompts, cold):
    filler = llm.tokenizer.encode(FILLER)
    bs = llm.config.cache.block_size
    for p, ref in zip(prompts, cold):
        cached = llm.with_config(kv_cache_memory_gb=SMALL_CACHE)
        shared = len(p) - 2
        donor = p[:shared] + filler  # diverges at `shared`; its full blocks get cached
        assert len(donor) >= (shared // bs + 1) * bs
        cached.generate([donor], GREEDY)
        (out,) = cached.generate([p], GREEDY)
        assert out.num_cached_tokens == shared and shared % bs  # the hit ends inside a block
        assert out.token_ids == ref, f"{len(p)}-token prompt, {shared} cached"


@pytest.mark.parametrize("chunking", [{"max_num_batched_tokens": 7}, {"long_prefill_token_threshold": 5}],
                         ids=["budget7", "threshold5"])
def test_chunked_prefill(llm, prompts, cold, chunking):
    chunked = llm.with_config(kv_cache_memory_gb=SMALL_CACHE, enable_prefix_caching=False, **chunking)
    outs = chunked.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == cold


def test_batch_of_32_mixed_lengths(llm, prompts, cold):
    filler = llm.tokenizer.encode(FILLER + TEXT)
    others = [filler[: 3 + (7 * i) % 45] for i in range(32 - len(prompts))]
    batch = others[:10] + prompts[:1] + others[10:20] + prompts[1:] + others[20:]
    assert len(batch) == 32
    fresh = llm.with_config(kv_cache_memory_gb=SMALL_CACHE, enable_prefix_caching=False)
    outs = {tuple(o.prompt_token_ids): o.token_ids for o in fresh.generate(batch, GREEDY)}
    assert [outs[tuple(p)] for p in prompts] == cold


def _run(engine, request_id: str, ids: list[int], params: SamplingParams, **kwargs):
    """Runs one request on `engine` to its end; (its token ids, its last StepOutput)."""
    engine.add_request(request_id, ids, params, **kwargs)
    tokens, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
            last = out
    return tokens, last


def test_disaggregated_through_exported_blocks(llm, prompts, cold):
    """Prefill on one engine, decode on another: the prompt's full KV blocks exported in the wire
    format (transfer.block: header and payload bytes, what the kvstore, shm and gRPC carry byte for
    byte, checksummed) and imported by the decoding engine, which continues from the first token.
    The processes and the transports themselves run in tests/e2e/test_stack_path_invariance.py (float32,
    the session stack); here both dtypes run in one process, which costs no stack start."""
    bs = llm.config.cache.block_size
    for i, (p, ref) in enumerate(zip(prompts, cold)):
        prefill = llm.with_config(kv_cache_memory_gb=SMALL_CACHE)
        first, out = _run(prefill.engine, f"p{i}", p, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                          export_blocks=True)
        assert len(out.exported_blocks) == len(p) // bs
        decode = llm.with_config(kv_cache_memory_gb=SMALL_CACHE)
        assert decode.engine.import_blocks(out.exported_blocks) == len(p) // bs
        rest, last = _run(decode.engine, f"d{i}", p, GREEDY, output_token_ids=first)
        assert last.num_cached_tokens == len(p) // bs * bs
        assert first + rest == ref, f"{len(p)}-token prompt"
