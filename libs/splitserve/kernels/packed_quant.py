"""Projections from Hugging Face quantized checkpoints (GPTQ, AWQ, FP8), held as the checkpoint's
own packed tensors and computed a weight tile at a time (no resident float copy).

The layouts, as the formats' published descriptions give them (W is [out N, in K]; "word" an int32,
its values in order from the low bits, `32 / bits` of them):
- GPTQ (AutoGPTQ / GPTQModel): `qweight` int32 [K * bits / 32, N], packed along the INPUT dim (word
  [r, n] holds input channels r * 32/bits + i); `qzeros` int32 [G, N * bits / 32], packed along the
  OUTPUT dim; `scales` float16 [G, N]; `g_idx` int32 [K], the group of each input channel (k //
  group_size, or any assignment with desc_act). W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]),
  g = g_idx[k]. checkpoint_format "gptq" (v1, the default) stores each zero minus one (zero = stored
  + 1, a v1 quirk every v1 kernel follows); "gptq_v2" stores the zero itself.
- AWQ (GEMM version): `qweight` int32 [K, N / 8] and `qzeros` int32 [K / group, N / 8], both packed
  along the OUTPUT dim, 8 nibbles a word in AWQ's interleaved order: nibble i holds column
  8j + [0, 2, 4, 6, 1, 3, 5, 7][i]; `scales` float16 [K / group, N]. W[n, k] = scales * (q - zero).
- FP8: `weight` float8_e4m3fn [N, K] and `weight_scale` float32, one value (per tensor), [N] or
  [N, 1] (per output channel), or a [ceil(N / bn), K / bk] grid (blocks, `weight_scale_inv` of the
  DeepSeek-style checkpoints): W = weight * scale. Activations stay float (weight-only arithmetic).
The dequantized values are exact in float32 (an integer of at most 9 bits times a float16 scale; an
fp8 value times a float32 scale rounds once, as a float64 product rounded to float32 does).

`PackedLinear` computes y = x @ W^T by tiles of W's output rows: each tile is dequantized into the
thread's reused float32 buffer (`cpu_quant`'s, 8 MB) and a float32 GEMM runs x against it; a fused
projection (q/k/v, gate/up) holds its parts as they are and writes each one's columns of y. On the
CPU the tiles come from packed_quant.c where it is built (`built()`), else from torch ops (the
reference, the same values). On a CUDA device GPTQ/AWQ parts go through kernels/triton_quant.py
instead (a GEMM that unpacks the words itself; SPLITSERVE_TRITON_QUANT=off keeps the tiles). The
per-group scales are widened to float32 at load (1 / group_size of a float copy).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import cpu_quant, ext_ready, fp8_mm, triton_quant

try:
    from splitserve.kernels import _packed_quant as _ext
except ImportError:  # not built: tiles are dequantized by torch ops (the same values, ~50x slower)
    _ext = None

AWQ_SHIFTS = (0, 16, 4, 20, 8, 24, 12, 28)  # bit offset of column j of a word (the inverse of AWQ's order)
TILE_ALIGN = 32  # output columns per tile step: whole words of zeros at every bit width


def built() -> bool:
    """The C tile kernel is importable and this CPU has what it was compiled for."""
    return ext_ready(_ext)


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their `32 / bits` values (low bits first) as int32, spread along `dim` (0: rows,
    1: columns): [a, b] -> [a * per, b] or [a, b * per]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    if dim == 0:
        values = (words.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)  # [a, per, b]
    else:
        values = (words.unsqueeze(2) >> shifts.view(1, 1, per)) & ((1 << bits) - 1)  # [a, b, per]
    return values.reshape(words.shape[0] * per, -1) if dim == 0 else values.reshape(words.shape[0], -1)


@dataclass(frozen=True)
class GroupQuantWeight:
    """A GPTQ or AWQ matrix [out_features, in_features] as its checkpoint tensors (layouts above)."""

    layout: str  # "gptq" or "awq"
    bits: int  # 2, 4 or 8 (GPTQ), 4 (AWQ)
    out_features: int
    in_features: int
    group_size: int  # input channels per group (in_features for per-channel, group_size -1)
    zero_offset: int  # added to each stored zero: 1 for GPTQ v1 checkpoints, else 0
    qweight: torch.Tensor  # int32, see the layouts
    qzeros: torch.Tensor  # int32 [groups, N * bits / 32]
    scales: torch.Tensor  # float32 [groups, N] (the checkpoint's float16 values, widened at load)
    g_idx: torch.Tensor | None  # int64 [K]: each input channel's group; None: k // group_size, whole groups

    input_major = True  # a tile is [K, n]: W^T's columns n0:n1

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def tile(self, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """W^T[:, n0:n1] as float32 [K, n1 - n0], written into `out` (at least K * (n1 - n0) floats);
        n0 a multiple of TILE_ALIGN."""
        k, n = self.in_features, n1 - n0
        if out.device.type == "cpu" and built():
            _ext.group_tile(self.qweight.data_ptr(), self.qzeros.data_ptr(), self.scales.data_ptr(),
                            0 if self.g_idx is None else self.g_idx.data_ptr(), out.data_ptr(), self.bits, k,
                            self.out_features, n0, n1, self.scales.shape[0], self.group_size, self.zero_offset,
                            int(self.layout == "awq"))
            return out[: k * n].view(k, n)
        zw0, zw1 = n0 * self.bits // 32, -(-n1 * self.bits // 32)  # the words of zeros of those columns
        zeros = _unpack(self.qzeros[:, zw0:zw1], self.bits, 1)[:, : n] if self.layout == "gptq" \
            else self._awq_columns(self.qzeros, n0, n1)
        if self.layout == "gptq":
            q = _unpack(self.qweight[:, n0:n1], self.bits, 0)  # [K, n]
        else:
            q = self._awq_columns(self.qweight, n0, n1)
        if self.zero_offset:
            zeros += self.zero_offset
        scales = self.scales[:, n0:n1].to(torch.float32)
        result = out[: k * n]
        if self.g_idx is None:  # whole groups in order: broadcast each group's zero and scale
            groups = k // self.group_size
            q, zeros, scales = q.view(groups, self.group_size, n), zeros[:, None], scales[:, None]
            result = result.view(groups, self.group_size, n)
        else:
            zeros, scales = zeros[self.g_idx], scales[self.g_idx]
            result = result.view(k, n)
        torch.mul(q.sub_(zeros), scales, out=result)
        return result.view(k, n)

    @staticmethod
    def _awq_columns(words: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
        """AWQ's packed columns n0:n1 (n0 a multiple of 8) as int32 [rows, n1 - n0], in column order."""
        shifts = torch.tensor(AWQ_SHIFTS, dtype=torch.int32, device=words.device)
        part = words[:, n0 // 8: -(-n1 // 8)]
        return ((part.unsqueeze(2) >> shifts) & 0xF).reshape(words.shape[0], -1)[:, : n1 - n0]

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32, the values every tile computes with (a reference; the model never holds it)."""
        return _whole(self)

    def to(self, device: torch.device) -> "GroupQuantWeight":
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        return dataclasses.replace(self, qweight=self.qweight.to(device), qzeros=self.qzeros.to(device),
                                   scales=self.scales.to(device), g_idx=g_idx)


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 matrix [out_features, in_features]: float8_e4m3fn values and their float32 scales."""

    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 contiguous: [N, 1] per channel, [1, 1] per tensor, or [N / bn, K / bk]
    block: tuple[int, int] | None  # (bn, bk) for a block grid of scales, else None

    input_major = False  # a tile is [n, K]: W's rows n0:n1

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def tile(self, n0: int, n1: int, out: torch.Tensor) -> torch.Tensor:
        """W[n0:n1] as float32 [n1 - n0, K], written into `out`."""
        k, n = self.in_features, n1 - n0
        result = out[: n * k].view(n, k)
        if out.device.type == "cpu" and built():
            bn, bk = self.block or (0, 0)
            _ext.fp8_tile(self.weight.data_ptr(), self.scale.data_ptr(), out.data_ptr(), k, n0, n1,
                          self.scale.shape[0], bn, bk)
            return result
        result.copy_(self.weight[n0:n1])  # fp8 -> float32 is exact
        if self.block is None:
            scale = self.scale[n0:n1] if self.scale.shape[0] > 1 else self.scale
            result.mul_(scale)
        else:
            bn, bk = self.block
            rows = torch.arange(n0, n1, device=self.scale.device) // bn
            result.view(n, k // bk, bk).mul_(self.scale[rows].unsqueeze(2))
        return result

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32, the values every tile computes with (a reference; the model never holds it)."""
        return _whole(self)

    def to(self, device: torch.device) -> "Fp8Weight":
        return dataclasses.replace(self, weight=self.weight.to(device), scale=self.scale.to(device))


PackedWeight = GroupQuantWeight | Fp8Weight


def _whole(weight: PackedWeight) -> torch.Tensor:
    n, k = weight.shape
    buf = torch.empty(n * k, dtype=torch.float32, device=weight.scales.device if isinstance(
        weight, GroupQuantWeight) else weight.weight.device)
    w = weight.tile(0, n, buf)
    return w.t().contiguous() if weight.input_major else w


@dataclass(frozen=True)
class PackedParts:
    """A fused projection (q/k/v, gate/up) whose parts stay their own packed weights, stacked by
    output rows; or one weight alone. Every part takes the same input."""

    parts: tuple[PackedWeight, ...]

    def __post_init__(self) -> None:
        if not self.parts or len({p.in_features for p in self.parts}) != 1:
            raise ValueError(f"fused parts must share their input features, got {[p.shape for p in self.parts]}")

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.out_features for p in self.parts), self.parts[0].in_features

    def dequantize(self) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])


def _tile_columns(weight: PackedWeight) -> int:
    """Output rows per tile: as many as fill the shared 8 MB tile buffer, whole steps of TILE_ALIGN."""
    return max(TILE_ALIGN, cpu_quant.TILE_FLOATS // weight.in_features // TILE_ALIGN * TILE_ALIGN)


class PackedLinear(nn.Module):
    """y = x @ W^T (+ bias) from a `PackedParts` (GPTQ, AWQ or FP8 tensors), in float32 whatever x's
    dtype (the output is cast back to it). On the CPU the tiles go through `cpu_quant`'s per-thread
    buffer; elsewhere a buffer of the tile's size is made per call. The packed tensors are plain
    attributes (no `.to(dtype)` reaches them): they follow x to its device on the first call."""

    backend = "packed"  # not "quant": the fused GGUF decode step (cpu_layers) does not take it

    def __init__(self, weight: PackedParts, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight_parts = weight
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; the weight has {self.out_features} outputs")
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.float32)
        first = self.weight_parts.parts[0]
        if (first.qweight if isinstance(first, GroupQuantWeight) else first.weight).device != x.device:
            self.weight_parts = PackedParts(tuple(p.to(x.device) for p in self.weight_parts.parts))
        y = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32, device=x.device)
        col = 0
        for part in self.weight_parts.parts:
            direct = _direct_product(x.reshape(-1, self.in_features), x2, part)
            if direct is not None:
                y[:, col: col + part.out_features] = direct
            else:
                step = _tile_columns(part)
                buf = _buffer(step * part.in_features, x.device)
                for n0 in range(0, part.out_features, step):
                    n1 = min(part.out_features, n0 + step)
                    w = part.tile(n0, n1, buf)
                    y[:, col + n0: col + n1] = x2 @ w if part.input_major else F.linear(x2, w)
            col += part.out_features
        if self.bias is not None:
            y += self.bias.to(torch.float32)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def _direct_product(x: torch.Tensor, x2: torch.Tensor, part: PackedWeight) -> torch.Tensor | None:
    """x @ part^T by a kernel that reads the packed weight itself, where the device has one: FP8
    tensor cores (x2, float32) or the Triton GEMM for GPTQ/AWQ (x in its own dtype); else None."""
    if isinstance(part, Fp8Weight) and fp8_mm.usable(x.device, part):
        return fp8_mm.scaled_linear(x2, part)
    if isinstance(part, GroupQuantWeight) and triton_quant.usable(x.device):
        return triton_quant.packed_matmul(x, part)
    return None


def _buffer(floats: int, device: torch.device) -> torch.Tensor:
    """A float32 tile buffer: the thread's shared one on the CPU when it is large enough."""
    if device.type == "cpu" and floats <= cpu_quant.TILE_FLOATS:
        return cpu_quant._tile_buffer()
    return torch.empty(floats, dtype=torch.float32, device=device)
