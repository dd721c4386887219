"""The K-quants (Q4_K, Q5_K, Q6_K: super-blocks of 256 weights) in kernels/cpu_quant.c: their
unpacking is the `gguf` package's dequantization bit for bit (random blocks and blocks of the default
model's own weights), `linear` on the exact and the int8 path matches a float64 reference at every
row count the scheduler produces, and a row's int8 output does not depend on the other rows.

`quantize_k` writes such blocks (the model tests make K-quant files with it): a plain range-based
quantizer, not llama.cpp's search; its point is valid blocks of realistic values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.kernels import cpu_quant
from splitserve.kernels.cpu_quant import QuantWeight
from tests.kernels.test_cpu_int8 import quantized_x
from tests.kernels.test_cpu_quant import assert_near_reference, ggufs_values

needs_kernel = pytest.mark.skipif(not cpu_quant.built(), reason="the quantized kernel is not built for this CPU")
K_KINDS = ["Q4_K", "Q5_K", "Q6_K"]
ROWS = [1, 2, 4, 16, 32, 512]


def _f16(a: np.ndarray) -> np.ndarray:
    """float32 values as float16 bytes [..., 2]."""
    return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(*a.shape, 2)


def _codes(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, top: int) -> np.ndarray:
    """round((x + offset) / scale) in [0, top] (0 where the scale is 0), as int32."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale != 0, np.rint((x + offset) / scale), 0)
    return np.clip(q, 0, top).astype(np.int32)


