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

from dataclasses import dataclass

import numpy as np
import torch  # first: the extension then shares torch's OpenMP runtime (libgomp is loaded once)

from splitserve.config import env
from splitserve.kernels import ext_ready, switched_on

try:
    from splitserve.kernels import _cpu_quant as _ext
except ImportError:  # not built (a source tree used without `pip install`): float32 GEMMs run
    _ext = None

QBLOCK = 32  # weights per block, in both formats
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # float16 d (and m for Q4_1), then the codes
DEFAULT_MAX_ROWS = 48  # measured crossover on a 2-core AMD EPYC VM: ~100 rows; 1.2x faster at 48


def built() -> bool:
    """The extension is importable and this CPU has what it was compiled for (x86 with AVX2 and FMA)."""
    return ext_ready(_ext)


def available() -> bool:
    """`built()`, and SPLITSERVE_CPU_QUANT (kernel, the default, or off) does not turn it off."""
    return switched_on("SPLITSERVE_CPU_QUANT", "kernel", "off") and built()


def max_rows() -> int:
    """Up to how many rows of x the kernel runs (SPLITSERVE_CPU_QUANT_ROWS, default 48); above, the
    float32 GEMM does."""
    return int(env.CPU_QUANT_ROWS.read())  # default DEFAULT_MAX_ROWS; a bad value names the variable


TILE_N = 4  # weight rows per tile of the packed layout (cpu_quant.c)


def _floats(kind: str) -> int:
    """float32 values a block row carries in a group: d and m (Q4_1), d (Q8_0)."""
    return 2 if kind == "Q4_1" else 1


def _code_bytes(kind: str) -> int:
    """Bytes of one row's codes in a block: two 4-bit codes a byte (Q4_1), one int8 each (Q8_0)."""
    return QBLOCK // 2 if kind == "Q4_1" else QBLOCK


def _group_bytes(kind: str) -> int:
    """Bytes of one group (a tile's block): its rows' floats, then their codes (GROUP_BYTES in C)."""
    return TILE_N * (4 * _floats(kind) + _code_bytes(kind))


@dataclass(frozen=True)
class QuantWeight:
    """A [out_features, in_features] matrix in GGUF's Q4_1 or Q8_0, packed for the kernel: per tile
    of 4 rows and block of 32 weights, one group of their float32 scales (and mins), then their
    codes (see cpu_quant.c)."""

    kind: str  # "Q4_1" or "Q8_0"
    out_features: int
    in_features: int
    packed: torch.Tensor  # [tiles, blocks, group bytes] uint8

    def __post_init__(self) -> None:
        """The packed tensor must match the format and shape: checked once here, not on every call."""
        if self.kind not in BLOCK_BYTES:
            raise ValueError(f"unsupported block format {self.kind!r}")
        n, k, p = self.out_features, self.in_features, self.packed
        expected = (-(-n // TILE_N), k // QBLOCK, _group_bytes(self.kind))
        if k % QBLOCK or p.dtype != torch.uint8 or tuple(p.shape) != expected or not p.is_contiguous():
            raise ValueError(f"packed must be contiguous uint8 {list(expected)} for a {self.kind} [{n}, {k}] weight, "
                             f"got {p.dtype} {list(p.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @classmethod
    def from_gguf(cls, kind: str, blocks: np.ndarray) -> "QuantWeight":
        """From GGUF's raw data of a matrix: uint8 [N, K / 32 * block bytes] (numpy's view of the
        tensor; rows may be permuted or stacked before, as raw rows)."""
        if kind not in BLOCK_BYTES:
            raise ValueError(f"unsupported block format {kind!r}: expected one of {', '.join(BLOCK_BYTES)}")
        size = BLOCK_BYTES[kind]
        blocks = np.asarray(blocks)
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] % size or not blocks.shape[1]:
            raise ValueError(f"{kind} data must be uint8 [rows, blocks * {size}], got {blocks.dtype} {blocks.shape}")
        n, nblocks = blocks.shape[0], blocks.shape[1] // size
        tiles = -(-n // TILE_N)
        raw = np.zeros((tiles * TILE_N, nblocks, size), np.uint8)  # padding rows: all-zero blocks
        raw[:n] = blocks.reshape(n, nblocks, size)

        def by_group(a: np.ndarray) -> np.ndarray:  # [tiles*4, blocks, w] -> [tiles, blocks, 4 * w]
            return a.reshape(tiles, TILE_N, nblocks, -1).transpose(0, 2, 1, 3).reshape(tiles, nblocks, -1)

        def floats(col: int) -> np.ndarray:  # the float16 at byte `col` of every block, as float32 bytes
            f16 = np.ascontiguousarray(raw[:, :, col:col + 2]).view(np.float16)
            return by_group(f16.astype(np.float32).view(np.uint8))

        code_start = 4 if kind == "Q4_1" else 2
        parts = [floats(0)] + ([floats(2)] if kind == "Q4_1" else []) + [by_group(raw[:, :, code_start:])]
        packed = np.ascontiguousarray(np.concatenate(parts, axis=2))
        return cls(kind, n, nblocks * QBLOCK, torch.from_numpy(packed))

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32 with torch ops (d * q + m, or d * q): the reference of the kernel's unpacking."""
        tiles, nblocks, _ = self.packed.shape
        nf = _floats(self.kind)
        g = self.packed
        f = g[:, :, : nf * TILE_N * 4].contiguous().view(torch.float32).view(tiles, nblocks, nf, TILE_N)
        codes = g[:, :, nf * TILE_N * 4:].reshape(tiles, nblocks, TILE_N, _code_bytes(self.kind))
        if self.kind == "Q4_1":
            c = codes.to(torch.int32)
            q = torch.cat([c & 0x0F, c >> 4], dim=-1).to(torch.float32)
            w = q * f[:, :, 0, :, None] + f[:, :, 1, :, None]
        else:
            w = codes.view(torch.int8).to(torch.float32) * f[:, :, 0, :, None]
        # [tiles, blocks, 4, 32] -> [tiles * 4, blocks * 32], padding rows dropped
        return w.permute(0, 2, 1, 3).reshape(tiles * TILE_N, nblocks * QBLOCK)[: self.out_features]


def linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in float32: x [..., K] -> [..., N]. ValueError names a mismatched argument
    (the weight itself was checked when it was made)."""
    if _ext is None:
        raise RuntimeError("the quantized CPU kernel is not built: reinstall splitserve (pip install -e .)")
    n, k = weight.out_features, weight.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features; the weight takes {k}")
    if x.device.type != "cpu":
        raise ValueError(f"x is on {x.device}; the quantized kernel takes CPU tensors")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous float32 [{n}], got {bias.dtype} {list(bias.shape)}")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    if x2.shape[0]:
        _ext.linear(x2.data_ptr(), weight.packed.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                    weight.kind == "Q4_1", x2.shape[0], n, k)
    return y.view(*x.shape[:-1], n)
