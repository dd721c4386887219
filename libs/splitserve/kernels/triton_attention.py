"""Triton kernels over the paged KV cache: writing new K/V into their slots and decode attention.

Same layout and semantics as the torch references in `splitserve.model.attention`
(`write_kv_torch`, `paged_decode_attention_torch`):
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], contiguous
    slot = block_id * block_size + offset
An int8 or float8_e4m3fn cache comes with k_scales/v_scales [num_blocks, block_size, kv_heads]
float32 (kernels/kv_quant.py, the definition): write_kv quantizes to its bits, decode dequantizes.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests). Importing this module
needs neither triton nor a GPU: the kernels are handed to `triton.jit` on first use, which is also
when triton reads TRITON_INTERPRET, so setting it any time before the first call is enough.
"""
from __future__ import annotations  # keeps `tl.constexpr` annotations as strings: no triton at import

import functools
from typing import Any, NamedTuple

import torch

from splitserve.kernels import kv_quant

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the torch path in model/attention.py
    triton = tl = None


def _write_kv_kernel(
    k_ptr, v_ptr,  # [T, kv_heads, head_dim], last dim contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, kv_heads, head_dim] contiguous
    slot_ptr,  # [T] int64, negative = padding token, not written
    k_scale_ptr, v_scale_ptr,  # [num_blocks, block_size, kv_heads] float32 (QUANT only; else unused)
    stride_kt, stride_kh, stride_vt, stride_vh,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
):
    # grid (T, kv_heads): one program copies (QUANT 0) or quantizes (1 int8, 2 fp8) one head_dim
    # row of K and of V.
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    valid = slot >= 0
    d = tl.arange(0, HEAD_DIM)
    # int64 offsets: num_slots * kv_heads * head_dim can pass 2**31 on a large cache.
    dst = tl.where(valid, slot, 0) * (KV_HEADS * HEAD_DIM) + head * HEAD_DIM + d
    # The whole row, or nothing for a padding token. Not `valid & (d >= 0)`: triton 3.9's
    # interpreter gives scalar-bool & block-bool a non-bool dtype that tl.load rejects.
    mask = d < tl.where(valid, HEAD_DIM, 0)
    k = tl.load(k_ptr + token.to(tl.int64) * stride_kt + head * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + token.to(tl.int64) * stride_vt + head * stride_vh + d, mask=mask)
    if QUANT:
        s_off = tl.where(valid, slot, 0) * KV_HEADS + head  # the row's scale
        k_q, k_s = _quantize_row(k, QUANT, QMAX)
        v_q, v_s = _quantize_row(v, QUANT, QMAX)
        tl.store(k_scale_ptr + s_off, k_s, mask=valid)
        tl.store(v_scale_ptr + s_off, v_s, mask=valid)
        tl.store(k_cache_ptr + dst, k_q, mask=mask)
        tl.store(v_cache_ptr + dst, v_q, mask=mask)
    else:
        # Cast like `k.to(k_cache.dtype)` in the reference: round to nearest even on GPU (triton
        # 3.9's interpreter truncates fp32 -> bf16 instead; see tests/test_triton_kernels.py).
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _quantize_row_impl(x, QUANT: tl.constexpr, QMAX: tl.constexpr):
    # kv_quant.quantize for one [HEAD_DIM] row: (int8 values, or e4m3fn bit patterns as uint8; the
    # float32 scale). Both divisions correctly rounded like torch's: triton's fp32 `/` lowers to
    # the approximate div.full on NVIDIA GPUs, div_rn to div.rn.
    xf = x.to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(xf), axis=0), QMAX)
    q = tl.where(scale > 0, tl.math.div_rn(xf, tl.where(scale > 0, scale, 1.0)), 0.0)
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    if QUANT == 1:
        # Round half to even without libdevice (the interpreter has none): floor, then the
        # fraction q - floor(q) (exact wherever it can be near 0.5) decides; ties go to even.
        r = tl.floor(q)
        frac = q - r
        up = (frac > 0.5) | ((frac == 0.5) & ((r.to(tl.int32) & 1) != 0))
        values = tl.where(up, r + 1.0, r).to(tl.int8)
    else:
        values = _e4m3_bits(q)
    return values, scale


