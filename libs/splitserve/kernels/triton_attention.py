"""Triton kernels over the paged KV cache: writing new K/V into their slots and decode attention.

Same layout and semantics as the torch references in `splitserve.model.attention`
(`write_kv_torch`, `paged_decode_attention_torch`):
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], contiguous
    slot = block_id * block_size + offset

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tests). Importing this module
needs neither triton nor a GPU: the kernels are handed to `triton.jit` on first use, which is also
when triton reads TRITON_INTERPRET, so setting it any time before the first call is enough.
"""
from __future__ import annotations  # keeps `tl.constexpr` annotations as strings: no triton at import

import functools
from typing import Any, NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the torch path in model/attention.py
    triton = tl = None


def _write_kv_kernel(
    k_ptr, v_ptr,  # [T, kv_heads, head_dim], last dim contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, kv_heads, head_dim] contiguous
    slot_ptr,  # [T] int64, negative = padding token, not written
    stride_kt, stride_kh, stride_vt, stride_vh,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    # grid (T, kv_heads): one program copies one head_dim row of K and of V.
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
    # Cast like `k.to(k_cache.dtype)` in the reference: round to nearest even on GPU (triton
    # 3.9's interpreter truncates fp32 -> bf16 instead; see tests/test_triton_kernels.py).
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _paged_decode_kernel(
    q_ptr,  # [B, heads, head_dim], last dim contiguous
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, kv_heads, head_dim] contiguous
    block_tables_ptr,  # [B, max_blocks] int32/int64
    seq_lens_ptr,  # [B] int32/int64, 1 <= seq_len <= max_blocks * block_size
    out_ptr,  # [B, heads, head_dim] contiguous, q's dtype
    scale,  # float, softmax scale
    stride_qb, stride_qh, stride_bt,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
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
        k = tl.load(k_cache_ptr + kv_off, mask=t_mask[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        # Block 0 always holds >= 1 valid key, so m is finite from the first iteration on.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])  # masked keys give exp2(-inf) = 0
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off, mask=t_mask[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    # seq_len == 0 (outside the contract) gives l == 0: write zeros rather than NaN.
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_off = (seq.to(tl.int64) * (KV_HEADS * GROUP) + heads[:, None]) * HEAD_DIM + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


class _Kernels(NamedTuple):
    write_kv: Any  # triton JITFunction, or InterpretedFunction under TRITON_INTERPRET=1
    paged_decode: Any
    interpret: bool  # True: kernels run in triton's CPU interpreter


@functools.cache
def _kernels() -> _Kernels:
    if triton is None:
        raise RuntimeError("splitserve.kernels.triton_attention needs triton; use the torch path "
                           "(AttentionMetadata.use_triton=False) on this machine")
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


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def write_kv(
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] contiguous, written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, negative = skip (padding)
) -> None:
    """Writes each token's K and V into its slot, casting to the cache dtype; skips negative slots.

    Slots of non-negative entries must be distinct and < num_blocks * block_size (not checked:
    that would need a device sync)."""
    _check_cache(k_cache, v_cache)
    num_tokens, kv_heads, head_dim = k.shape[0], k_cache.shape[2], k_cache.shape[3]
    if k.shape != (num_tokens, kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [T, {kv_heads}, {head_dim}]")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} must be [{num_tokens}]")
    kernels = _kernels()
    _check_launchable(kernels, k, v, k_cache, v_cache, slot_mapping)
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    kernels.write_kv[(num_tokens, kv_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim,
    )


def paged_decode_attention(
    q: torch.Tensor,  # [B, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim] contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new token
    scale: float,
) -> torch.Tensor:  # [B, heads, head_dim] in q's dtype
    """One query token per sequence against its whole paged context; fp32 online softmax.

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
    kernels = _kernels()
    _check_launchable(kernels, q, k_cache, v_cache, block_tables, seq_lens)
    out = torch.empty((batch, heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    q, block_tables = _last_dim_contiguous(q), _last_dim_contiguous(block_tables)
    group = heads // kv_heads
    kernels.paged_decode[(batch, kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, out, float(scale),
        q.stride(0), q.stride(1), block_tables.stride(0),
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
    )
    return out
