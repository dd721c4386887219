"""y = x @ W^T straight from GPTQ and AWQ packed weights (a Triton GEMM): each program unpacks the
int32 words of its W tile on chip, so no float copy of W (not even a tile) goes to the GPU's memory.

The layouts are packed_quant's (its module docstring): GPTQ qweight int32 [K * bits / 32, N] packed
along the input dim, qzeros [G, N * bits / 32] along the output dim, v1's zero offset, an optional
g_idx [K]; AWQ qweight [K, N / 8] and qzeros along the output dim in the interleaved nibble order.
One program computes a BLOCK_M x BLOCK_N tile of y, looping over K in BLOCK_K steps:
  - groups in order (no g_idx) and BLOCK_K dividing group_size: the step lies in one group, so its
    zero and scale are one row [BLOCK_N]; the step's product is dot(x, q - zero) (an integer matrix:
    exact in fp16, bf16 and tf32) scaled per output column afterwards;
  - otherwise (desc_act's g_idx, a partial last group): each input channel's group is gathered, and
    W = (q - zero[g]) * scale[g] in float32 goes into the dot.
The dot accumulates in float32. Its operands: float16/bfloat16 x as they are against the integer
matrix (exact products, the tensor cores' fast path); float32 x in "tf32x3" (three tf32 passes, about
float32's precision on the tensor cores; plain tf32 would keep 11 bits of x). The result is y in
float32, as `PackedLinear`'s tile path gives it, up to the order of the sums.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the tests; the interpreter ignores
the dot's input precision and computes it with numpy). Importing this module imports no triton (0.2 s
that a CPU server never needs): `available()` does, on the first CUDA call.
"""
from __future__ import annotations  # keeps `tl.constexpr` annotations as strings: no triton at import

import contextlib
import functools
from typing import NamedTuple

import torch

from splitserve.kernels import switched_on

triton = tl = None  # set by available(); the kernel's body reads `tl` when triton compiles or interprets it


@functools.cache
def available() -> bool:
    """triton imports (then `triton` and `tl` are set); False on CPU-only installs (the tile path)."""
    global triton, tl
    try:
        import triton as triton_module
        from triton import language
    except ImportError:
        return False
    triton, tl = triton_module, language
    return True


