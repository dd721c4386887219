"""A fused projection whose GGUF parts come in different block formats (issue 19): the default
model with every attn_v re-quantized to Q8_0 beside its Q4_1 attn_q and attn_k (as llama.cpp gives V
more bits in its _M mixes). The q/k/v projection keeps a part a format (`QuantPartsLinear`), no float
copy of it exists, and the model answers as the same file loaded with float32 copies of gguf's
dequantization (SPLITSERVE_CPU_QUANT=off), in the exact path and close in the int8 path."""
from __future__ import annotations

import pytest

from splitserve.kernels import cpu_quant
from splitserve.model.llama import CpuLinear
from splitserve.model.quant_parts import QuantPartsLinear
from tests.model.test_kquant_models import _llm, gate  # noqa: F401 (gate: the quality gate script, a fixture)
from tests.model.test_quantized_memory import _held_tensors, _retyped_gguf

needs_kernel = pytest.mark.skipif(not cpu_quant.available(), reason="the quantized kernel is not built for this CPU")
PROMPT = "The capital of France is"
LOGITS_RTOL = 1e-5  # float32 sums in another order over 30 layers (as tests/model/test_kquant_models.py)


@needs_kernel
def test_mixed_format_qkv_keeps_a_part_a_format_and_answers_as_its_float32_copies(llm_f32, gate, tmp_path):
    import gguf

    from splitserve import SamplingParams
    from splitserve.model.loader import load_model

    layers = llm_f32.engine.model.args.num_layers
    path = tmp_path / "mixed_v.gguf"
    _retyped_gguf(llm_f32.engine.model_path, path,
                  {f"blk.{i}.attn_v.weight": gguf.GGMLQuantizationType.Q8_0 for i in range(layers)})
    blocks, _ = load_model(str(path), "float32", "cpu")
    for i in range(layers):
        qkv = blocks.layers[i].self_attn.qkv_proj
        assert isinstance(qkv, QuantPartsLinear)
        assert [p.quant.kind for p in qkv.parts] == ["Q4_1", "Q4_1", "Q8_0"]
    assert blocks.fused_decode is None  # the one-call step takes one format a projection: layer by layer
    floats = {n for n, t in _held_tensors(blocks).items() if t.is_floating_point()}
    assert floats == ({f"layers.{i}.{norm}.weight" for i in range(layers)
                       for norm in ("input_layernorm", "post_attention_layernorm")}
                      | {"norm.weight", "rotary.cos", "rotary.sin"})  # no float copy

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLITSERVE_CPU_QUANT", "off")
        copies, _ = load_model(str(path), "float32", "cpu")
    assert not any(m.quant for m in copies.modules() if isinstance(m, CpuLinear))
    ids = llm_f32.tokenizer.encode(PROMPT)
    blocks_llm, copies_llm = _llm(llm_f32, blocks), _llm(llm_f32, copies)
    reference = gate.window_logits(copies_llm, ids, len(ids))
    got = gate.window_logits(blocks_llm, ids, len(ids))
    worst = float((got - reference).abs().max() / reference.abs().max())
    assert worst <= LOGITS_RTOL, f"logits differ by {worst:.3g} of the largest"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ours, theirs = (llm.generate([ids], params)[0] for llm in (blocks_llm, copies_llm))
    assert ours.token_ids == theirs.token_ids and len(ours.token_ids) == 6

    blocks.set_quantized_matmul("int8")  # reaches every part
    assert all(p.int8 for i in range(layers) for p in blocks.layers[i].self_attn.qkv_proj.parts)
    int8 = gate.window_logits(blocks_llm, ids, len(ids))
    assert float((int8 - reference).norm() / reference.norm()) < 0.08
    assert int8[-1].argmax() == reference[-1].argmax()