def _e4m3_bits_impl(q):
    # float32 in [-448, 448] -> e4m3fn bits, round to nearest even, in integer ops: exact in the
    # interpreter (whose fp8 cast mis-carries into odd exponents) and on GPUs without fp8 (sm_80).
    bits = q.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    # |q| >= 2**-6 is normal: round the mantissa to 3 bits (a carry moves up the exponent),
    # rebias the exponent from 127 to 7.
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    # Below, subnormal steps of 2**-9: adding 2**23 rounds |q| * 512 (exact) to an integer.
    sub = (tl.abs(q) * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    code = tl.where(mag >= 0x3C800000, normal, sub) | tl.where(bits < 0, 0x80, 0)
    return code.to(tl.uint8)


def _paged_decode_kernel(
    q_ptr,  # [B, heads, head_dim], last dim contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, kv_heads, head_dim] contiguous
    block_tables_ptr,  # [B, max_blocks] int32/int64
    seq_lens_ptr,  # [B] int32/int64, 1 <= seq_len <= max_blocks * block_size
    out_ptr,  # [B, heads, head_dim] contiguous, q's dtype
    k_scale_ptr, v_scale_ptr,  # [num_blocks, block_size, kv_heads] float32 (QUANT only; else unused)
    scale,  # float, softmax scale
    stride_qb, stride_qh, stride_bt,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr,
):
    # grid (B, kv_heads). One program per (sequence, kv head) serves the GROUP query heads that
    # share that kv head: decode is bound by reading K/V, and this way each cache block is read
    # once per group instead of once per query head. Scores are an fp32 broadcast-multiply-sum,
    # not tl.dot: GROUP is usually < 16 (the dot minimum on GPU) and fp32 dots would use TF32.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, GROUP_PAD)  # query heads of the group, padded to a power of two
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK_SIZE)  # offsets inside one cache block
    g_mask = g < GROUP
    heads = kv_head * GROUP + g
    q_off = seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=g_mask[:, None], other=0.0).to(tl.float32)
    # Fold scale and log2(e) into q once so the loop uses exp2 (padded rows stay 0: finite scores).
    q = q * (scale * 1.4426950408889634)  # [GROUP_PAD, HEAD_DIM] fp32
    seq_len = tl.load(seq_lens_ptr + seq)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of scores (log2 units)
    l = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)  # running sum of exp2(score - m) * v
    row = KV_HEADS * HEAD_DIM  # elements between two tokens of a block
    for i in range(0, tl.cdiv(seq_len, BLOCK_SIZE)):
        block_id = tl.load(block_tables_ptr + seq.to(tl.int64) * stride_bt + i).to(tl.int64)
        t_mask = i * BLOCK_SIZE + t < seq_len  # only the last block can be partly filled
        kv_off = (block_id * BLOCK_SIZE + t[:, None]) * row + kv_head * HEAD_DIM + d[None, :]
        s_off = (block_id * BLOCK_SIZE + t) * KV_HEADS + kv_head  # per-token scales (QUANT)
        k = _load_tile(k_cache_ptr, k_scale_ptr, kv_off, s_off, t_mask, QUANT)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        # Block 0 always holds >= 1 valid key, so m is finite from the first iteration on.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])  # masked keys give exp2(-inf) = 0
        l = l * alpha + tl.sum(p, axis=1)
        v = _load_tile(v_cache_ptr, v_scale_ptr, kv_off, s_off, t_mask, QUANT)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    # seq_len == 0 (outside the contract) gives l == 0: write zeros rather than NaN.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_off = (seq.to(tl.int64) * (KV_HEADS * GROUP) + heads[:, None]) * HEAD_DIM + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def _load_tile_impl(cache_ptr, scale_ptr, kv_off, s_off, t_mask, QUANT: tl.constexpr):
    # A [BLOCK_SIZE, HEAD_DIM] K or V tile in float32; an 8-bit one read as kv_quant.dequantize
    # does: float(value) * its token's scale (masked tokens read 0).
    x = tl.load(cache_ptr + kv_off, mask=t_mask[:, None], other=0)
    if QUANT:
        sc = tl.load(scale_ptr + s_off, mask=t_mask, other=0.0)
        if QUANT == 2:
            # e4m3fn bits (uint8) moved into float16's fields give the value / 256 exactly; the
            # 256 goes into the scale, so the product is still float(value) * scale, rounded once.
            b = x.to(tl.int32)
            x = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.uint16).to(tl.float16, bitcast=True)
            sc = sc * 256.0
        x = x.to(tl.float32) * sc[:, None]
    else:
        x = x.to(tl.float32)
    return x


