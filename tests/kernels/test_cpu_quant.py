"""The quantized projections of kernels/cpu_quant.c: the weights they unpack are GGUF's own float32
values, the products match a float64 reference, and the loaded model computes with them."""
from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch

from splitserve.kernels import cpu_quant
from splitserve.kernels.cpu_quant import QuantWeight
from splitserve.model.llama import CpuLinear

needs_kernel = pytest.mark.skipif(not cpu_quant.built(), reason="the quantized kernel is not built for this CPU")


def random_blocks(kind: str, n: int, k: int, seed: int) -> np.ndarray:
    """GGUF-style raw blocks [n, k / 32 * bytes] with random codes and sane float16 scales."""
    rng = np.random.default_rng(seed)
    size = cpu_quant.BLOCK_BYTES[kind]
    raw = rng.integers(0, 256, (n, k // 32, size), dtype=np.uint8)
    raw[:, :, 0:2] = rng.uniform(0.001, 0.05, (n, k // 32)).astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    if kind == "Q4_1":
        raw[:, :, 2:4] = rng.uniform(-0.3, 0.0, (n, k // 32)).astype(np.float16).view(np.uint8).reshape(n, k // 32, 2)
    return raw.reshape(n, -1)


@pytest.fixture(scope="module")
def gguf_tensors():
    import gguf

    from splitserve.model.loader import default_model_path

    reader = gguf.GGUFReader(str(default_model_path()))
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("name,rows", [("blk.0.ffn_gate.weight", None), ("blk.3.attn_k.weight", None),
                                       ("token_embd.weight", 256)])
def test_unpacking_gives_ggufs_own_dequantized_values(gguf_tensors, name, rows):
    import gguf

    t = gguf_tensors[name]
    raw = np.asarray(t.data)[:rows]
    reference = np.asarray(gguf.quants.dequantize(raw, t.tensor_type), dtype=np.float32)
    w = QuantWeight.from_gguf(t.tensor_type.name, raw)
    assert w.shape == reference.shape
    assert torch.equal(w.dequantize(), torch.from_numpy(reference))
    if cpu_quant.built():  # the kernel's own unpacking: a one-hot x reads each weight back exactly
        eye = torch.eye(w.shape[1])[:48]
        assert torch.equal(cpu_quant.linear(eye, w), torch.from_numpy(reference[:, :48]).t().contiguous())


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (2, 5, 64), (3, 4, 96), (7, 13, 576), (16, 9, 1536), (50, 6, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_products_match_a_float64_reference(kind, m, n, k, bias):
    """Every tile shape (rows of x in 3s, weight rows in 4s, with their remainders), both formats."""
    w = QuantWeight.from_gguf(kind, random_blocks(kind, n, k, seed=m * 100 + n))
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    ref = x.double() @ w.dequantize().double().t() + (b.double() if bias else 0)
    out = cpu_quant.linear(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_row_gives_the_same_bits_alone_and_in_any_batch():
    w = QuantWeight.from_gguf("Q4_1", random_blocks("Q4_1", 37, 576, seed=1))
    x = torch.randn(20, 576, generator=torch.Generator().manual_seed(2))
    batch = cpu_quant.linear(x, w)
    for i in (0, 4, 19):
        assert torch.equal(cpu_quant.linear(x[i:i + 1], w), batch[i:i + 1])
    assert torch.equal(cpu_quant.linear(x[5:12], w), batch[5:12])
    assert cpu_quant.linear(x[:0], w).shape == (0, 37)
    assert cpu_quant.linear(x.view(4, 5, 576), w).shape == (4, 5, 37)  # leading dims kept


@needs_kernel
def test_refusals_name_the_argument():
    w = QuantWeight.from_gguf("Q4_1", random_blocks("Q4_1", 8, 64, seed=3))
    with pytest.raises(ValueError, match="x has 32 features; the weight takes 64"):
        cpu_quant.linear(torch.zeros(2, 32), w)
    with pytest.raises(ValueError, match=r"bias must be contiguous float32 \[8\]"):
        cpu_quant.linear(torch.zeros(2, 64), w, torch.zeros(7))
    with pytest.raises(ValueError, match=r"packed must be contiguous uint8 \[2, 2, 144\] for a Q8_0"):
        cpu_quant.linear(torch.zeros(2, 64), dataclasses.replace(w, kind="Q8_0"))
    with pytest.raises(ValueError, match=r"Q4_1 data must be uint8 \[rows, blocks \* 20\]"):
        QuantWeight.from_gguf("Q4_1", np.zeros((4, 30), np.uint8))
    with pytest.raises(ValueError, match="unsupported block format 'Q5_K'"):
        QuantWeight.from_gguf("Q5_K", np.zeros((4, 20), np.uint8))


@needs_kernel
def test_cpu_linear_takes_the_kernel_up_to_its_rows_and_the_gemm_above(monkeypatch):
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_ROWS", "4")
    w = QuantWeight.from_gguf("Q4_1", random_blocks("Q4_1", 24, 96, seed=5))
    lin = CpuLinear(w.dequantize(), None, torch.float32, w)
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(6))
    assert torch.equal(lin(x[:4]), cpu_quant.linear(x[:4], w))  # the kernel
    ref = x.double() @ w.dequantize().double().t()
    torch.testing.assert_close(lin(x).double(), ref, rtol=1e-5, atol=1e-5)  # the float32 GEMM
    with pytest.raises(ValueError, match=r"Q4_1 weight \(24, 96\) does not match the float32 weight \(24, 64\)"):
        CpuLinear(torch.zeros(24, 64), None, torch.float32, w)


@needs_kernel
def test_the_loaded_model_computes_its_float32_weights_from_the_blocks(llm_f32):
    """Every projection and the tied LM head carry blocks, fused and permuted like the float32
    weights: a one-hot x reads the same values back through the kernel and through the GEMM."""
    model = llm_f32.engine.model
    linears = {name: m for name, m in model.named_modules() if isinstance(m, CpuLinear)}
    kinds = {name: (m.quant.kind if m.quant is not None else None) for name, m in linears.items()}
    assert kinds["lm_head"] == "Q8_0"
    assert {kinds[f"layers.{i}.{p}"] for i in range(model.args.num_layers)
            for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} == {"Q4_1"}
    for name in ("layers.0.self_attn.qkv_proj", "layers.29.mlp.gate_up_proj", "layers.7.mlp.down_proj", "lm_head"):
        lin = linears[name]
        eye = torch.eye(lin.in_features)[: lin.quant_rows]
        through_kernel = lin(eye)
        saved, lin.quant_rows = lin.quant_rows, -1
        try:
            through_gemm = lin(eye)
        finally:
            lin.quant_rows = saved
        assert torch.equal(through_kernel, through_gemm), name
