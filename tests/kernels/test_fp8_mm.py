"""kernels/fp8_mm.py: the W8A8 FP8 GEMM of GPUs with FP8 tensor cores. Its arithmetic runs here on
torch's CPU `_scaled_mm` against a float64 reference of the same quantized operands; which devices
and weights take it (`usable`) is checked against the capability rule. benchmarks/gpu_check.py runs
it on a device."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.kernels import fp8_mm
from splitserve.kernels.packed_quant import Fp8Weight
from splitserve.model.int8_load import fp8_weight


def _weight(n=48, k=64, seed=0, per_tensor=False) -> Fp8Weight:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 2, (n, 1)).astype(np.float32)
    q = fp8_weight(w)
    if per_tensor:
        scale = q.scale.max().reshape(1, 1)
        return Fp8Weight((torch.from_numpy(w) / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale, None)
    return q


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["per-channel", "per-tensor"])
def test_scaled_linear_is_the_product_of_its_quantized_operands(rows, per_tensor):
    weight = _weight(per_tensor=per_tensor)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, :5] = 0.0
    y = fp8_mm.scaled_linear(x, weight)
    assert y.shape == (rows, 48) and y.dtype == torch.float32
    x_q, s_x = fp8_mm.quantize_input(x)
    assert float(s_x) == pytest.approx(float(x.abs().max()) / 448, rel=1e-7)
    ref = (x_q.double() * s_x.double()) @ (weight.weight.double() * weight.scale.double()).t()
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # against the weight-only path (float activations): what quantizing x costs, a few percent at most
    exact = x.double() @ weight.dequantize().double().t()
    assert (y.double() - exact).norm() <= 0.05 * exact.norm()


def test_zero_input_and_block_weights():
    weight = _weight()
    assert not fp8_mm.scaled_linear(torch.zeros(3, 64), weight).any()
    blocked = Fp8Weight(weight.weight, torch.ones(3, 2), (16, 32))
    with pytest.raises(ValueError, match="block-scaled FP8 weights run the tile path"):
        fp8_mm.scaled_linear(torch.ones(2, 64), blocked)


def test_only_fp8_tensor_core_devices_take_it(monkeypatch):
    weight = _weight()
    assert not fp8_mm.usable(torch.device("cpu"), weight)
    capability = {"now": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["now"])
    cuda = torch.device("cuda", 0)
    assert fp8_mm.usable(cuda, weight)  # Hopper
    capability["now"] = (8, 9)
    assert fp8_mm.usable(cuda, weight)  # Ada
    capability["now"] = (8, 0)
    assert not fp8_mm.usable(cuda, weight)  # Ampere: no FP8 tensor cores
    capability["now"] = (9, 0)
    assert not fp8_mm.usable(cuda, Fp8Weight(weight.weight, torch.ones(3, 2), (16, 32)))  # block scales
    assert not fp8_mm.usable(cuda, _weight(n=40))  # not a multiple of 16
    monkeypatch.setenv("SPLITSERVE_FP8_MM", "off")
    assert not fp8_mm.usable(cuda, weight)