# The kernels call these helpers by these global names; triton needs them as jitted functions,
# made with the kernels on first use (see _kernels).
_quantize_row = _e4m3_bits = _load_tile = None


class _Kernels(NamedTuple):
    write_kv: Any  # triton JITFunction, or InterpretedFunction under TRITON_INTERPRET=1
    paged_decode: Any
    interpret: bool  # True: kernels run in triton's CPU interpreter


@functools.cache
def _kernels() -> _Kernels:
    if triton is None:
        raise RuntimeError("splitserve.kernels.triton_attention needs triton; use the torch path "
                           "(AttentionMetadata.use_triton=False) on this machine")
    global _quantize_row, _e4m3_bits, _load_tile
    _quantize_row, _e4m3_bits = triton.jit(_quantize_row_impl), triton.jit(_e4m3_bits_impl)
    _load_tile = triton.jit(_load_tile_impl)
    write, decode = triton.jit(_write_kv_kernel), triton.jit(_paged_decode_kernel)
    return _Kernels(write, decode, interpret=not isinstance(write, triton.runtime.JITFunction))


def _check_launchable(kernels: _Kernels, *tensors: torch.Tensor) -> None:
    if not kernels.interpret and any(not x.is_cuda for x in tensors):
        raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before the "
                           "first kernel call to run on CPU tensors")


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must "
                         "both be [num_blocks, block_size, kv_heads, head_dim]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    for name, n in (("block_size", k_cache.shape[1]), ("head_dim", k_cache.shape[3])):
        if n & (n - 1):  # tl.arange needs power-of-two extents
            raise ValueError(f"{name} must be a power of two for the Triton kernels, got {n}")


# 8-bit caches (kv_quant's layouts): the kernels' QUANT code and the QMAX the writer divides by
_SCALED = {torch.int8: (1, kv_quant.QMAX["int8"]), torch.float8_e4m3fn: (2, kv_quant.QMAX["fp8_e4m3"])}


def _check_scales(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scales: torch.Tensor | None,
                  v_scales: torch.Tensor | None) -> tuple[int, float]:
    """(QUANT, QMAX) for the kernels: (0, 0.0) for a float cache. Raises before any launch, since
    a kernel reading a missing or mis-shaped scale tensor would fault or read garbage."""
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must share a dtype")
    given = (k_scales is not None, v_scales is not None)
    if k_cache.dtype not in _SCALED:
        if any(given):
            raise ValueError(f"k_scales/v_scales were given for a {k_cache.dtype} cache; only an int8 "
                             "or float8_e4m3fn cache has scales")
        return 0, 0.0
    if not all(given):
        missing = " and ".join(n for n, g in zip(("k_scales", "v_scales"), given) if not g)
        raise ValueError(f"a {k_cache.dtype} KV cache needs its per-token scales: {missing} missing")
    want = tuple(k_cache.shape[:3])
    for name, sc in (("k_scales", k_scales), ("v_scales", v_scales)):
        if sc.dtype != torch.float32 or tuple(sc.shape) != want or not sc.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor [num_blocks, block_size, "
                             f"kv_heads] = {list(want)}, got {sc.dtype} {list(sc.shape)}"
                             f"{'' if sc.is_contiguous() else ' (not contiguous)'}")
        if sc.device != k_cache.device:
            raise ValueError(f"{name} is on {sc.device}, the cache on {k_cache.device}")
    return _SCALED[k_cache.dtype]


