"""Projections straight from GGUF's Q4_1 blocks on the CPU: the C kernel of `cpu_quant.c`.

A float32 GEMM over a handful of rows (a decode step, a prefix-cache hit) spends its time reading
the weights: the default model's float32 projections are 430 MB, its Q4_1 blocks 80 MB. The model
keeps both: `CpuLinear` runs this kernel up to `SPLITSERVE_CPU_QUANT_ROWS` rows and the packed
float32 GEMM above, where arithmetic, not memory, is the limit. The weights it computes with are
bit-for-bit the float32 values of GGUF's dequantization (the model's own float32 copy).
SPLITSERVE_CPU_QUANT=off turns it off (to compare, or to rule it out).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch  # first: the extension then shares torch's OpenMP runtime (libgomp is loaded once)

try:
    from splitserve.kernels import _cpu_quant as _ext
except ImportError:  # not built (a source tree used without `pip install`): float32 GEMMs run
    _ext = None

QBLOCK = 32  # weights per Q4_1 block
Q4_1_BLOCK_BYTES = 20  # float16 d, float16 m, 16 bytes of 4-bit codes
DEFAULT_MAX_ROWS = 32


def built() -> bool:
    """The extension is importable and this CPU has what it was compiled for (x86 with AVX2 and FMA)."""
    return _ext is not None and bool(_ext.supported)


def available() -> bool:
    """`built()`, and SPLITSERVE_CPU_QUANT (kernel, the default, or off) does not turn it off."""
    choice = os.environ.get("SPLITSERVE_CPU_QUANT", "kernel").strip().lower() or "kernel"
    if choice not in ("kernel", "off"):
        raise ValueError(f"SPLITSERVE_CPU_QUANT={choice!r}: expected kernel or off")
    return choice == "kernel" and built()


def max_rows() -> int:
    """Up to how many rows of x the kernel runs (SPLITSERVE_CPU_QUANT_ROWS, default 32); above, the
    float32 GEMM does."""
    raw = os.environ.get("SPLITSERVE_CPU_QUANT_ROWS", "").strip()
    if not raw:
        return DEFAULT_MAX_ROWS
    try:
        rows = int(raw)
    except ValueError:
        rows = -1
    if rows < 0:
        raise ValueError(f"SPLITSERVE_CPU_QUANT_ROWS={raw!r}: expected a row count >= 0")
    return rows


@dataclass(frozen=True)
class Q4_1Weight:
    """A [out_features, in_features] matrix in Q4_1, laid out for the kernel (see cpu_quant.c)."""

    codes: torch.Tensor  # [N, K / 2] uint8
    scales: torch.Tensor  # [N, K / 32] float32
    mins: torch.Tensor  # [N, K / 32] float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))

    @classmethod
    def from_gguf(cls, blocks: np.ndarray) -> "Q4_1Weight":
        """From GGUF's raw Q4_1 data of a matrix: uint8 [N, K / 32 * 20] (numpy's view of the tensor)."""
        blocks = np.asarray(blocks)
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] % Q4_1_BLOCK_BYTES:
            raise ValueError(f"Q4_1 data must be uint8 [rows, blocks * {Q4_1_BLOCK_BYTES}], got {blocks.dtype} "
                             f"{blocks.shape}")
        n = blocks.shape[0]
        b = np.ascontiguousarray(blocks).reshape(n, -1, Q4_1_BLOCK_BYTES)
        scales = b[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
        mins = b[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
        codes = np.ascontiguousarray(b[:, :, 4:]).reshape(n, -1)
        return cls(torch.from_numpy(codes), torch.from_numpy(np.ascontiguousarray(scales)),
                   torch.from_numpy(np.ascontiguousarray(mins)))

    @classmethod
    def cat(cls, parts: list["Q4_1Weight"]) -> "Q4_1Weight":
        """The rows of several matrices with the same in_features, stacked (a fused projection)."""
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scales", "mins")))

    def select_rows(self, index: np.ndarray) -> "Q4_1Weight":
        """These rows, in this order (a row permutation of the matrix)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return Q4_1Weight(self.codes[idx].contiguous(), self.scales[idx].contiguous(), self.mins[idx].contiguous())

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32 with torch ops: d * q + m per weight (the reference of the kernel's unpacking)."""
        n = self.codes.shape[0]
        c = self.codes.view(n, -1, QBLOCK // 2).to(torch.int32)
        q = torch.cat([c & 0x0F, c >> 4], dim=-1).to(torch.float32)  # [N, blocks, 32]
        return (q * self.scales[..., None] + self.mins[..., None]).reshape(n, -1)


def linear(x: torch.Tensor, weight: Q4_1Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in float32: x [..., K] -> [..., N]."""
    if _ext is None:
        raise RuntimeError("the Q4_1 CPU kernel is not built: reinstall splitserve (pip install -e .)")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features; the weight takes {k}")
    if x.device.type != "cpu":
        raise ValueError(f"x is on {x.device}; the Q4_1 kernel takes CPU tensors")
    for name, t, dtype, shape in (("codes", weight.codes, torch.uint8, (n, k // 2)),
                                  ("scales", weight.scales, torch.float32, (n, k // QBLOCK)),
                                  ("mins", weight.mins, torch.float32, (n, k // QBLOCK)),
                                  ("bias", bias, torch.float32, (n,))):
        if t is not None and (t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    if x2.shape[0]:
        _ext.linear_q4_1(x2.data_ptr(), weight.codes.data_ptr(), weight.scales.data_ptr(), weight.mins.data_ptr(),
                         0 if bias is None else bias.data_ptr(), y.data_ptr(), x2.shape[0], n, k)
    return y.view(*x.shape[:-1], n)
