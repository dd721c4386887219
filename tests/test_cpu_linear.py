"""The CPU projections: MKL-packed weights and the transposed fallback compute the same products."""
from __future__ import annotations

import pytest
import torch

from splitserve.model.llama import CpuLinear


@pytest.mark.parametrize("rows", [1, 5, 24, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_and_transposed_paths_match_the_reference(rows, bias, monkeypatch):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(rows, 64, generator=gen)
    ref = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double()).float()
    packed = CpuLinear(weight, b, torch.float32)
    monkeypatch.setenv("SPLITSERVE_MKL_PACKED", "0")
    plain = CpuLinear(weight, b, torch.float32)
    assert plain.packed is None and plain.weight_t.shape == (64, 96)
    if torch.backends.mkl.is_available():
        assert packed.packed is not None  # x86 CPU builds of torch have MKL: the packed path runs
    for layer in (packed, plain):
        out = layer(x.view(1, rows, 64))  # leading dims are kept
        assert out.shape == (1, rows, 96)
        assert (out.view(rows, 96) - ref).abs().max().item() < 1e-4


def test_empty_batch():
    layer = CpuLinear(torch.randn(8, 4), None, torch.float32)
    assert layer(torch.empty(0, 4)).shape == (0, 8)
