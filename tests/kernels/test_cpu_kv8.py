"""8-bit KV caches (int8, fp8 e4m3fn, per-token scales: kernels/kv_quant.py) in the CPU C kernels:
`cpu_attention.write_kv_quantized` and the fused decode step store the very bits kv_quant.quantize
makes (ties, subnormals, saturation, zeros, every fp8 rounding boundary), and the decode attention
kernel reads them back to the very floats kv_quant.dequantize gives."""
from __future__ import annotations

import pytest
import torch

from splitserve.kernels import kv_quant
from splitserve.kernels import cpu_attention, cpu_layers
from splitserve.model.attention import AttentionMetadata, paged_decode_attention_torch

pytestmark = pytest.mark.skipif(not cpu_attention.built(), reason="the C kernel is not built for this CPU")

NAMES = ["int8", "fp8_e4m3"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _write(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, kv_heads, head_dim] through write_kv_quantized into T shuffled slots of a cache of T + 5
    (as K and as V), read back in x's order; the slots not written keep their sentinel bytes."""
    rows, kv_heads, dim = x.shape
    cache = torch.full((rows + 5, 1, kv_heads, dim), 0x5A, dtype=torch.uint8).view(kv_quant.STORAGE[name])
    k_cache, v_cache = cache, cache.clone()
    k_scales = torch.full((rows + 5, 1, kv_heads), -3.0)
    v_scales = k_scales.clone()
    slots = torch.randperm(rows + 5, generator=torch.Generator().manual_seed(rows))[:rows]
    cpu_attention.write_kv_quantized(x, -x, k_cache, v_cache, k_scales, v_scales, slots)
    untouched = torch.ones(rows + 5, dtype=torch.bool)
    untouched[slots] = False
    assert (_bits(k_cache)[untouched] == 0x5A).all() and (k_scales[untouched] == -3.0).all()
    neg_values, neg_scales = kv_quant.quantize(-x, name)
    assert torch.equal(_bits(v_cache.view(-1, kv_heads, dim)[slots]), _bits(neg_values))
    assert torch.equal(v_scales.view(-1, kv_heads)[slots].view(torch.int32), neg_scales.view(torch.int32))
    return k_cache.view(-1, kv_heads, dim)[slots], k_scales.view(-1, kv_heads)[slots]


def _assert_like_torch(x: torch.Tensor, name: str) -> None:
    values, scales = _write(x, name)
    ref_values, ref_scales = kv_quant.quantize(x, name)
    assert torch.equal(scales.view(torch.int32), ref_scales.view(torch.int32))  # bitwise: NaN scales too
    mismatch = (_bits(values) != _bits(ref_values)).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} values differ, first at {mismatch[0].tolist()}: " \
        f"x {x[tuple(mismatch[0])].item()!r}"


@pytest.mark.parametrize("name", NAMES)
def test_write_matches_kv_quant_on_random_rows_of_every_magnitude(name):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 64, generator=gen)
    x = x * torch.exp2(torch.randint(-140, 120, (64, 3, 1), generator=gen).float())  # 2^-140 .. 2^120
    x[0] = 0.0  # zero rows: scale 0, values 0
    x[1, 0] = -0.0
    x[2, 1, :] = 0.0
    x[2, 1, 5] = 1e-45  # the smallest float32 subnormal alone in its row
    x[3] = torch.randn(3, 64, generator=gen) * 1e-39  # subnormal inputs, subnormal scales
    x[4] = 3e38  # near float32's max: x / scale stays finite
    x[5, :, ::2] *= 1e-6  # mixed magnitudes: fp8 subnormals and int8 zeros beside the large values
    x[6, 0, 3], x[6, 1, 5], x[6, 2, 7] = float("inf"), float("-inf"), float("nan")  # as torch: NaN codes, 0s
    _assert_like_torch(x, name)
    _assert_like_torch(x.to(torch.bfloat16).float(), name)
    _assert_like_torch(x[:, :, :8].contiguous(), name)  # a small head


