"""The model's element-wise parts give HF transformers' Llama bits exactly (not just closely)."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

from splitserve.model.llama import ModelArgs, RMSNorm, RotaryEmbedding, apply_rope, rope_inv_freq


@pytest.mark.parametrize("rows", [1, 3, 32, 512])
@pytest.mark.parametrize("dim", [64, 576, 2048])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_rms_norm_is_hf_bit_for_bit(rows, dim, scale):
    gen = torch.Generator().manual_seed(rows * dim)
    weight = torch.randn(dim, generator=gen)
    ours, hf = RMSNorm(dim, 1e-5), LlamaRMSNorm(dim, eps=1e-5)
    ours.weight.data.copy_(weight)
    hf.weight.data.copy_(weight)
    x = torch.randn(rows, dim, generator=gen) * scale
    with torch.inference_mode():
        assert torch.equal(ours(x), hf(x))  # float32 on the CPU: the fused F.rms_norm path
        xb = x.bfloat16()
        ours_b, hf_b = ours.bfloat16(), hf.bfloat16()
        assert torch.equal(ours_b(xb), hf_b(xb))  # other dtypes: the explicit formula


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_hf_bit_for_bit(dtype):
    args = ModelArgs(architecture="llama", vocab_size=10, hidden_size=576, intermediate_size=8, num_layers=1,
                     num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                     max_position_embeddings=4096, tie_word_embeddings=True)
    rotary = RotaryEmbedding(args, 4096)
    positions = torch.tensor([0, 1, 7, 100, 1000, 4095])
    cos, signed_sin = rotary.lookup(positions, dtype)
    x = torch.randn(len(positions), 12, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    inv_freq, scaling = rope_inv_freq(args)  # HF's sin, computed here: the module keeps only the signed one
    freqs = positions[:, None].float() * inv_freq[None, :]
    sin = (torch.cat((freqs, freqs), dim=-1).sin() * scaling).to(dtype).unsqueeze(1)
    assert torch.equal(cos, (torch.cat((freqs, freqs), dim=-1).cos() * scaling).to(dtype).unsqueeze(1))  # HF's cos
    expected = x * cos + rotate_half(x) * sin  # HF's apply_rotary_pos_emb on one tensor
    assert torch.equal(apply_rope(x, cos, signed_sin), expected)
