"""Paged decode attention on the CPU: the C kernel of `cpu_attention.c`, built by `pip install`.

It reads each row's K and V straight from the pages up to the row's own length, where the torch path
(`model.attention.paged_decode_attention_torch`, still the reference and the fallback) gathers
padded copies and runs SDPA over them. The model runner uses it for every decode batch on a CPU
when `available()` and `supports(...)` say so; SPLITSERVE_CPU_ATTENTION=torch turns it off (to
compare, or to rule it out).
"""
from __future__ import annotations


import torch  # first: the extension then shares torch's OpenMP runtime (libgomp is loaded once)

from splitserve.kernels import ext_ready, switched_on

try:
    from splitserve.kernels import _cpu_attention as _ext
except ImportError:  # not built (a source tree used without `pip install`): the torch path runs
    _ext = None

CACHE_DTYPES = (torch.float32, torch.bfloat16)
MAX_GROUP = 16  # query heads per kv head (the kernel's limit)
MAX_HEAD_DIM = 256


def built() -> bool:
    """The extension is importable and this CPU has what it was compiled for (AVX2 and FMA on x86)."""
    return ext_ready(_ext)


def available() -> bool:
    """`built()`, and SPLITSERVE_CPU_ATTENTION (kernel, the default, or torch) does not turn it off."""
    return switched_on("SPLITSERVE_CPU_ATTENTION", "kernel", "torch") and built()


def supports(cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """The kernel handles this cache dtype and head shape."""
    return (cache_dtype in CACHE_DTYPES and num_kv_heads > 0 and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= MAX_GROUP and head_dim % 8 == 0 and 0 < head_dim <= MAX_HEAD_DIM)


def paged_decode_attention(
    q: torch.Tensor,  # [B, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] float32 or bfloat16
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new token
    scale: float,
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
        _ext.decode(qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(),
                    out.data_ptr(), k_cache.dtype == torch.bfloat16, tables.shape[1], num_blocks, batch, heads,
                    kv_heads, head_dim, block_size, float(scale))
    return out.to(q.dtype)