def _as_launched(cache: torch.Tensor) -> torch.Tensor:
    """An fp8 cache goes to the kernels as its bytes: they encode and decode e4m3fn themselves."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def write_kv(
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] contiguous, written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, negative = skip (padding)
    k_scales: torch.Tensor | None = None,  # [num_blocks, block_size, kv_heads] float32, 8-bit caches only
    v_scales: torch.Tensor | None = None,
) -> None:
    """Writes each token's K and V into its slot, casting to the cache dtype; skips negative slots.
    An int8 / float8_e4m3fn cache gets kv_quant.quantize's values and per-token scales instead.

    Slots of non-negative entries must be distinct and < num_blocks * block_size (not checked:
    that would need a device sync)."""
    _check_cache(k_cache, v_cache)
    num_tokens, kv_heads, head_dim = k.shape[0], k_cache.shape[2], k_cache.shape[3]
    if k.shape != (num_tokens, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [T, {kv_heads}, {head_dim}]")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")
    quant, qmax = _check_scales(k_cache, v_cache, k_scales, v_scales)
    kernels = _kernels()
    _check_launchable(kernels, k, v, k_cache, v_cache, slot_mapping)
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    kernels.write_kv[(num_tokens, kv_heads)](
        k, v, _as_launched(k_cache), _as_launched(v_cache), slot_mapping,
        k_cache if k_scales is None else k_scales, v_cache if v_scales is None else v_scales,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, QUANT=quant, QMAX=qmax,
    )


def paged_decode_attention(
    q: torch.Tensor,  # [B, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new token
    scale: float,
    k_scales: torch.Tensor | None = None,  # [num_blocks, block_size, kv_heads] float32, 8-bit caches only
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, heads, head_dim] in q's dtype
    """One query token per sequence against its whole paged context; fp32 online softmax.
    An 8-bit cache is read as kv_quant.dequantize does: float(value) * the token's scale.

    Query head h reads kv head h // (heads // kv_heads). Requires 1 <= seq_lens[b] <=
    max_blocks * block_size (not checked: that would need a device sync)."""
    _check_cache(k_cache, v_cache)
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} must be [B, heads, {k_cache.shape[3]}]")
    batch, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} must be [{batch}, max_blocks] "
                         f"and seq_lens {tuple(seq_lens.shape)} [{batch}]")
    quant, _ = _check_scales(k_cache, v_cache, k_scales, v_scales)
    kernels = _kernels()
    _check_launchable(kernels, q, k_cache, v_cache, block_tables, seq_lens)
    out = torch.empty((batch, heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    q, block_tables = _last_dim_contiguous(q), _last_dim_contiguous(block_tables)
    group = heads // kv_heads
    kernels.paged_decode[(batch, kv_heads)](
        q, _as_launched(k_cache), _as_launched(v_cache), block_tables, seq_lens, out,
        k_cache if k_scales is None else k_scales, v_cache if v_scales is None else v_scales, float(scale),
        q.stride(0), q.stride(1), block_tables.stride(0),
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, QUANT=quant,
    )
    return out


def kv8_selfcheck(device: str = "cuda", timings: bool = True, num_blocks: int = 64) -> dict:
    """The 8-bit cache paths on a device, for benchmarks/gpu_check.py: write_kv against
    kv_quant.quantize run on the CPU (every value byte and scale equal), decode attention
    against the torch reference on the dequantized caches (max abs error <= 1e-5 in float32, as in
    tests/kernels/test_triton_kv8.py), and on CUDA the decode time against a bfloat16 cache.
    Returns {name: {...}, "ok": bool}. On a CPU it needs TRITON_INTERPRET=1 and a small num_blocks
    (>= 8; the tests pass 8)."""
    from splitserve.model.attention import paged_decode_attention_torch

    gen = torch.Generator().manual_seed(7)
    nb, bs, kvh, hd, heads, batch = num_blocks, 16, 2, 64, 6, 4
    per = nb // batch  # blocks per sequence
    results: dict = {"ok": True}
    for name in ("int8", "fp8_e4m3"):
        shape = (nb, bs, kvh, hd)
        kc = torch.zeros(shape, dtype=kv_quant.STORAGE[name], device=device)
        vc, ks, vs = kc.clone(), torch.zeros(shape[:3], device=device), torch.zeros(shape[:3], device=device)
        k, v = (torch.randn((nb * bs, kvh, hd), generator=gen).mul_(4).to(torch.bfloat16).to(device) for _ in "kv")
        slots = torch.randperm(nb * bs, generator=gen).to(device)
        write_kv(k, v, kc, vc, slots, ks, vs)
        exact = _written_exactly(name, (k, v), (kc, vc), (ks, vs), slots)
        lens = torch.tensor([1, bs, (per - 1) * bs + 5, per * bs], dtype=torch.int32, device=device)
        tables = torch.randperm(nb, generator=gen)[:batch * per].view(batch, per).to(torch.int32).to(device)
        q = torch.randn((batch, heads, hd), generator=gen).to(device)
        ref = paged_decode_attention_torch(q, kv_quant.dequantize(kc, ks), kv_quant.dequantize(vc, vs), tables,
                                           lens, hd ** -0.5)
        err = (paged_decode_attention(q, kc, vc, tables, lens, hd ** -0.5, ks, vs) - ref).abs().max().item()
        results[name] = {"write_exact": exact, "decode_max_abs_err": err}
        results["ok"] &= exact and err <= 1e-5
    if timings and str(device).startswith("cuda"):
        results["decode_ms_128x2048"] = _kv8_decode_timings(device)
    return results


def _written_exactly(name: str, new: tuple, caches: tuple, scales: tuple, slots: torch.Tensor) -> bool:
    """Whether the slots of caches and scales hold kv_quant.quantize(new) bit for bit, the reference
    run on the CPU: torch's CUDA division by a Python number multiplies by its reciprocal, which is
    not kv_quant's float32 division."""

    slots = slots.cpu()
    for x, cache, sc in zip(new, caches, scales):
        values, ref_scales = kv_quant.quantize(x.cpu(), name)
        got = cache.cpu().view(-1, *cache.shape[2:])[slots]
        if not (torch.equal(got.view(torch.uint8), values.view(torch.uint8))
                and torch.equal(sc.cpu().view(-1, sc.shape[2])[slots], ref_scales)):
            return False
    return True


