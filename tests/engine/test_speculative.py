"""Speculative decoding in the engine, on the default model (float32): outputs and logprobs (to the
bit) as without speculation for n-gram and draft-model proposals (the model as its own draft, all greedy
proposals accepted; a random draft from a config, few accepted), stops inside an accepted run,
seeded reproducibility, and no trace of rejected tokens in the block manager."""
from __future__ import annotations

import pytest
import torch

from splitserve import SamplingParams

CACHE_GB = 0.05
PROMPTS = [
    "Repeat the list twice: red, green, blue, yellow, purple, orange. red, green, blue,",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):",
    "Write one sentence about the sea.",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)


def ngram(k=4):
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


@pytest.fixture(scope="module")
def plain(llm_f32):
    return llm_f32.with_config(kv_cache_memory_gb=CACHE_GB)


@pytest.fixture(scope="module")
def reference(plain):
    return plain.generate(PROMPTS, GREEDY)


def make_random_draft(folder, llm) -> str:
    """A 2-layer Llama with seeded random weights and `llm`'s vocabulary, saved in `folder`."""
    import transformers as tf

    tok = llm.tokenizer.hf
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory, llm_f32) -> str:
    return make_random_draft(tmp_path_factory.mktemp("draft"), llm_f32)


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert g.text == w.text and g.finish_reason == w.finish_reason
        assert [lp.token_id for lp in g.logprobs] == [lp.token_id for lp in w.logprobs]
        # the same bits: a proposal's row computes in the multi-row step as it would alone
        assert [(lp.logprob, lp.top) for lp in g.logprobs] == [(lp.logprob, lp.top) for lp in w.logprobs]


def test_ngram_greedy_output_and_logprobs_are_unchanged(llm_f32, reference):
    spec = llm_f32.with_config(kv_cache_memory_gb=CACHE_GB, speculative_config=ngram())
    assert_same(spec.generate(PROMPTS, GREEDY), reference)
    st = spec.engine.spec.stats
    assert st.num_accepted_tokens >= 10 and st.num_accepted_tokens <= st.num_draft_tokens
    assert sum(st.accepted_per_pos) == st.num_accepted_tokens


@pytest.mark.parametrize("draft", ["self", "random"])
def test_draft_model_greedy_output_is_unchanged(draft, llm_f32, reference, random_draft):
    path = str(llm_f32.engine.model_path) if draft == "self" else random_draft
    spec = llm_f32.with_config(kv_cache_memory_gb=CACHE_GB, speculative_config={
        "method": "draft_model", "model": path, "num_speculative_tokens": 3})
    assert_same(spec.generate(PROMPTS, GREEDY), reference)
    st = spec.engine.spec.stats
    assert st.num_draft_tokens > 0
    if draft == "self":
        assert st.num_accepted_tokens == st.num_draft_tokens  # the same model agrees with itself
    else:
        assert st.num_accepted_tokens < st.num_draft_tokens / 2
    assert spec.engine.spec.draft.block_manager.num_free_blocks == spec.engine.spec.draft.block_manager.num_blocks


def test_stops_inside_an_accepted_run_end_where_they_would_without_speculation(llm_f32, plain):
    """max_tokens, a stop token id (the EOS rule) and a stop string at every position of a
    repetitive output: the same tokens, text and finish reason as without speculation."""
    spec = llm_f32.with_config(kv_cache_memory_gb=CACHE_GB, speculative_config=ngram())
    prompt = PROMPTS[0]
    (full,) = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    params = []
    for n in range(1, 17):
        params.append(SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for tok in dict.fromkeys(full.token_ids[1:]):
        params.append(SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[tok]))
    words = full.text.split()
    for w in dict.fromkeys(words[1:]):
        params.append(SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[w]))
    want = [plain.generate([prompt], p)[0] for p in params]
    got = [spec.generate([prompt], p)[0] for p in params]
    for p, g, w in zip(params, got, want):
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == \
               (w.token_ids, w.text, w.finish_reason, w.stop_reason), p
    assert max(spec.engine.spec.stats.accepted_per_pos[1:]) > 0  # runs of 2+ accepted tokens happened


def test_seeded_sampling_with_speculation_is_reproducible(llm_f32):
    """Twice the same seeded requests, the second time as if each row cost nearly a whole step
    (the measured cost replaced): a seeded request's proposals, and so its draws, do not follow
    measured step times (a loaded CI machine once made two runs differ)."""
    sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=20, seed=11, ignore_eos=True)
    runs = []
    for slow_rows in (False, True):
        spec = llm_f32.with_config(kv_cache_memory_gb=CACHE_GB, speculative_config=ngram())
        if slow_rows:
            spec.engine.spec.cost.row_cost = lambda: 0.999
        runs.append([o.token_ids for o in spec.generate(PROMPTS, sampled)])
    assert runs[0] == runs[1]


def test_rejected_tokens_leave_no_trace_in_the_block_manager(llm_f32):
    """The prefix cache's hashes and the free blocks after a run equal those of the same run without
    speculation (a pool large enough that nothing cached is evicted either way)."""
    states = []
    for spec_config in (None, ngram(), ngram(8)):
        llm = llm_f32.with_config(kv_cache_memory_gb=CACHE_GB, speculative_config=spec_config)
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        bm = llm.engine.block_manager
        states.append((sorted(bm.cached_hashes()), bm.num_free_blocks))
        if spec_config is not None:
            assert llm.engine.spec.stats.num_draft_tokens > llm.engine.spec.stats.num_accepted_tokens  # some rejected
    assert states[0] == states[1] == states[2]


def test_a_bad_draft_model_is_refused_naming_the_key(llm_f32, tmp_path):
    import transformers as tf

    with pytest.raises(ValueError, match="speculative_config.model: .*not found"):
        llm_f32.with_config(kv_cache_memory_gb=CACHE_GB, speculative_config={
            "method": "draft_model", "model": str(tmp_path / "missing.gguf"), "num_speculative_tokens": 2})
    other = tmp_path / "other-vocab"
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    tf.LlamaForCausalLM(cfg).save_pretrained(str(other), safe_serialization=True)
    with pytest.raises(ValueError, match="speculative_config.model: the draft's vocabulary has 128 tokens"):
        llm_f32.with_config(kv_cache_memory_gb=CACHE_GB, speculative_config={
            "method": "draft_model", "model": str(other), "num_speculative_tokens": 2})


def test_speculation_under_preemption_keeps_the_output(llm_f32):
    """A pool so small that sequences are preempted and proposals find no free blocks: the same
    tokens as without speculation in the same pool, and every block free afterwards."""
    prompts = ["a b c a b c a b c a b", "1 2 3 4 1 2 3 4 1 2", "the cat sat on the mat the cat sat on", "x"] * 3
    sp = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    want = llm_f32.with_config(kv_cache_memory_gb=0.004).generate(prompts, sp)
    spec = llm_f32.with_config(kv_cache_memory_gb=0.004, speculative_config={
        "method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 1})
    got = spec.generate(prompts, sp)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert spec.engine.scheduler.num_preemptions > 0 and spec.engine.spec.stats.num_accepted_tokens > 0
    assert spec.engine.block_manager.num_free_blocks == spec.engine.block_manager.num_blocks