def test_write_takes_a_bfloat16_rows_float32_values():
    x = torch.randn(9, 2, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    values, scales = _write(x, "int8")
    ref_values, ref_scales = kv_quant.quantize(x, "int8")
    assert torch.equal(values, ref_values) and torch.equal(scales, ref_scales)


def test_int8_ties_round_half_to_even():
    """Rows whose amax makes the scale a power of two: x / scale lands exactly on k + 0.5."""
    halves = torch.arange(-127, 127).float() + 0.5  # -126.5 .. 126.5
    rows = []
    for scale in (1.0, 2.0, 0.25, 2.0**-20):
        body = (halves * scale).view(-1, 127)  # 2 rows of 127 ties
        rows.append(torch.cat([torch.full((2, 1), 127 * scale), body], dim=1))
    x = torch.cat(rows).view(-1, 1, 128)
    _assert_like_torch(x, "int8")
    values, _ = _write(x, "int8")
    expected = torch.cat([torch.full((2, 1), 127.0), torch.round(halves).view(-1, 127)], dim=1)
    assert torch.equal(values[:2, 0].float(), expected)  # half to even: -0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    assert values[0, 0, 1].item() == -126 and values[0, 0, 127].item() == 0  # -126.5 -> -126, -0.5 -> 0


def _fp8_boundaries() -> torch.Tensor:
    """Every finite positive e4m3fn value, every midpoint between neighbours, and the float32 just
    below and above each: where round-to-nearest-even decides."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[:-1] + grid[1:]) / 2  # exact in float32
    points = torch.cat([grid, mids])
    up, down = torch.nextafter(points, torch.tensor(1e9)), torch.nextafter(points, torch.tensor(-1.0))
    both = torch.cat([points, up, down]).clamp(max=448.0).unique()
    return torch.cat([both, -both])


def test_fp8_rounding_at_every_boundary_is_torchs():
    """Rows led by 448 have scale 1 exactly: q is x itself, so every boundary reaches the rounding."""
    vals = _fp8_boundaries()
    pad = (-len(vals)) % 15
    body = torch.cat([vals, torch.zeros(pad)]).view(-1, 15)
    x = torch.cat([torch.full((len(body), 1), 448.0), body], dim=1).view(-1, 1, 16)
    values, scales = _write(x, "fp8_e4m3")
    assert (scales == 1.0).all()
    assert torch.equal(_bits(values[:, 0, 1:]).reshape(-1)[: len(vals)], _bits(vals.to(torch.float8_e4m3fn)))
    _assert_like_torch(x, "fp8_e4m3")


@pytest.mark.parametrize("name", NAMES)
def test_saturation_boundary(name):
    """The amax element's q (amax / (amax / QMAX)) may round above QMAX: clamped to the largest code;
    the others near it too, for thousands of amaxes."""
    gen = torch.Generator().manual_seed(4)
    amax = torch.exp2(torch.rand(4096, generator=gen) * 60 - 30)
    near = amax[:, None] * (1 - torch.rand(4096, 7, generator=gen) * 1e-3)
    x = torch.cat([amax[:, None], near[:, :6], -amax[:, None]], dim=1).view(-1, 1, 8)
    _assert_like_torch(x, name)
    values, _ = _write(x, name)
    top = 127 if name == "int8" else 0x7E  # 448 in e4m3fn
    assert (_bits(values[:, 0, 0]) == top).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_byte_reads_back_as_kv_quant_dequantizes_it(name):
    """A one-token context: the output is that token's V row, so a row of all 256 bytes (head_dim
    256) checks the kernel's int8 / fp8 -> float32 conversion and scaling of each, NaNs included."""
    dtype = kv_quant.STORAGE[name]
    v_cache = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 1, 1, 256).view(dtype)
    k_cache = torch.zeros_like(v_cache)
    scales = torch.tensor([[[0.37]]])
    q = torch.randn(1, 2, 256)
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, torch.zeros(1, 1, dtype=torch.int32),
                                               torch.ones(1, dtype=torch.int32), 0.1, scales, scales)
    expected = kv_quant.dequantize(v_cache, scales).view(1, 256)
    torch.testing.assert_close(out[0], expected.expand(2, 256), rtol=0, atol=0, equal_nan=True)


