"""The int8 path of kernels/cpu_quant.c: activations quantized per block of 32 to int8, integer dot
products with Q4_0, Q4_1 and Q8_0 blocks. Against a float64 reference of the same quantized
activations, at every row count the scheduler produces, a row's output not depending on the other
rows, and the VNNI copies of the kernel giving the AVX2 copy's bits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.kernels import cpu_quant
from splitserve.kernels.cpu_quant import QuantWeight
from tests.kernels.test_cpu_quant import KINDS, random_blocks

needs_kernel = pytest.mark.skipif(not cpu_quant.built(), reason="the quantized kernel is not built for this CPU")
ROWS = [1, 2, 4, 16, 32, 512]


def quantized_x(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel quantizes it, back in float64: per block of 32, dx = max|x| / 127 (float32)
    and codes round-half-even(x * (1 / dx)) computed in float32."""
    xb = x.numpy().astype(np.float32).reshape(x.shape[0], -1, 32)
    dx = (np.abs(xb).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(dx != 0, np.float32(1) / np.where(dx != 0, dx, 1), 0).astype(np.float32)
    codes = np.rint((xb * inv).astype(np.float32))  # rint: half to even, as the kernel rounds
    assert np.abs(codes).max() <= 127
    return torch.from_numpy((codes.astype(np.float64) * dx.astype(np.float64)).reshape(x.shape))


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [320, 352])  # 10 blocks, and 11: the kernel sums blocks in two chains by parity
def test_int8_matches_a_float64_reference_of_the_quantized_activations(kind, k):
    n = 37  # a partial tile of weight rows
    weight = QuantWeight.from_gguf(kind, random_blocks(kind, n, k, seed=3))
    w64 = weight.dequantize().double()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(7)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
        x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
        y = cpu_quant.linear(x, weight, bias, int8=True)
        ref = quantized_x(x) @ w64.T + bias.double()
        # float32 products of the scales and an 8-lane float32 sum over the blocks: a few ulps of
        # the magnitudes summed
        bound = quantized_x(x).abs() @ w64.abs().T + bias.double().abs()
        err = (y.double() - ref).abs()
        assert (err <= 2e-6 * bound + 1e-30).all(), f"{kind} {rows} rows: worst {float((err / bound).max()):.3g}"
        # and the quantization itself keeps it close to the exact product
        exact = x.double() @ w64.T + bias.double()
        assert float((y.double() - exact).norm() / exact.norm()) < 0.02


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
def test_a_rows_int8_output_does_not_depend_on_the_other_rows(kind):
    n, k = 20, 576
    weight = QuantWeight.from_gguf(kind, random_blocks(kind, n, k, seed=5))
    x = torch.randn(48, k, generator=torch.Generator().manual_seed(2))
    together = cpu_quant.linear(x, weight, int8=True)
    for rows in (slice(0, 1), slice(5, 7), slice(10, 13), slice(17, 48)):
        assert torch.equal(cpu_quant.linear(x[rows], weight, int8=True), together[rows])


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@needs_kernel
def test_the_vnni_copies_give_the_avx2_copys_bits():
    flags = _cpu_flags()
    # Linux spells the AVX-512 one "avx512_vnni" (gcc's __builtin_cpu_supports: "avx512vnni"); it
    # lists amx_tile / amx_int8 only where the kernel hands out AMX state (the module asks for it on
    # its first AMX call)
    avx512 = {"avx512_vnni", "avx512vl", "avx512bw"} <= flags
    expected = (3 if avx512 and {"amx_tile", "amx_int8"} <= flags else 2 if avx512
                else 1 if "avx_vnni" in flags else 0)
    best = cpu_quant._ext.int8_variants()
    assert best == expected, f"the kernel chose copy {best}; /proc/cpuinfo says {expected}"
    runnable = cpu_quant._ext.int8_runnable()
    assert runnable[0] == 0 and runnable[-1] == best and ({1} <= set(runnable)) == ("avx_vnni" in flags)
    for cannot in sorted({-1, 1, 2, 3, 4} - set(runnable)):  # refused with a ValueError, never a SIGILL
        with pytest.raises(ValueError, match="int8 variant"):
            cpu_quant._ext.set_int8_variant(cannot)
    try:
        for k in (576, 544):  # an even and an odd count of blocks (the copies sum blocks by pairs)
            x = torch.randn(29, k, generator=torch.Generator().manual_seed(4))  # past every copy's rows per pass
            for kind in KINDS:
                weight = QuantWeight.from_gguf(kind, random_blocks(kind, 12, k, seed=6))
                outputs = []
                for variant in cpu_quant._ext.int8_runnable():  # on this CPU, every copy it can run
                    cpu_quant._ext.set_int8_variant(variant)
                    outputs.append(cpu_quant.linear(x, weight, int8=True))
                assert all(torch.equal(o, outputs[0]) for o in outputs), (kind, k)
    finally:
        cpu_quant._ext.set_int8_variant(best)


def _assert_copies_agree(weight: QuantWeight, row_counts, gen: torch.Generator, first: int, second: int) -> None:
    """Copy `second` of the int8 kernel gives copy `first`'s bits: x of each row count (row 1 with a
    zero block, the last row's first block 1e6 times larger), with and without a bias."""
    n, k = weight.shape
    bias = torch.randn(n, generator=gen)
    for rows in row_counts:
        x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 8
        x[1, 32:64] = 0.0
        x[-1, :32] *= 1e6
        for b in (None, bias):
            cpu_quant._ext.set_int8_variant(first)
            want = cpu_quant.linear(x, weight, b, int8=True)
            cpu_quant._ext.set_int8_variant(second)
            got = cpu_quant.linear(x, weight, b, int8=True)
            assert torch.equal(got, want), (weight.kind, k, n, rows, b is None, float((got - want).abs().max()))