def _kv8_decode_timings(device: str) -> dict:
    """Decode attention over 128 sequences of 2048 tokens (9/3 heads, head_dim 64, bf16 q): ms per
    call with a bfloat16, an int8 and an fp8 cache (the 8-bit ones read half the bytes)."""
    import triton.testing

    n, bs, kvh, hd = 128, 16, 3, 64
    blocks = n * 2048 // bs
    tables = torch.arange(blocks, dtype=torch.int32, device=device).view(n, -1)
    lens = torch.full((n,), 2048, dtype=torch.int32, device=device)
    q = torch.randn(n, 9, hd, device=device, dtype=torch.bfloat16)
    base = torch.randn(blocks, bs, kvh, hd, device=device, dtype=torch.bfloat16)
    out = {"bfloat16": triton.testing.do_bench(lambda: paged_decode_attention(q, base, base, tables, lens, 0.125))}
    for name, dtype in (("int8", torch.int8), ("fp8_e4m3", torch.float8_e4m3fn)):
        cache = base.float().clamp(-100, 100).to(dtype)
        sc = torch.full(base.shape[:3], 0.01, device=device)
        out[name] = triton.testing.do_bench(
            lambda c=cache, s=sc: paged_decode_attention(q, c, c, tables, lens, 0.125, s, s))
    return out
