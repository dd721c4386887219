"""Projections straight from GGUF's quantized blocks on the CPU: the C kernel of `cpu_quant.c`.

A float32 GEMM over a handful of rows (a decode step, a prefix-cache hit) spends its time reading
the weights: the default model's float32 projections are 430 MB, its Q4_1 blocks 80 MB (and its
tied LM head 113 MB against 30 MB as Q8_0). The model keeps both: `CpuLinear` runs this kernel up
to `SPLITSERVE_CPU_QUANT_ROWS` rows and the packed float32 GEMM above, where arithmetic, not
memory, is the limit. The weights the kernel computes with are bit-for-bit the float32 values of
GGUF's dequantization (the model's own float32 copy). SPLITSERVE_CPU_QUANT=off turns it off (to
compare, or to rule it out).
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

QBLOCK = 32  # weights per block, in both formats
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # float16 d (and m for Q4_1), then the codes
DEFAULT_MAX_ROWS = 48  # measured crossover on a 2-core AMD EPYC VM: ~100 rows; 1.2x faster at 48


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
    """Up to how many rows of x the kernel runs (SPLITSERVE_CPU_QUANT_ROWS, default 48); above, the
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
class QuantWeight:
    """A [out_features, in_features] matrix in GGUF's Q4_1 or Q8_0, laid out for the kernel."""

    kind: str  # "Q4_1" or "Q8_0"
    codes: torch.Tensor  # Q4_1: [N, K / 2] uint8 (two codes a byte); Q8_0: [N, K] int8
    scales: torch.Tensor  # [N, K / 32] float32
    mins: torch.Tensor | None  # [N, K / 32] float32 (Q4_1), None (Q8_0)

    @property
    def shape(self) -> tuple[int, int]:
        n, width = self.codes.shape
        return n, width * 2 if self.kind == "Q4_1" else width

    @classmethod
    def from_gguf(cls, kind: str, blocks: np.ndarray) -> "QuantWeight":
        """From GGUF's raw data of a matrix: uint8 [N, K / 32 * block bytes] (numpy's view of the tensor)."""
        if kind not in BLOCK_BYTES:
            raise ValueError(f"unsupported block format {kind!r}: expected one of {', '.join(BLOCK_BYTES)}")
        size = BLOCK_BYTES[kind]
        blocks = np.asarray(blocks)
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] % size:
            raise ValueError(f"{kind} data must be uint8 [rows, blocks * {size}], got {blocks.dtype} {blocks.shape}")
        n = blocks.shape[0]
        b = np.ascontiguousarray(blocks).reshape(n, -1, size)

        def half(col: int) -> torch.Tensor:  # the float16 at byte `col` of every block, as float32
            return torch.from_numpy(np.ascontiguousarray(b[:, :, col:col + 2]).view(np.float16)[:, :, 0]
                                    .astype(np.float32))

        if kind == "Q4_1":
            codes = torch.from_numpy(np.ascontiguousarray(b[:, :, 4:]).reshape(n, -1))
            return cls(kind, codes, half(0), half(2))
        codes = torch.from_numpy(np.ascontiguousarray(b[:, :, 2:]).reshape(n, -1).view(np.int8))
        return cls(kind, codes, half(0), None)

    @classmethod
    def cat(cls, parts: list["QuantWeight"]) -> "QuantWeight":
        """The rows of several matrices of one format and in_features, stacked (a fused projection)."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot stack blocks of different formats: {sorted(kinds)}")
        mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
        return cls(parts[0].kind, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins)

    def select_rows(self, index: np.ndarray) -> "QuantWeight":
        """These rows, in this order (a row permutation of the matrix)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return QuantWeight(self.kind, self.codes[idx].contiguous(), self.scales[idx].contiguous(),
                           None if self.mins is None else self.mins[idx].contiguous())

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32 with torch ops (d * q + m, or d * q): the reference of the kernel's unpacking."""
        n = self.codes.shape[0]
        if self.kind == "Q8_0":
            return (self.codes.view(n, -1, QBLOCK).to(torch.float32) * self.scales[..., None]).reshape(n, -1)
        c = self.codes.view(n, -1, QBLOCK // 2).to(torch.int32)
        q = torch.cat([c & 0x0F, c >> 4], dim=-1).to(torch.float32)  # [N, blocks, 32]
        return (q * self.scales[..., None] + self.mins[..., None]).reshape(n, -1)


def linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in float32: x [..., K] -> [..., N]. ValueError names a mismatched argument."""
    if _ext is None:
        raise RuntimeError("the quantized CPU kernel is not built: reinstall splitserve (pip install -e .)")
    q4 = weight.kind == "Q4_1"
    if weight.kind not in BLOCK_BYTES or (weight.mins is None) == q4:
        raise ValueError(f"{weight.kind} weight {'without' if q4 else 'with'} mins")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features; the weight takes {k}")
    if x.device.type != "cpu":
        raise ValueError(f"x is on {x.device}; the quantized kernel takes CPU tensors")
    for name, t, dtype, shape in (("codes", weight.codes, torch.uint8 if q4 else torch.int8, (n, k // 2 if q4 else k)),
                                  ("scales", weight.scales, torch.float32, (n, k // QBLOCK)),
                                  ("mins", weight.mins, torch.float32, (n, k // QBLOCK)),
                                  ("bias", bias, torch.float32, (n,))):
        if t is not None and (t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous()):
            raise ValueError(f"{name} must be contiguous {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    if x2.shape[0]:
        _ext.linear(x2.data_ptr(), weight.codes.data_ptr(), weight.scales.data_ptr(),
                    0 if weight.mins is None else weight.mins.data_ptr(), 0 if bias is None else bias.data_ptr(),
                    y.data_ptr(), x2.shape[0], n, k)
    return y.view(*x.shape[:-1], n)
