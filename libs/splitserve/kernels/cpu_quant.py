"""Projections and embeddings straight from GGUF's quantized blocks on the CPU (`cpu_quant.c`).

A quantized GGUF weight (Q4_0, Q4_1, Q8_0, and the K-quants Q4_K, Q5_K, Q6_K that a Q4_K_M file
mixes) is held only as its blocks, in a `QuantWeight`: the
default model's projections are 66 MB as Q4_1 blocks against 430 MB as float32, its tied embedding
and LM head 30 MB as Q8_0 against 113 MB. Every read of it goes through this module:
- `linear`: up to `max_rows()` rows of x (a decode step, a prefix-cache hit), the C kernel unpacks
  a few weight rows at a time and multiplies: a float32 GEMM over so few rows is bound by reading
  its weights, and the blocks are a fifth of those bytes;
- `linear_tiled`: above (prefill chunks, up to the token budget), a tile of weight rows (a few MB,
  reused by the thread) is dequantized in C and a float32 GEMM (oneDNN where torch has it) runs
  every row of x against it: the GEMM's arithmetic, not the unpacking, sets the time (the default
  model's 30 layers at 512 rows: 1.07x the time on pre-packed float32 copies, 2-core AMD EPYC);
- `embedding`: the rows of the gathered token ids only.
The weights all three compute with are bit-for-bit the float32 values of GGUF's dequantization (and
so of HF transformers). SPLITSERVE_CPU_QUANT=off keeps the float32 copies instead (the loader then
dequantizes every tensor, and the float32 GEMM runs at every row count), to compare or rule it out.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch  # first: the extension then shares torch's OpenMP runtime (libgomp is loaded once)

from splitserve.config import env
from splitserve.kernels import ext_ready, switched_on

try:
    from splitserve.kernels import _cpu_quant as _ext
except ImportError:  # not built (a source tree used without `pip install`): float32 GEMMs run
    _ext = None

QBLOCK = 32  # weights per block of Q4_0, Q4_1, Q8_0, per sub-block of a K-quant (and per int8 scale of x)
SUPER = 256  # weights per K-quant super-block
# bytes of one block: float16 d (and m for Q4_1), then the codes; a K-quant super-block as GGUF
# stores it (d, dmin, packed 6-bit scales and mins, codes; Q6_K: codes, int8 scales, d)
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
KIND_CODES = {"Q8_0": 0, "Q4_1": 1, "Q4_0": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}  # the format numbers of cpu_quant.c
DEFAULT_MAX_ROWS = 48  # measured crossover on a 2-core AMD EPYC VM: ~100 rows; 1.2x faster at 48


def built() -> bool:
    """The extension is importable and this CPU has what it was compiled for (x86 with AVX2 and FMA)."""
    return ext_ready(_ext)


def available() -> bool:
    """`built()`, and SPLITSERVE_CPU_QUANT (kernel, the default, or off) does not turn it off."""
    return switched_on("SPLITSERVE_CPU_QUANT", "kernel", "off") and built()


INT8_COPIES = ("avx2", "avxvnni", "avx512vnni", "amx")  # the int8 kernel's copies, as cpu_quant.c numbers them


def int8_copy() -> str:
    """The copy of the int8 kernel that runs: SPLITSERVE_CPU_INT8 (default best: the best this CPU
    has). ValueError names the variable when it asks for a copy this CPU cannot run."""
    best = _ext.int8_variants()
    wanted = env.CPU_INT8.read()
    index = best if wanted == "best" else INT8_COPIES.index(wanted)
    runnable = _ext.int8_runnable()
    if index not in runnable:
        raise ValueError(f"SPLITSERVE_CPU_INT8={wanted}: this CPU runs the int8 kernel's copies "
                         f"{', '.join(INT8_COPIES[v] for v in runnable)}")
    _ext.set_int8_variant(index)
    return INT8_COPIES[index]


def max_rows() -> int:
    """Up to how many rows of x `linear` runs (SPLITSERVE_CPU_QUANT_ROWS, default 48); above,
    `linear_tiled` does."""
    return int(env.CPU_QUANT_ROWS.read())  # default DEFAULT_MAX_ROWS; a bad value names the variable


TILE_N = 4  # weight rows per tile of the packed layout (cpu_quant.c)
# float32 values in `linear_tiled`'s dequantized tile (8 MB, one per thread that runs it): a whole
# projection of the default model fits (the fused gate/up, 3072 x 576, is the largest), so its GEMM
# writes y at once; larger weights (the LM head) go by tiles of rows
TILE_FLOATS = 2 * 1024 * 1024
_scratch = threading.local()


def _floats(kind: str) -> int:
    """float16 values a block row carries in a group: d and m (Q4_1), d (Q4_0, Q8_0)."""
    return 2 if kind == "Q4_1" else 1


def _code_bytes(kind: str) -> int:
    """Bytes of one row's codes in a block: two 4-bit codes a byte (Q4_0, Q4_1), one int8 each (Q8_0)."""
    return QBLOCK if kind == "Q8_0" else QBLOCK // 2