def quantize_k(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 [n, k] (k a multiple of 256) as GGUF K-quant blocks, uint8 [n, k / 256 * bytes].

    Q4_K/Q5_K: per sub-block of 32 a scale (its range / 15 or 31) and a min (-min(x, 0)), both as
    6-bit multiples of the super-block's float16 d and dmin; Q6_K: per 16 weights a signed 8-bit
    multiple of d for max|x| / 31, codes q - 32 in [-32, 31]. Codes are rounded against the scales
    as stored (float16 times the integer), so the blocks decode close to `values`."""
    x = np.asarray(values, np.float32)
    n, k = x.shape
    nb = k // 256
    if kind == "Q6_K":
        g = x.reshape(n, nb, 16, 16)
        amax = np.abs(g).max(axis=-1)  # [n, nb, 16]
        d = (amax.max(axis=-1) / 31 / 127).astype(np.float16).astype(np.float32)  # [n, nb]
        sc = _codes(amax / 31, d[..., None], np.zeros(1, np.float32), 127)
        scale = (d[..., None] * sc)[..., None]
        q = _codes(g, scale, 32 * scale, 63).reshape(n, nb, 2, 4, 32)  # half h, then 4 x 32 weights
        ql = (q[:, :, :, :2] & 0x0F) | ((q[:, :, :, 2:] & 0x0F) << 4)  # [n, nb, 2, 2, 32] -> 64 bytes a half
        qh = sum(((q[:, :, :, i] >> 4) & 3) << (2 * i) for i in range(4))  # [n, nb, 2, 32]
        parts = [ql.reshape(n, nb, 128), qh.reshape(n, nb, 64), sc.astype(np.int8).view(np.uint8), _f16(d)]
    else:
        top = 15 if kind == "Q4_K" else 31
        g = x.reshape(n, nb, 8, 32)
        lo, hi = np.minimum(g.min(axis=-1), 0), np.maximum(g.max(axis=-1), 0)  # [n, nb, 8]
        d = (((hi - lo) / top).max(axis=-1) / 63).astype(np.float16).astype(np.float32)
        dmin = ((-lo).max(axis=-1) / 63).astype(np.float16).astype(np.float32)
        sc = _codes((hi - lo) / top, d[..., None], np.zeros(1, np.float32), 63)
        mn = _codes(-lo, dmin[..., None], np.zeros(1, np.float32), 63)
        q = _codes(g, (d[..., None] * sc)[..., None], (dmin[..., None] * mn)[..., None], top)  # [n, nb, 8, 32]
        scales = np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                                 (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], axis=-1)
        qs = (q[:, :, 0::2] & 0x0F) | ((q[:, :, 1::2] & 0x0F) << 4)  # sub-blocks 2c, 2c + 1: 32 bytes
        parts = [_f16(d), _f16(dmin), scales]
        if kind == "Q5_K":
            parts.append(sum(((q[:, :, s] >> 4) & 1) << s for s in range(8)))
        parts.append(qs.reshape(n, nb, 128))
    blocks = np.concatenate([p.astype(np.uint8).reshape(n, nb, -1) for p in parts], axis=-1)
    assert blocks.shape[-1] == cpu_quant.BLOCK_BYTES[kind]
    return blocks.reshape(n, -1)


def random_k_blocks(kind: str, n: int, k: int, seed: int, signed_scales: bool = False) -> np.ndarray:
    """Raw K-quant blocks [n, k / 256 * bytes]: random codes and packed scales, float16 d (and dmin)
    of realistic size (each of either sign with `signed_scales`: zero codes then give signed zeros)."""
    rng = np.random.default_rng(seed)
    nb = k // 256
    raw = rng.integers(0, 256, (n, nb, cpu_quant.BLOCK_BYTES[kind]), dtype=np.uint8)
    sign = rng.choice([-1, 1], (n, nb)) if signed_scales else 1
    d = _f16(rng.uniform(2e-5, 1e-3, (n, nb)) * sign)
    if kind == "Q6_K":
        raw[:, :, 208:210] = d
    else:
        raw[:, :, 0:2] = d
        raw[:, :, 2:4] = _f16(rng.uniform(2e-5, 1e-3, (n, nb)) * (rng.choice([-1, 1], (n, nb)) if signed_scales else 1))
        raw[::5, :, 4:16] &= 0xC0  # sub-blocks 0-3 of every 5th row: scale and min 0 (zero weights)
    return raw.reshape(n, -1)


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def _assert_unpacks_to(w: QuantWeight, ref: np.ndarray) -> None:
    """Every way the weight is read gives `ref`'s float32 bits: the torch reference, the C unpacking
    (the embedding gather, the tiled GEMM's dequantized rows) and a one-hot x through both kernels."""
    n, k = w.shape
    assert np.array_equal(_bits(w.dequantize()), _bits(ref))
    if not cpu_quant.built():
        return
    assert np.array_equal(_bits(cpu_quant.embedding(torch.arange(n), w)), _bits(ref))
    rows = torch.empty(n - 1, k)
    cpu_quant._ext.dequantize(w.packed.data_ptr(), rows.data_ptr(), cpu_quant.KIND_CODES[w.kind], 1, n, n, k)
    assert np.array_equal(_bits(rows), _bits(ref[1:]))
    for m in (1, 40):  # the few-row kernel, then the L1 tile (one-hot rows: each product is one weight)
        eye = torch.eye(k)[300:300 + m]
        assert torch.equal(cpu_quant.linear(eye, w), torch.from_numpy(ref[:, 300:300 + m]).t().contiguous())


@pytest.mark.parametrize("kind", K_KINDS)
def test_random_blocks_unpack_to_ggufs_bits(kind):
    raw = random_k_blocks(kind, 23, 768, seed=11, signed_scales=True)
    ref = ggufs_values(kind, raw)
    w = QuantWeight.from_gguf(kind, raw)
    assert w.shape == (23, 768) and tuple(w.packed.shape) == (6, 3, 4 * cpu_quant.BLOCK_BYTES[kind])
    assert np.signbit(ref[ref == 0]).any() and not np.signbit(ref[ref == 0]).all()  # both zeros occur
    _assert_unpacks_to(w, ref)


@pytest.fixture(scope="module")
def model_rows() -> np.ndarray:
    """Weights of the default model as float32 [64, 1536]: rows of two layers' down projections."""
    import gguf

    from splitserve.model.gguf_file import GGUFFile
    from splitserve.model.loader import default_model_path

    tensors = {t.name: t for t in GGUFFile(default_model_path()).tensors}
    parts = [np.asarray(gguf.quants.dequantize(np.asarray(tensors[f"blk.{i}.ffn_down.weight"].data)[:32],
                                               tensors[f"blk.{i}.ffn_down.weight"].tensor_type)) for i in (0, 29)]
    return np.concatenate(parts).astype(np.float32)


# worst relative RMS error of a row after the quantizer, on the model's rows (measured: Q4_K 0.035-0.042,
# below Q5_K's 0.053-0.055 because the values are Q4_1's 16 levels a block already; Q6_K 0.026-0.032;
# on Gaussian values 0.08, 0.04, 0.02): a broken packing lands far above
QUANTIZER_RMS = {"Q4_K": 0.06, "Q5_K": 0.07, "Q6_K": 0.04}


@pytest.mark.parametrize("kind", K_KINDS)
def test_the_models_own_weights_quantize_and_unpack_to_ggufs_bits(kind, model_rows):
    raw = quantize_k(model_rows, kind)
    ref = ggufs_values(kind, raw)
    err = np.sqrt(((ref - model_rows) ** 2).mean(axis=1) / (model_rows ** 2).mean(axis=1))
    assert err.max() < QUANTIZER_RMS[kind], f"{kind}: relative RMS error {err.max():.3f}"
    _assert_unpacks_to(QuantWeight.from_gguf(kind, raw), ref)


def _weight(kind: str, n: int, k: int, seed: int) -> QuantWeight:
    return QuantWeight.from_gguf(kind, random_k_blocks(kind, n, k, seed))


@needs_kernel
@pytest.mark.parametrize("kind", K_KINDS)
def test_exact_products_match_a_float64_reference(kind):
    """`linear` (few rows, then the L1 tile) and `linear_tiled` at every row count: float32
    arithmetic on GGUF's values, each output within 1e-5 of the sum of its products' magnitudes."""
    n, k = 37, 512  # a partial tile of weight rows, 2 super-blocks
    w = _weight(kind, n, k, seed=3)
    ref_w = torch.from_numpy(ggufs_values(kind, random_k_blocks(kind, n, k, seed=3)))
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(n, generator=gen)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=gen)
        y = cpu_quant.linear(x, w, bias)
        assert y.shape == (rows, n)
        assert_near_reference(y, x, ref_w, bias)
        if rows > 2:  # the prefill path
            assert_near_reference(cpu_quant.linear_tiled(x, w, bias), x, ref_w, bias)


@needs_kernel
@pytest.mark.parametrize("kind", K_KINDS)
def test_int8_products_match_a_float64_reference_of_the_quantized_activations(kind):
    """The int8 path against x quantized as the kernel does it (per 32, float64 products): integer
    sums exact, float32 scale products and an 8-lane sum, within 2e-6 of the magnitudes summed."""
    n, k = 37, 512
    w = _weight(kind, n, k, seed=4)
    w64 = w.dequantize().double()
    gen = torch.Generator().manual_seed(8)
    bias = torch.randn(n, generator=gen)
    for rows in ROWS:
        x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
        x[0, 32:64] = 0.0  # an all-zero block of x: scale 0
        y = cpu_quant.linear(x, w, bias, int8=True)
        xq = quantized_x(x)
        ref = xq @ w64.T + bias.double()
        bound = xq.abs() @ w64.abs().T + bias.double().abs()
        err = (y.double() - ref).abs()
        assert (err <= 2e-6 * bound).all(), f"{kind} {rows} rows: worst {float((err / bound).max()):.3g}"
        exact = x.double() @ w64.T + bias.double()
        assert float((y.double() - exact).norm() / exact.norm()) < 0.02


@needs_kernel
@pytest.mark.parametrize("kind", K_KINDS)
def test_a_rows_output_does_not_depend_on_the_other_rows(kind):
    w = _weight(kind, 20, 768, seed=5)
    x = torch.randn(48, 768, generator=torch.Generator().manual_seed(2))
    for int8 in (True, False):
        together = cpu_quant.linear(x, w, int8=int8)
        for rows in (slice(0, 1), slice(5, 7), slice(10, 13), slice(13, 17), slice(18, 23), slice(23, 29),
                     slice(29, 36), slice(36, 44), slice(17, 48)):
            assert torch.equal(cpu_quant.linear(x[rows], w, int8=int8), together[rows]), (int8, rows)


@needs_kernel
def test_every_int8_copy_this_cpu_runs_gives_the_same_bits():
    best = cpu_quant._ext.int8_variants()
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(4))
    try:
        for kind in K_KINDS:
            w = _weight(kind, 12, 512, seed=6)
            outputs = []
            for variant in cpu_quant._ext.int8_runnable():
                cpu_quant._ext.set_int8_variant(variant)
                outputs.append(cpu_quant.linear(x, w, int8=True))
            assert all(torch.equal(o, outputs[0]) for o in outputs), kind
    finally:
        cpu_quant._ext.set_int8_variant(best)


