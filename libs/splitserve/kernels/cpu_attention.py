"""Paged decode attention on the CPU: the C kernel of `cpu_attention.c`, built by `pip install`.

It reads each row's K and V straight from the pages up to the row's own length, where the torch path
(`model.attention.paged_decode_attention_torch`, still the reference and the fallback) gathers
padded copies and runs SDPA over them. The model runner uses it for every decode batch on a CPU
when `available()` and `supports(...)` say so; SPLITSERVE_CPU_ATTENTION=torch turns it off (to
compare, or to rule it out). The kernel has an AVX2 copy and, for CPUs with AVX-512, a copy that
scores two keys and sums sixteen value floats per vector, with the same operations on every float
in the same order (the same bits); SPLITSERVE_CPU_ATTENTION_COPY picks one.

An 8-bit cache (int8 or float8_e4m3fn values with float32 scales, kernels/kv_quant.py) is read
dequantized row by row as the kernel gathers it, to the very floats `kv_quant.dequantize` gives;
`write_kv_quantized` stores new rows as `kv_quant.quantize` does, to the bit.
"""
from __future__ import annotations


import torch  # first: the extension then shares torch's OpenMP runtime (libgomp is loaded once)

from splitserve.config import env
from splitserve.kernels import ext_ready, kv_quant, switched_on

try:
    from splitserve.kernels import _cpu_attention as _ext
except ImportError:  # not built (a source tree used without `pip install`): the torch path runs
    _ext = None

# the kernel's cache kinds (kernel_api.h's KV_*): the 8-bit ones come with scales
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.float8_e4m3fn: 3}
SCALED = tuple(kv_quant.SCALED_BY_STORAGE)
CACHE_DTYPES = tuple(KINDS)
MAX_GROUP = 16  # query heads per kv head (the kernel's limit)
MAX_HEAD_DIM = 256


def built() -> bool:
    """The extension is importable and this CPU has what it was compiled for (AVX2 and FMA on x86)."""
    return ext_ready(_ext)


def available() -> bool:
    """`built()`, and SPLITSERVE_CPU_ATTENTION (kernel, the default, or torch) does not turn it off.
    Applies SPLITSERVE_CPU_ATTENTION_COPY (ValueError naming it for a copy this CPU cannot run)."""
    if not (switched_on("SPLITSERVE_CPU_ATTENTION", "kernel", "torch") and built()):
        return False
    select_copy()
    return True


def select_copy() -> str:
    """Makes the kernel run the copy SPLITSERVE_CPU_ATTENTION_COPY names (best: AVX-512 where the CPU
    has it, else AVX2; every copy gives the same bits) and returns it: "avx512" or "avx2"."""
    wanted = env.CPU_ATTENTION_COPY.read()
    target = ("avx512" if _ext.avx512 else "avx2") if wanted == "best" else wanted
    if _ext.copy() != target:  # available() runs per layer on some paths: the kernel is told only changes
        try:
            _ext.set_copy(target == "avx512")
        except ValueError as exc:
            raise ValueError(f"SPLITSERVE_CPU_ATTENTION_COPY={wanted}: {exc}") from None
    return target


def supports(cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """The kernel handles this cache dtype and head shape."""
    return (cache_dtype in CACHE_DTYPES and num_kv_heads > 0 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= MAX_GROUP and head_dim % 8 == 0 and 0 < head_dim <= MAX_HEAD_DIM)


def check_scales(k_cache: torch.Tensor, k_scales, v_scales) -> None:
    """An 8-bit cache comes with float32 contiguous scales [num_blocks, block_size, kv_heads] for K
    and V, a float one with none; else ValueError."""
    if k_cache.dtype not in SCALED:
        if k_scales is not None or v_scales is not None:
            raise ValueError(f"scales given for a {k_cache.dtype} cache, which holds its values as they are")
        return
    expected = tuple(k_cache.shape[:3])
    for name, t in (("k_scales", k_scales), ("v_scales", v_scales)):
        if t is None:
            raise ValueError(f"a {k_cache.dtype} cache needs {name} (float32 {expected})")
        if t.dtype != torch.float32 or tuple(t.shape) != expected or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)} on {t.device}; the {k_cache.dtype} cache needs "
                             f"contiguous float32 {expected} on the CPU")