def _group_bytes(kind: str) -> int:
    """Bytes of one group (a tile's block): its rows' floats, then their codes; a K-quant's the 4
    rows' super-blocks as they are (GROUP_BYTES in C)."""
    if kind in K_QUANTS:
        return TILE_N * BLOCK_BYTES[kind]
    return TILE_N * (2 * _floats(kind) + _code_bytes(kind))


def block_weights(kind: str) -> int:
    """Weights per block of a row: 256 for a K-quant, else 32."""
    return SUPER if kind in K_QUANTS else QBLOCK


@dataclass(frozen=True)
class QuantWeight:
    """A [out_features, in_features] matrix in one of GGUF's block formats (BLOCK_BYTES), packed for
    the kernel: per tile of 4 rows and block of 32 weights, one group of their float16 scales (and
    mins), then their codes; for a K-quant, per tile and super-block of 256, the 4 rows' super-blocks
    in GGUF's bytes (see cpu_quant.c). The model's only copy of that weight."""

    kind: str  # a key of BLOCK_BYTES: "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K" or "Q6_K"
    out_features: int
    in_features: int
    packed: torch.Tensor  # [tiles, blocks, group bytes] uint8

    def __post_init__(self) -> None:
        """The packed tensor must match the format and shape: checked once here, not on every call."""
        if self.kind not in BLOCK_BYTES:
            raise ValueError(f"unsupported block format {self.kind!r}")
        n, k, p = self.out_features, self.in_features, self.packed
        expected = (-(-n // TILE_N), k // block_weights(self.kind), _group_bytes(self.kind))
        if k % block_weights(self.kind) or p.dtype != torch.uint8 or tuple(p.shape) != expected or not p.is_contiguous():
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
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] % size or not blocks.shape[1] \
                or not blocks.shape[0]:
            raise ValueError(f"{kind} data must be uint8 [rows, blocks * {size}], got {blocks.dtype} {blocks.shape}")
        n, nblocks = blocks.shape[0], blocks.shape[1] // size
        tiles = -(-n // TILE_N)
        raw = blocks.reshape(n, nblocks, size)
        if n % TILE_N:  # padding rows: all-zero blocks (d = 0, and dmin = 0: zero weights)
            raw = np.concatenate([raw, np.zeros((tiles * TILE_N - n, nblocks, size), np.uint8)])
        # each part written in place into the packed array (a model's load holds no other copy of it):
        # [tiles * 4, blocks, w] rows -> [tiles, blocks, 4, w] of the group
        packed = np.empty((tiles, nblocks, _group_bytes(kind)), np.uint8)
        if kind in K_QUANTS:  # the 4 rows' super-blocks whole, one after the other
            packed.reshape(tiles, nblocks, TILE_N, size)[...] = raw.reshape(tiles, TILE_N, nblocks, size).transpose(0, 2, 1, 3)
            return cls(kind, n, nblocks * SUPER, torch.from_numpy(packed))
        nf, code_start = _floats(kind), 4 if kind == "Q4_1" else 2  # the codes follow d (and m)

        def group_view(start: int, width: int) -> np.ndarray:  # packed bytes [start, +4 * width) of each group
            return packed[:, :, start:start + TILE_N * width].reshape(tiles, nblocks, TILE_N, width)

        def by_group(a: np.ndarray) -> np.ndarray:  # [tiles * 4, blocks, w] -> [tiles, blocks, 4, w], a view
            return a.reshape(tiles, TILE_N, nblocks, -1).transpose(0, 2, 1, 3)

        for i in range(nf):  # d (and m): the float16 at byte 2 * i of every block, as it is
            group_view(8 * i, 2)[...] = by_group(raw[:, :, 2 * i:2 * i + 2])
        group_view(8 * nf, size - code_start)[...] = by_group(raw[:, :, code_start:])
        return cls(kind, n, nblocks * QBLOCK, torch.from_numpy(packed))

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32 with torch ops (d * q + m, or d * q): the reference of the kernel's unpacking."""
        if self.kind in K_QUANTS:
            return _dequantize_k(self)
        tiles, nblocks, _ = self.packed.shape
        nf = _floats(self.kind)
        g = self.packed
        f = g[:, :, : nf * TILE_N * 2].contiguous().view(torch.float16).to(torch.float32).view(tiles, nblocks, nf, TILE_N)
        codes = g[:, :, nf * TILE_N * 2:].reshape(tiles, nblocks, TILE_N, _code_bytes(self.kind))
        if self.kind != "Q8_0":
            c = codes.to(torch.int32)
            q = torch.cat([c & 0x0F, c >> 4], dim=-1)
            if self.kind == "Q4_1":
                w = q.to(torch.float32) * f[:, :, 0, :, None] + f[:, :, 1, :, None]
            else:
                w = (q - 8).to(torch.float32) * f[:, :, 0, :, None]
        else:
            w = codes.view(torch.int8).to(torch.float32) * f[:, :, 0, :, None]
        # [tiles, blocks, 4, 32] -> [tiles * 4, blocks * 32], padding rows dropped
        return w.permute(0, 2, 1, 3).reshape(tiles * TILE_N, nblocks * QBLOCK)[: self.out_features]


def _dequantize_k(weight: QuantWeight) -> torch.Tensor:
    """A K-quant `QuantWeight` as [N, K] float32 with torch ops, from the layouts in cpu_quant_k.h:
    D * q - M (Q4_K, Q5_K; D * q exact, one rounding) or (d * sc) * (q - 32) (Q6_K, exact)."""
    tiles, nblocks, _ = weight.packed.shape
    size = BLOCK_BYTES[weight.kind]
    # [tiles, blocks, 4, bytes] -> [rows, blocks, bytes]: each row's super-blocks in GGUF's bytes
    raw = weight.packed.view(tiles, nblocks, TILE_N, size).permute(0, 2, 1, 3).reshape(-1, nblocks, size)
    rows = raw.shape[0]

    def half(at: int) -> torch.Tensor:  # the float16 at byte `at` of each super-block, [rows, blocks, 1]
        return raw[:, :, at:at + 2].contiguous().view(torch.float16).to(torch.float32)

    def nibbles(b: torch.Tensor) -> torch.Tensor:  # [..., 32c + l] -> [..., c, 2, 32]: low, then high
        b = b.to(torch.int32).unflatten(-1, (-1, 32))
        return torch.stack([b & 0x0F, b >> 4], dim=-2)

    if weight.kind == "Q6_K":
        ql = raw[:, :, :128].to(torch.int32).view(rows, nblocks, 2, 64)  # half h: weights 128h + l, + 64
        low = torch.stack([ql & 0x0F, ql >> 4], dim=3).view(rows, nblocks, 2, 4, 32)
        qh = raw[:, :, 128:192].to(torch.int32).view(rows, nblocks, 2, 1, 32)
        high = (qh >> torch.tensor([0, 2, 4, 6]).view(4, 1)) & 3
        q = ((low | (high << 4)) - 32).to(torch.float32).view(rows, nblocks, 16, 16)
        sc = raw[:, :, 192:208].contiguous().view(torch.int8).to(torch.float32)
        w = (half(208) * sc)[..., None] * q
    else:
        s = raw[:, :, 4:16].to(torch.int32)
        a, b, c = s[:, :, 0:4], s[:, :, 4:8], s[:, :, 8:12]
        sc = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=-1).to(torch.float32)
        mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1).to(torch.float32)
        start = 48 if weight.kind == "Q5_K" else 16
        q = nibbles(raw[:, :, start:start + 128]).view(rows, nblocks, 8, 32)  # sub-block 2c + nibble
        if weight.kind == "Q5_K":
            qh = raw[:, :, 16:48].to(torch.int32).view(rows, nblocks, 1, 32)
            q = q | (((qh >> torch.arange(8).view(8, 1)) & 1) << 4)
        w = (half(0) * sc)[..., None] * q.to(torch.float32) - (half(2) * mn)[..., None]
    return w.reshape(rows, nblocks * SUPER)[: weight.out_features]