@needs_kernel
@pytest.mark.skipif(cpu_quant.built() and cpu_quant._ext.int8_variants() < 3,
                    reason="this CPU (or its kernel) has no AMX tiles for the int8 kernel's AMX copy")
@pytest.mark.parametrize("kind", KINDS + ["Q4_K", "Q5_K", "Q6_K"])
def test_the_amx_copy_gives_the_vnni_copys_bits(kind):
    """The AMX copy (13 rows and more) against the AVX-512 VNNI copy: whole and partial 16-row tiles
    of x, a last column tile of 16 weight rows cut short (n = 37 or 20), with and without a bias,
    zero blocks and large magnitudes, an even and an odd count of blocks (both copies sum the
    blocks in two chains by parity)."""
    from tests.kernels.test_cpu_kquant import K_KINDS, random_k_blocks  # (it imports this module)

    gen = torch.Generator().manual_seed(9)
    try:
        for k, n in ([(768, 37), (768, 20)] if kind in K_KINDS else [(576, 37), (576, 20), (544, 37)]):
            weight = QuantWeight.from_gguf(kind, (random_k_blocks if kind in K_KINDS else random_blocks)(kind, n, k, n))
            _assert_copies_agree(weight, (13, 16, 17, 31, 32, 33, 80), gen, 2, 3)
    finally:
        cpu_quant._ext.set_int8_variant(cpu_quant._ext.int8_variants())


@needs_kernel
@pytest.mark.skipif(cpu_quant.built() and 2 not in cpu_quant._ext.int8_runnable(),
                    reason="this CPU has no AVX-512 VNNI for the int8 kernel's wide copy")
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K", "Q5_K"])
def test_the_wide_copy_gives_the_avx2_copys_bits(kind):
    """The AVX-512 VNNI copy runs 3 rows and more of the formats with unsigned codes 16 weight rows
    to a vector (cpu_quant_wide.h): against the AVX2 copy, last wide tiles of 1-4 packed tiles (n =
    37, 20, 12) and whole ones (64), passes of rows split evenly (3-33 rows), with and without a
    bias, zero blocks and large magnitudes, an even and an odd count of sub-blocks."""
    from tests.kernels.test_cpu_kquant import K_KINDS, random_k_blocks  # (it imports this module)

    gen = torch.Generator().manual_seed(11)
    best = cpu_quant._ext.int8_variants()
    try:
        for k in ([512, 768] if kind in K_KINDS else [576, 544]):
            for n in (37, 20, 12, 64):
                blocks = (random_k_blocks if kind in K_KINDS else random_blocks)(kind, n, k, n)
                _assert_copies_agree(QuantWeight.from_gguf(kind, blocks), (3, 5, 8, 9, 16, 17, 33), gen, 0, 2)
    finally:
        cpu_quant._ext.set_int8_variant(best)


@needs_kernel
def test_the_copy_is_chosen_by_splitserve_cpu_int8(monkeypatch):
    best = cpu_quant._ext.int8_variants()
    try:
        monkeypatch.setenv("SPLITSERVE_CPU_INT8", "avx2")
        assert cpu_quant.int8_copy() == "avx2"
        monkeypatch.setenv("SPLITSERVE_CPU_INT8", "best")
        assert cpu_quant.int8_copy() == cpu_quant.INT8_COPIES[best]
        monkeypatch.setenv("SPLITSERVE_CPU_INT8", "sse")
        with pytest.raises(ValueError, match="SPLITSERVE_CPU_INT8"):
            cpu_quant.int8_copy()
        if 1 not in cpu_quant._ext.int8_runnable():  # an AVX-512 VNNI CPU without AVX-VNNI (Zen 4)
            monkeypatch.setenv("SPLITSERVE_CPU_INT8", "avxvnni")
            with pytest.raises(ValueError, match="SPLITSERVE_CPU_INT8=avxvnni: this CPU runs the int8 kernel's copies"):
                cpu_quant.int8_copy()
        if best < 3:
            monkeypatch.setenv("SPLITSERVE_CPU_INT8", "amx")
            with pytest.raises(ValueError, match="SPLITSERVE_CPU_INT8=amx: this CPU runs the int8 kernel's copies"):
                cpu_quant.int8_copy()
    finally:
        cpu_quant._ext.set_int8_variant(best)


@needs_kernel
@pytest.mark.skipif(cpu_quant.built() and cpu_quant._ext.int8_variants() < 3,
                    reason="this CPU (or its kernel) has no AMX tiles for the int8 kernel's AMX copy")
def test_amx_is_asked_for_only_by_the_first_call_that_uses_it():
    """A process that imports the kernel and runs decode rows holds no AMX permission (Linux's
    ARCH_GET_XCOMP_PERM, read in a fresh interpreter); the first call of 13 rows asks for it."""
    import subprocess
    import sys

    script = """
import ctypes, torch
from splitserve.kernels import cpu_quant
from splitserve.kernels.cpu_quant import QuantWeight
from tests.kernels.test_cpu_quant import random_blocks
libc = ctypes.CDLL(None, use_errno=True)
def tiles_permitted():
    mask = ctypes.c_uint64(0)
    assert libc.syscall(158, 0x1022, ctypes.byref(mask)) == 0  # arch_prctl(ARCH_GET_XCOMP_PERM)
    return bool(mask.value >> 18 & 1)
w = QuantWeight.from_gguf("Q4_1", random_blocks("Q4_1", 16, 64, 1))
before = tiles_permitted()
cpu_quant.linear(torch.randn(12, 64), w, int8=True)
few = tiles_permitted()
cpu_quant.linear(torch.randn(13, 64), w, int8=True)
print(before, few, tiles_permitted())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"], out.stdout