def paged_decode_attention(
    q: torch.Tensor,  # [B, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] float32, bfloat16, int8 or fp8 e4m3fn
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new token
    scale: float,
    k_scales: torch.Tensor | None = None,  # [num_blocks, block_size, kv_heads] float32: an 8-bit cache's
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, heads, head_dim] in q's dtype
    """One query token per sequence against its paged context; computed in float32.
    ValueError names what is wrong with the arguments (nothing is read out of bounds)."""
    if _ext is None:
        raise RuntimeError("the CPU attention kernel is not built: reinstall splitserve (pip install -e .)")
    batch, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, cache_dim = k_cache.shape
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens)):
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; the CPU kernel takes CPU tensors")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} differs from k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    if cache_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim}, the cache {cache_dim}")
    if not supports(k_cache.dtype, heads, kv_heads, head_dim):
        raise ValueError(f"unsupported by the CPU kernel: cache {k_cache.dtype}, {heads} heads over {kv_heads} "
                         f"kv heads, head_dim {head_dim}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    check_scales(k_cache, k_scales, v_scales)
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"block_tables ({block_tables.dtype}) and seq_lens ({seq_lens.dtype}) must be int32")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} do not "
                         f"match a batch of {batch}")
    qf = q.to(torch.float32).contiguous()
    tables = block_tables.contiguous()
    lens = seq_lens.contiguous()
    out = torch.empty((batch, heads, head_dim), dtype=torch.float32)
    if batch:
        ks, vs = (0, 0) if k_scales is None else (k_scales.data_ptr(), v_scales.data_ptr())
        _ext.decode(qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), ks, vs, tables.data_ptr(), lens.data_ptr(),
                    out.data_ptr(), KINDS[k_cache.dtype], tables.shape[1], num_blocks, batch, heads, kv_heads,
                    head_dim, block_size, float(scale))
    return out.to(q.dtype)


def write_kv_quantized(
    k: torch.Tensor,  # [T, kv_heads, head_dim], any float dtype (quantized from its float32 values)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] int8 or float8_e4m3fn
    v_cache: torch.Tensor,
    k_scales: torch.Tensor,  # [num_blocks, block_size, kv_heads] float32
    v_scales: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Each new token's K and V into its slot of an 8-bit cache, quantized per kv head to the bits
    `kv_quant.quantize` gives (what `model.attention.write_kv_torch` stores). ValueError names a
    wrong argument or a slot outside the cache (checked before anything is written)."""
    if _ext is None:
        raise RuntimeError("the CPU attention kernel is not built: reinstall splitserve (pip install -e .)")
    if k_cache.dtype not in SCALED or v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape:
        raise ValueError(f"write_kv_quantized takes int8 or float8_e4m3fn caches of one shape, not k "
                         f"{k_cache.dtype} {tuple(k_cache.shape)}, v {v_cache.dtype} {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    check_scales(k_cache, k_scales, v_scales)
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    rows = slot_mapping.shape[0] if slot_mapping.dim() == 1 else -1
    if k.shape != (rows, kv_heads, head_dim) or v.shape != k.shape or slot_mapping.dtype != torch.int64:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and slot_mapping {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}: expected [T, {kv_heads}, {head_dim}] rows and [T] int64 slots")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; the CPU kernel takes CPU tensors")
    kf, vf = (t.to(torch.float32).contiguous() for t in (k, v))
    slots = slot_mapping.contiguous()
    _ext.write_kv(kf.data_ptr(), vf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_scales.data_ptr(),
                  v_scales.data_ptr(), slots.data_ptr(), rows, num_blocks * block_size, kv_heads, head_dim,
                  KINDS[k_cache.dtype])
