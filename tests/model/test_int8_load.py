"""`quantization="int8"` (`--quantization int8`): a float checkpoint's projections quantized at
load time per output channel, held as Q8_0 blocks (one scale a row), computed by the GGUF kernels.
The codes and scales against a float64 reference; the default model's float weights as an HF
folder, loaded int8: every projection kept as blocks (no float copy), greedy answers against the
float model (teacher-forced agreement), and the refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splitserve.kernels import cpu_quant
from splitserve.model.int8_load import int8_blocks
from tests.model.test_hf_quantized import PROMPTS, _agreement, _greedy, float_model  # noqa: F401 (fixture)

needs_kernel = pytest.mark.skipif(not cpu_quant.available(), reason="kernels.cpu_quant is not built here")


def test_codes_and_scales_are_per_channel_round_to_nearest():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 96)).astype(np.float32) * rng.uniform(0.01, 3, (7, 1)).astype(np.float32)
    w[3] = 0.0  # an all-zero row: scale 0, codes 0
    raw = int8_blocks(w).reshape(7, 3, 34)
    d = raw[:, :, :2].copy().view(np.float16).astype(np.float64)[..., 0]  # [rows, blocks]
    q = raw[:, :, 2:].copy().view(np.int8).astype(np.float64).reshape(7, 96)
    assert (d == d[:, :1]).all()  # one scale a row, in every block
    want_d = (np.abs(w.astype(np.float64)).max(axis=1) / 127).astype(np.float16).astype(np.float64)
    assert np.array_equal(d[:, 0], want_d)
    assert np.abs(q).max() <= 127 and not q[3].any()
    deq = d[:, :1] * q
    assert (np.abs(deq - w) <= d[:, :1] / 2 * (1 + 1e-6) + 1e-12).all()  # round to nearest of w / d
    if cpu_quant.available():  # the kernels read exactly these values
        weight = cpu_quant.QuantWeight.from_gguf("Q8_0", int8_blocks(w))
        assert torch.equal(weight.dequantize().double(), torch.from_numpy(deq))


def test_a_matrix_the_blocks_cannot_hold_is_refused():
    with pytest.raises(ValueError, match=r"multiple of 32 columns, got \(4, 40\)"):
        int8_blocks(np.zeros((4, 40), np.float32))


@pytest.fixture(scope="module")
def float_folder(float_model, llm_f32, tmp_path_factory) -> str:
    from safetensors.torch import save_file

    _, config, named = float_model
    folder = tmp_path_factory.mktemp("float")
    save_file({k: v.contiguous() for k, v in named.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    llm_f32.tokenizer.hf.save_pretrained(str(folder))
    return str(folder)


@needs_kernel
def test_a_float_checkpoint_loaded_int8_keeps_only_blocks_and_answers_like_the_float_model(float_folder, llm_f32):
    from splitserve import LLM

    llm = LLM(model=float_folder, dtype="float32", quantization="int8", kv_cache_memory_gb=0.02,
              enable_prefix_caching=False)
    model = llm.engine.model
    layers = model.args.num_layers
    projections = [m for name, m in model.named_modules() if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))]
    assert len(projections) == 4 * layers
    assert all(m.backend == "quant" and m.quant.kind == "Q8_0" for m in projections)
    _assert_no_float_copy(model, {tuple(m.quant.shape) for m in projections})
    assert model.fused_decode is not None  # the one-call decode step takes them like GGUF's blocks
    assert _agreement_with_the_float_model(llm, llm_f32, "int8 per channel") >= 0.9


def _assert_no_float_copy(model, held: set) -> None:
    floats = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
              if t is not None and t.is_floating_point() and tuple(t.shape) in held]
    assert not floats, f"float copies of quantized projections: {floats[:4]}"


def _agreement_with_the_float_model(llm, llm_f32, label: str) -> float:
    """Teacher-forced top-1 agreement with the session's float model on the test prompts."""
    prompts = [llm_f32.tokenizer.encode(p) for p in PROMPTS]
    want, _ = _greedy(llm_f32.with_config(kv_cache_memory_gb=0.02, enable_prefix_caching=False), prompts)
    got, _ = _greedy(llm, prompts)
    rate = _agreement(llm, prompts, want)
    print(f"\n{label}: teacher-forced agreement {rate:.3f}, identical answers "
          f"{sum(g == w for g, w in zip(got, want))}/{len(want)}")
    return rate


def test_int8_is_refused_where_the_kernels_do_not_compute(float_folder):
    from splitserve import LLM

    with pytest.raises(ValueError, match="quantization 'int8' computes with the CPU's quantized kernels in "
                                         "float32: use dtype float32 on the CPU \\(got dtype 'bfloat16'"):
        LLM(model=float_folder, dtype="bfloat16", quantization="int8", kv_cache_memory_gb=0.02)
    with pytest.raises(ValueError, match="quantization must be one of none, int8, fp8, got .int4."):
        LLM(model=float_folder, quantization="int4")


# ----------------------------------------------------------------------------- --quantization fp8
def test_fp8_values_and_scales_are_per_channel_round_to_nearest():
    from splitserve.model.int8_load import fp8_weight

    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 64)).astype(np.float32) * rng.uniform(1e-3, 30, (6, 1)).astype(np.float32)
    w[2] = 0.0
    q = fp8_weight(w)
    assert q.weight.dtype == torch.float8_e4m3fn and q.scale.shape == (6, 1) and q.block is None
    scale = q.scale.double()[:, 0]
    want = torch.from_numpy(np.abs(w.astype(np.float64)).max(axis=1) / 448)
    assert torch.allclose(scale, want, rtol=1e-6) and scale[2] == 0
    values = q.weight.double()
    assert values.abs().max() <= 448 and not values[2].any()
    # each value is the e4m3 neighbour of w / s nearest to it: within half the spacing there
    # (3 mantissa bits: spacing 2**(e - 3) at exponent e, subnormal spacing 2**-9)
    exact = torch.from_numpy(w.astype(np.float64)) / torch.where(scale > 0, scale, 1)[:, None]
    exponent = torch.floor(torch.log2(exact.abs().clamp(min=2.0**-6)))
    assert ((values - exact).abs() <= 2.0 ** (exponent - 4) * (1 + 1e-6)).all()
    assert torch.equal(q.dequantize().double(), (values * scale[:, None]).float().double())


@needs_kernel
def test_a_float_checkpoint_loaded_fp8_keeps_fp8_parts_and_answers_like_the_float_model(float_folder, llm_f32):
    from splitserve import LLM
    from splitserve.kernels.packed_quant import Fp8Weight

    llm = LLM(model=float_folder, dtype="float32", quantization="fp8", kv_cache_memory_gb=0.02,
              enable_prefix_caching=False)
    model = llm.engine.model
    projections = [m for name, m in model.named_modules() if name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))]
    assert len(projections) == 4 * model.args.num_layers
    parts = [p for m in projections for p in m.weight_parts.parts]
    assert len(parts) == 7 * model.args.num_layers and all(isinstance(p, Fp8Weight) for p in parts)
    _assert_no_float_copy(model, {tuple(p.shape) for p in parts} | {(m.out_features, m.in_features) for m in projections})
    assert _agreement_with_the_float_model(llm, llm_f32, "fp8 per channel") >= 0.85