def _cache(name, heads, kv_heads, head_dim, block_size, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int32)
    max_blocks = int((lens.max() + block_size - 1) // block_size)
    num_blocks = len(lens) * max_blocks + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    spread = torch.exp(torch.randn(*shape[:3], 1, generator=gen) / 2)  # tokens of different magnitudes
    (k, ks), (v, vs) = (kv_quant.quantize(torch.randn(shape, generator=gen) * spread, name) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    q = torch.randn(len(lens), heads, head_dim, generator=gen) * 2
    return q, k, v, ks, vs, tables.to(torch.int32), lens


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16), (8, 8, 128, 16), (12, 2, 32, 8), (4, 2, 256, 4), (6, 3, 48, 16), (4, 2, 40, 8)])
def test_attention_matches_the_torch_path_on_the_dequantized_cache(name, heads, kv_heads, head_dim, block_size):
    lens = [1, 5, block_size, block_size + 1, 33, 100]
    q, k, v, ks, vs, tables, lens = _cache(name, heads, kv_heads, head_dim, block_size, lens)
    assert cpu_attention.supports(k.dtype, heads, kv_heads, head_dim)
    scale = head_dim**-0.5
    out = cpu_attention.paged_decode_attention(q, k, v, tables, lens, scale, ks, vs)
    ref = paged_decode_attention_torch(q, k, v, tables, lens, scale, None, ks, vs)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # float32 rounding
    # the rows gathered are the dequantized floats: the float32 kernel over them gives the same bits
    as_float = cpu_attention.paged_decode_attention(q, kv_quant.dequantize(k, ks), kv_quant.dequantize(v, vs),
                                                    tables, lens, scale)
    assert torch.equal(out, as_float)