def _packed_matmul_kernel(
    x_ptr,  # [M, K] float32/float16/bfloat16, last dim contiguous
    qw_ptr,  # int32: GPTQ [K * BITS / 32, N], AWQ [K, N / 8], contiguous
    qz_ptr,  # int32: [G, ceil(N * BITS / 32)], contiguous
    s_ptr,  # float32 [G, N] contiguous
    g_ptr,  # int64 [K] (read only when HAS_GIDX)
    y_ptr,  # float32 [M, N], last dim contiguous
    M, N, K, stride_xm, stride_ym, qw_cols, qz_cols, group_size, zero_offset,
    BITS: tl.constexpr, AWQ: tl.constexpr, HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr,
    HALF: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS  # values per int32 word
    MASK: tl.constexpr = (1 << BITS) - 1
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    if AWQ:  # column n is nibble (n % 8 // 2) * 4 + (n % 2) * 16 of word n // 8 (AWQ's order inverted)
        n_word, n_shift = n // 8, (n % 8 // 2) * 4 + (n % 2) * 16
    else:
        n_word, n_shift = n // PER, (n % PER) * BITS
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w_ok = k_ok[:, None] & n_ok[None, :]
        if AWQ:  # [BLOCK_K, BLOCK_N] values of W^T
            words = tl.load(qw_ptr + k.to(tl.int64)[:, None] * qw_cols + n_word[None, :], mask=w_ok, other=0)
            q = (words >> n_shift[None, :]) & MASK
        else:
            words = tl.load(qw_ptr + (k // PER).to(tl.int64)[:, None] * N + n[None, :], mask=w_ok, other=0)
            q = (words >> ((k % PER) * BITS)[:, None]) & MASK
        if ONE_GROUP:  # the whole step in group k0 // group_size: one zero and one scale per column
            g = k0 // group_size
            z = (tl.load(qz_ptr + g * qz_cols + n_word, mask=n_ok, other=0) >> n_shift) & MASK
            scale = tl.load(s_ptr + g * N + n, mask=n_ok, other=0.0)
            centred = q - (z + zero_offset)[None, :]  # integers of at most BITS + 1 bits
            if HALF:
                part = tl.dot(x, centred.to(x_ptr.dtype.element_ty), out_dtype=tl.float32)
            else:
                part = tl.dot(x.to(tl.float32), centred.to(tl.float32), input_precision=PRECISION)
            acc += part * scale[None, :]
        else:  # each input channel's own group
            if HAS_GIDX:
                g = tl.load(g_ptr + k, mask=k_ok, other=0)
            else:
                g = k // group_size
            z = (tl.load(qz_ptr + g[:, None] * qz_cols + n_word[None, :], mask=w_ok, other=0)
                 >> n_shift[None, :]) & MASK
            scale = tl.load(s_ptr + g[:, None] * N + n[None, :], mask=w_ok, other=0.0)
            w = (q - z - zero_offset).to(tl.float32) * scale
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision=PRECISION)
    tl.store(y_ptr + m.to(tl.int64)[:, None] * stride_ym + n[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


class _Kernel(NamedTuple):
    fn: object  # triton JITFunction, or InterpretedFunction under TRITON_INTERPRET=1
    interpret: bool  # True: runs in triton's CPU interpreter


@functools.cache
def _kernel() -> _Kernel:
    if not available():
        raise RuntimeError("splitserve.kernels.triton_quant needs triton; PackedLinear's tile path runs without it")
    fn = triton.jit(_packed_matmul_kernel)
    return _Kernel(fn, interpret=not isinstance(fn, triton.runtime.JITFunction))


def usable(device: torch.device) -> bool:
    """PackedLinear takes this kernel for GPTQ/AWQ parts on this device: CUDA, triton importable, and
    SPLITSERVE_TRITON_QUANT not off."""
    return device.type == "cuda" and switched_on("SPLITSERVE_TRITON_QUANT", "on", "off") and available()


def _blocks(m: int, weight) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): 16 rows at least (the dot's minimum on a GPU); BLOCK_K divides
    the group where it can (one zero and scale row per step). Not tuned on a device yet."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 32 if m <= 16 else 64  # decode: more programs over N (one 4096-wide layer: 128)
    size = weight.group_size
    block_k = 64 if size % 64 == 0 else 32
    return block_m, block_n, block_k


def packed_matmul(x: torch.Tensor, weight) -> torch.Tensor:
    """y = x @ W^T as float32 [M, N] for x [M, K] (float32, float16 or bfloat16) and W a
    packed_quant.GroupQuantWeight on x's device (layouts in packed_quant's docstring)."""
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} must be [M, {k}] for a [{n}, {k}] packed weight")
    if (weight.layout, weight.bits) not in (("gptq", 2), ("gptq", 4), ("gptq", 8), ("awq", 4)):
        raise ValueError(f"packed_matmul runs GPTQ 2/4/8-bit and AWQ 4-bit weights, got {weight.layout} "
                         f"{weight.bits}-bit")
    kernel = _kernel()
    tensors = (x, weight.qweight, weight.qzeros, weight.scales) + (() if weight.g_idx is None else (weight.g_idx,))
    if any(t.device != x.device for t in tensors) or (not kernel.interpret and not x.is_cuda):
        raise RuntimeError("packed_matmul needs x and the weight's tensors on one CUDA device (or TRITON_INTERPRET=1 "
                           f"set before the first call, on the CPU); got {sorted({str(t.device) for t in tensors})}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()
    x = x if x.stride(1) == 1 else x.contiguous()
    m = x.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m == 0:
        return y
    block_m, block_n, block_k = _blocks(m, weight)
    scales = weight.scales if weight.scales.dtype == torch.float32 else weight.scales.float()
    g_idx = weight.g_idx if weight.g_idx is not None else weight.qzeros  # a placeholder pointer, never read
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    # triton launches on the current device: make it x's (a worker on cuda:1) only when it differs
    other_device = x.is_cuda and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if other_device else contextlib.nullcontext():
        kernel.fn[grid](
            x, weight.qweight.contiguous(), weight.qzeros.contiguous(), scales.contiguous(), g_idx, y,
            m, n, k, x.stride(0), y.stride(0), weight.qweight.shape[1], weight.qzeros.shape[1],
            weight.group_size, weight.zero_offset,
            BITS=weight.bits, AWQ=weight.layout == "awq", HAS_GIDX=weight.g_idx is not None,
            ONE_GROUP=weight.g_idx is None and weight.group_size % block_k == 0,
            HALF=x.dtype != torch.float32, PRECISION="tf32x3", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        )
    return y