@needs_kernel
def test_refusals_name_the_sizes():
    with pytest.raises(ValueError, match=r"Q4_K data must be uint8 \[rows, blocks \* 144\]"):
        QuantWeight.from_gguf("Q4_K", np.zeros((4, 160), np.uint8))
    w = _weight("Q6_K", 8, 256, seed=1)
    with pytest.raises(ValueError, match="x has 288 features; the weight takes 256"):
        cpu_quant.linear(torch.zeros(1, 288), w)
    with pytest.raises(ValueError, match=r"packed must be contiguous uint8 \[2, 1, 576\] for a Q4_K \[8, 256\]"):
        QuantWeight("Q4_K", 8, 256, w.packed)
    with pytest.raises(ValueError, match=r"packed must be contiguous uint8 \[2, 0, 840\] for a Q6_K \[8, 224\]"):
        QuantWeight("Q6_K", 8, 224, w.packed)
    y = torch.empty(1, 8)
    with pytest.raises(ValueError, match=r"k 288 \(a multiple of 256\)"):  # the C entry checks too
        cpu_quant._ext.linear(torch.zeros(1, 288).data_ptr(), w.packed.data_ptr(), 0, y.data_ptr(),
                              cpu_quant.KIND_CODES["Q6_K"], 1, 8, 288)