def test_bad_scales_are_named():
    q, k, v, ks, vs, tables, lens = _cache("int8", 9, 3, 64, 16, [20, 7])
    run = cpu_attention.paged_decode_attention
    with pytest.raises(ValueError, match="needs k_scales"):
        run(q, k, v, tables, lens, 0.125)
    with pytest.raises(ValueError, match="v_scales is torch.bfloat16"):
        run(q, k, v, tables, lens, 0.125, ks, vs.bfloat16())
    with pytest.raises(ValueError, match="k_scales is torch.float32 \\(3, 16, 3\\)"):
        run(q, k, v, tables, lens, 0.125, ks[:3], vs)
    with pytest.raises(ValueError, match="scales given for a torch.float32 cache"):
        run(q, k.float(), v.float(), tables, lens, 0.125, ks, vs)
    with pytest.raises(ValueError, match="differs from k_cache"):
        run(q, k, v.view(torch.float8_e4m3fn), tables, lens, 0.125, ks, vs)
    x = torch.randn(2, 3, 64)
    before = k.clone()
    with pytest.raises(ValueError, match="row 1: slot 1000 outside the cache's"):
        cpu_attention.write_kv_quantized(x, x, k, v, ks, vs, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn caches"):
        cpu_attention.write_kv_quantized(x, x, k.float(), v.float(), ks, vs, torch.tensor([0, 1]))
    assert torch.equal(k, before)  # nothing written by a refused call


# --- the fused decode step (cpu_layers.c) ---------------------------------------------------------

def _step(model, kv, rows: int, block_size: int, fused: bool) -> torch.Tensor:
    """One decode step of `rows` sequences (contexts of 9, 18, 29 ... tokens, each over its own 4
    pages, in reverse order: row r's pages do not depend on how many rows the step has)."""
    lens = torch.tensor([9 + 8 * r + r * r for r in range(rows)], dtype=torch.int32)
    tables = torch.arange(rows * 4, dtype=torch.int32).view(rows, 4).flip(1).contiguous()
    pos = lens.long() - 1
    slots = tables.long().gather(1, (pos // block_size)[:, None]).squeeze(1) * block_size + pos % block_size
    meta = AttentionMetadata(slots, rows, tables, lens, None, (), (), (), cpu_kernel=True)
    ids = torch.tensor([17, 2048, 305, 9, 77][:rows])
    saved = model.fused_decode
    model.fused_decode = saved if fused else None
    try:
        assert not fused or saved.accepts(rows, kv, meta)
        return model(ids, pos, kv, meta)
    finally:
        model.fused_decode = saved


@pytest.mark.skipif(not cpu_layers.available(), reason="the fused decode kernel is not built for this CPU")
@pytest.mark.parametrize("name", NAMES)
def test_fused_decode_gives_the_layer_by_layer_bits_on_an_8bit_cache(llm_f32, name):
    """The same step fused (rows quantized in C) and layer by layer (quantized by torch, attended
    by the C kernel): the same hidden states and the same cache bits, values and scales."""
    model = llm_f32.engine.model
    args = model.args
    block_size, blocks = 16, 40
    gen = torch.Generator().manual_seed(5)
    caches = []
    for _ in model.layers:
        shape = (blocks, block_size, args.num_kv_heads, args.head_dim)
        (k, ks), (v, vs) = (kv_quant.quantize(torch.randn(shape, generator=gen), name) for _ in range(2))
        caches.append((k, v, ks, vs))
    outs = []
    for fused in (True, False):
        kv = [tuple(t.clone() for t in layer) for layer in caches]
        outs.append((_step(model, kv, 3, block_size, fused), kv))
    (fused_out, fused_kv), (ref_out, ref_kv) = outs
    assert torch.equal(fused_out, ref_out)
    for a, b in zip(fused_kv, ref_kv):
        assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))
    assert not all(torch.equal(_bits(x), _bits(y)) for x, y in zip(fused_kv[0], caches[0]))  # rows were written
    one = _step(model, [tuple(t.clone() for t in layer) for layer in caches], 1, block_size, True)
    assert torch.equal(one[0], fused_out[0])  # a row's bits do not depend on the others in its step


@pytest.mark.skipif(not cpu_layers.available(), reason="the fused decode kernel is not built for this CPU")
def test_fused_decode_refuses_an_8bit_cache_without_its_scales(llm_f32):
    fd = llm_f32.engine.model.fused_decode
    k, v = (torch.zeros(4, 16, 3, 64, dtype=torch.int8) for _ in range(2))
    scales = torch.zeros(4, 16, 3)
    meta = AttentionMetadata(torch.tensor([0]), 1, torch.zeros(1, 1, dtype=torch.int32),
                             torch.ones(1, dtype=torch.int32), None, (), (), (), cpu_kernel=True)
    assert fd.accepts(1, [(k, v, scales, scales)], meta)
    assert not fd.accepts(1, [(k, v)], meta)  # int8 pages without their scales
    assert not fd.accepts(1, [(k.bfloat16(), v.bfloat16())], meta)
    with pytest.raises(ValueError, match="exactly when it is 8-bit; got 2 tensors"):
        fd._cache_fields((k, v))
    with pytest.raises(ValueError, match="k_scales is torch.float32 \\(4, 16\\)"):
        fd._cache_fields((k, v, scales[..., 0], scales))
    with pytest.raises(ValueError, match="not torch.bfloat16"):
        fd._cache_fields((k.bfloat16(), v.bfloat16()))
    assert fd._cache_fields((k, v, scales, scales))[-1] == 2  # the kind, after the pages and scales
    assert fd._cache_fields((k.float(), v.float()))[2:] == [0, 0, 0]  # no scales, float32
