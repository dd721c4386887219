"""Loading: HF checkpoint folders (Llama, Qwen2, Mistral; tiny seeded random weights) and bad files."""
from __future__ import annotations


import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.model.loader import ModelLoadError


def _tiny_checkpoint(kind: str, folder, tokenizer) -> torch.nn.Module:
    import transformers as tf

    common = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
    )
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=50000.0, tie_word_embeddings=True)
        cls = tf.LlamaForCausalLM
    elif kind == "llama3-scaled":
        cfg = tf.LlamaConfig(
            **common, rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
        cls = tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False)
        cls = tf.Qwen2ForCausalLM
    else:
        cfg = tf.MistralConfig(**common, rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False)
        cls = tf.MistralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so logits are far from ties
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("kind", ["llama", "llama3-scaled", "qwen2", "mistral"])
def test_hf_folder_matches_transformers(kind, tmp_path, llm_f32):
    hf = _tiny_checkpoint(kind, tmp_path, llm_f32.tokenizer.hf)
    llm = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01)
    prompt = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0))
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=12, eos_token_id=[], pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )
    assert out.token_ids == ref.sequences[0, len(prompt):].tolist()
    ref_lp = torch.log_softmax(torch.stack([s[0] for s in ref.logits]).float(), dim=-1)
    for i, lp in enumerate(out.logprobs):
        assert abs(lp.logprob - float(ref_lp[i, lp.token_id])) < 1e-3


def test_bfloat16_runs_close_to_float32(tmp_path, llm_f32):
    """bf16 holds bf16 values (weights rounded to bf16, a bf16 KV cache) and stays near float32."""
    _tiny_checkpoint("llama", tmp_path, llm_f32.tokenizer.hf)
    prompt = llm_f32.tokenizer.encode("Hello there, how are you")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    (f32,) = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01).generate([prompt], params)
    bf16_llm = LLM(model=str(tmp_path), dtype="bfloat16", kv_cache_memory_gb=0.01)
    assert bf16_llm.engine.kv_cache.dtype == torch.bfloat16
    for name, t in bf16_llm.engine.model.state_dict().items():
        if t.is_floating_point() and "rotary" not in name:
            assert torch.equal(t, t.to(torch.bfloat16).to(t.dtype)), f"{name} holds values that are not bf16"
    (bf16,) = bf16_llm.generate([prompt], params)
    assert bf16.token_ids[0] == f32.token_ids[0]
    # Rounding every weight to bf16 (relative error up to 2**-9) moves this model's logprobs a little.
    assert abs(bf16.logprobs[0].logprob - f32.logprobs[0].logprob) < 0.25


def test_missing_model_names_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        LLM(model=str(missing))


def test_corrupt_gguf_names_the_file(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="garbage.gguf"):
        LLM(model=str(bad))


def test_truncated_gguf_names_the_file(tmp_path, llm_f32):
    src = llm_f32.engine.model_path
    cut = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(4 << 20))
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        LLM(model=str(cut))


def test_folder_without_weights_is_reported(tmp_path, llm_f32):
    _tiny_checkpoint("llama", tmp_path, llm_f32.tokenizer.hf)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(model=str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(model=str(tmp_path))


def test_corrupt_safetensors_is_reported(tmp_path, llm_f32):
    _tiny_checkpoint("llama", tmp_path, llm_f32.tokenizer.hf)
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"\x00" * 64)
        name = f.name
    with pytest.raises(ModelLoadError, match=name):
        LLM(model=str(tmp_path))


def test_concurrent_tokenizer_conversions_share_one_cache(tmp_path):
    """A prefill and a decode worker started together both convert the GGUF tokenizer into an empty
    cache: every process must load it, and the cache ends with one complete folder, no leftovers."""
    import json
    import os
    import subprocess
    import sys

    from splitserve.model.loader import default_model_path
    from splitserve.model.tokenizer import load_tokenizer

    t = load_tokenizer(default_model_path())
    # each converts in a child process of its own, then tokenizes and renders a chat: the process
    # itself never imports transformers (issue 19: ~60 MiB a worker)
    code = ("import json, sys; from splitserve.model.tokenizer import load_tokenizer; "
            "from splitserve.model.loader import default_model_path; t = load_tokenizer(default_model_path()); "
            "print(json.dumps([t.encode('Hello world'), t.apply_chat_template([{'role': 'user', 'content': 'Hi'}]), "
            "'transformers' in sys.modules]))")
    env = {**os.environ, "SPLITSERVE_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    assert len({out for out, _ in results}) == 1
    hello, chat, imported = json.loads(results[0][0])
    assert hello == t.encode("Hello world") and chat == t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat[-4:] == t.encode("<|im_start|>assistant\n") and imported is False
    folders = sorted(x.name for x in (tmp_path / "tokenizers").iterdir())
    assert len(folders) == 1 and not folders[0].endswith(".tmp"), folders
    assert (tmp_path / "tokenizers" / folders[0] / "splitserve.json").is_file()