def _checked(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x as contiguous float32 [M, K]; ValueError names a mismatched argument (the weight itself was
    checked when it was made)."""
    if _ext is None:
        raise RuntimeError("the quantized CPU kernel is not built: reinstall splitserve (pip install -e .)")
    n, k = weight.out_features, weight.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features; the weight takes {k}")
    if x.device.type != "cpu":
        raise ValueError(f"x is on {x.device}; the quantized kernel takes CPU tensors")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous float32 [{n}], got {bias.dtype} {list(bias.shape)}")
    return x.reshape(-1, k).to(torch.float32).contiguous()


def linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None, int8: bool = False) -> torch.Tensor:
    """x @ W^T (+ bias) in float32 by the few-row kernel: x [..., K] -> [..., N]. Any row count
    works; above `max_rows()` `linear_tiled` is faster. `int8`: x quantized per block of 32 to int8
    and integer dot products (approximate; see cpu_quant.c), else float arithmetic on the exact
    dequantized weights."""
    x2 = _checked(x, weight, bias)
    n, k = weight.shape
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    if x2.shape[0]:
        _ext.linear(x2.data_ptr(), weight.packed.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
                    KIND_CODES[weight.kind], x2.shape[0], n, k, int8)
    return y.view(*x.shape[:-1], n)


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ w[N', K]^T (+ bias) for a dequantized tile: oneDNN's inner product on the plain
    weight (as fast as on a pre-packed one at 512 rows, measured), else the BLAS."""
    if _ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return torch.nn.functional.linear(x, w, bias)


_ONEDNN = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _tile_buffer() -> torch.Tensor:
    """This thread's dequantized tile: float32 [TILE_FLOATS], made on its first use. Made as a
    normal tensor even inside inference mode (where an engine step first asks for it): an inference
    tensor could not be written by a later call outside that mode."""
    buf = getattr(_scratch, "tile", None)
    if buf is None:
        with torch.inference_mode(False):
            buf = _scratch.tile = torch.empty(TILE_FLOATS, dtype=torch.float32)
    return buf


def linear_tiled(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in float32 for many rows of x (a prefill chunk): W's rows are dequantized a
    tile at a time into this thread's buffer (the same float32 values as GGUF's), and a float32 GEMM
    runs x against each tile. x [..., K] -> [..., N]."""
    x2 = _checked(x, weight, bias)
    n, k = weight.shape
    tile_rows = max(TILE_N, TILE_FLOATS // k // TILE_N * TILE_N)
    buf = _tile_buffer() if tile_rows * k <= TILE_FLOATS else torch.empty(tile_rows * k, dtype=torch.float32)
    kind, packed = KIND_CODES[weight.kind], weight.packed.data_ptr()
    if n <= tile_rows:  # the whole weight at once: the GEMM writes y itself
        _ext.dequantize(packed, buf.data_ptr(), kind, 0, n, n, k)
        y = _gemm(x2, buf[: n * k].view(n, k), bias)
    else:
        y = torch.empty((x2.shape[0], n), dtype=torch.float32)
        for r0 in range(0, n, tile_rows):
            r1 = min(n, r0 + tile_rows)
            _ext.dequantize(packed, buf.data_ptr(), kind, r0, r1, n, k)
            y[:, r0:r1] = _gemm(x2, buf[: (r1 - r0) * k].view(r1 - r0, k), None if bias is None else bias[r0:r1])
    return y.view(*x.shape[:-1], n)


def embedding(ids: torch.Tensor, weight: QuantWeight) -> torch.Tensor:
    """Rows `ids` of W as float32: ids [...] integers -> [..., K]. Only those rows are dequantized
    (the same values as GGUF's); ValueError names an id outside [0, N)."""
    if _ext is None:
        raise RuntimeError("the quantized CPU kernel is not built: reinstall splitserve (pip install -e .)")
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"ids must be an integer CPU tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.device.type != "cpu":
        raise ValueError(f"ids must be an integer CPU tensor, got {ids.dtype} on {ids.device}")
    n, k = weight.shape
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty((flat.shape[0], k), dtype=torch.float32)
    if flat.shape[0]:
        bad = _ext.gather(weight.packed.data_ptr(), flat.data_ptr(), out.data_ptr(), KIND_CODES[weight.kind],
                          flat.shape[0], n, k)
        if bad >= 0:
            raise ValueError(f"ids: {int(flat[bad])} at position {bad} is outside the {n} rows of the embedding")
    return out.view(*ids.shape, k)
