"""The CPU projections: oneDNN-packed, MKL-packed and transposed weights compute the same products."""
from __future__ import annotations

import pytest
import torch

from splitserve.model.llama import CPU_GEMM_BACKENDS, CpuLinear, cpu_gemm_backend


@pytest.mark.parametrize("rows", [1, 5, 24, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_every_backend_matches_the_reference(rows, bias, monkeypatch):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(rows, 64, generator=gen)
    ref = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double()).float()
    layers = {}
    for name in CPU_GEMM_BACKENDS:
        monkeypatch.setenv("SPLITSERVE_CPU_GEMM", name)
        layers[name] = CpuLinear(weight, b, torch.float32)
    assert layers["plain"].packed is None and layers["plain"].weight_t.shape == (64, 96)
    # x86 CPU builds of torch have oneDNN and MKL: the packed paths are the ones that run
    assert layers["onednn"].backend == "onednn" and layers["mkl"].backend == "mkl"
    assert layers["onednn"].weight_t is None and layers["mkl"].weight_t is None
    for name, layer in layers.items():
        out = layer(x.view(1, rows, 64))  # leading dims are kept
        assert out.shape == (1, rows, 96)
        assert (out.view(rows, 96) - ref).abs().max().item() < 1e-4, name
        # a strided input (a slice of a wider activation) gives the same product
        wide = torch.zeros(rows, 128)
        wide[:, ::2] = x
        assert (layer(wide[:, ::2]) - ref).abs().max().item() < 1e-4, name


def test_default_backend_and_bad_name(monkeypatch):
    monkeypatch.delenv("SPLITSERVE_CPU_GEMM", raising=False)
    assert cpu_gemm_backend() == "onednn"
    assert CpuLinear(torch.randn(8, 4), None, torch.float32).backend == "onednn"
    assert CpuLinear(torch.randn(8, 4), None, torch.bfloat16).backend == "plain"  # packing is float32 only
    monkeypatch.setenv("SPLITSERVE_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="SPLITSERVE_CPU_GEMM='blas'.*onednn, mkl, plain"):
        cpu_gemm_backend()


@pytest.mark.parametrize("backend", CPU_GEMM_BACKENDS)
def test_empty_batch(backend, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_CPU_GEMM", backend)
    layer = CpuLinear(torch.randn(8, 4), None, torch.float32)
    assert layer(torch.empty(0, 4)).shape == (0, 8)
