"""Load-time quantization of a float checkpoint's projections, per output channel:

`--quantization int8`: signed 8-bit codes held as Q8_0 blocks whose every block of a row carries the
row's scale. They then run on the kernels GGUF's blocks run on (kernels/cpu_quant.c: exact float
arithmetic on d * q, or the int8 path), with no float copy resident: a quarter of float32's bytes
plus 2 bytes per 32 weights. The CPU's quantized kernels in float32 only.

`--quantization fp8`: float8_e4m3fn values with a float32 scale a row, held as the FP8 weights of an
HF FP8 checkpoint are (kernels/packed_quant.Fp8Weight, computed a dequantized tile at a time, on any
device and compute dtype): a quarter of float32's bytes plus 4 bytes a row. Weight-only: the
activations stay in the compute dtype."""
from __future__ import annotations

import numpy as np
import torch

from splitserve.kernels import cpu_quant
from splitserve.kernels.packed_quant import Fp8Weight, PackedParts
from splitserve.model import hf_quant

FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def check_quantization(quantization: str, cpu_kernels: bool, dtype: str, device: str) -> None:
    """`quantization` is "none", "fp8", or "int8" where the model computes on the CPU's quantized
    kernels in float32 (`cpu_kernels`)."""
    if quantization not in ("none", "int8", "fp8"):
        raise ValueError(f"quantization must be 'none', 'int8' or 'fp8', got {quantization!r}")
    if quantization == "int8" and not cpu_kernels:
        raise ValueError(f"quantization 'int8' computes with the CPU's quantized kernels in float32: use "
                         f"dtype float32 on the CPU (got dtype {dtype!r} on {device!r}"
                         f"{'' if cpu_quant.available() else ', and the kernels are not built'})")


# a layer's fused projections and the checkpoint's parts of each, stacked by rows in this order
PROJECTION_PARTS = (("self_attn.qkv_proj.weight", ("q_proj", "k_proj", "v_proj")), ("self_attn.o_proj.weight", ("o_proj",)),
                    ("mlp.gate_up_proj.weight", ("gate_proj", "up_proj")), ("mlp.down_proj.weight", ("down_proj",)))


def quantize_at_load(quantization: str, args, tensors: dict, skip: dict) -> dict:
    """The projections `quantization` ("none", "int8", "fp8") quantizes, under the model's fused
    names, removed from `tensors`; `skip`: the fused projections already kept quantized."""
    if quantization == "int8":
        return quantize_int8(args, tensors, skip)
    if quantization == "fp8":
        return hf_quant.fuse(args.num_layers, args.tie_word_embeddings, quantize_fp8(args, tensors, skip), tensors)
    return {}


def quantize_int8(args, tensors: dict, skip: dict) -> dict[str, cpu_quant.QuantWeight]:
    """The float projections of `tensors` (fused as the model holds them; the ones in `skip` are
    already kept quantized) as per-channel int8, removed from `tensors`: `int8_blocks`."""
    out = {}
    for fused, names in _float_projections(args, tensors, skip):
        weight = np.concatenate([np.asarray(tensors.pop(n), dtype=np.float32) for n in names])
        out[fused] = cpu_quant.QuantWeight.from_gguf("Q8_0", int8_blocks(weight))
    return out


def _float_projections(args, tensors: dict, skip: dict):
    """(the fused projection's name, its parts' names) of each projection whose parts are all float
    in `tensors` and which `skip` does not already hold quantized."""
    for i in range(args.num_layers):
        p = f"layers.{i}."
        for target, parts in PROJECTION_PARTS:
            names = [f"{p}{part}.weight" for part in parts]
            if p + target not in skip and all(n in tensors for n in names):
                yield p + target, names


def int8_blocks(weight: np.ndarray) -> np.ndarray:
    """W [N, K] float as Q8_0 blocks (uint8 [N, K / 32 * 34]) with one scale per row: d = the row's
    largest |w| / 127, rounded to float16 (the block format's scale), and codes round(w / d) in
    [-127, 127]. Every block of a row carries the same d, so the row is per-channel int8 and runs
    on the Q8_0 kernels (exact float arithmetic on d * q, or the int8 path)."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % 32:
        raise ValueError(f"int8 quantization needs a matrix with a multiple of 32 columns, got {w.shape}")
    n, k = w.shape
    d = (np.abs(w).max(axis=1) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    safe = np.where(d32 > 0, d32, 1.0)[:, None]
    codes = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    blocks = np.empty((n, k // 32, 34), np.uint8)
    blocks[:, :, :2] = np.repeat(d.view(np.uint8).reshape(n, 1, 2), k // 32, axis=1)
    blocks[:, :, 2:] = codes.view(np.uint8).reshape(n, k // 32, 32)
    return blocks.reshape(n, k // 32 * 34)


def quantize_fp8(args, tensors: dict, skip: dict) -> dict[str, PackedParts]:
    """The float projection parts of `tensors` (flat names, `layers.N.q_proj.weight`; the fused
    projections in `skip` are already kept quantized) as per-channel FP8 weights, removed from
    `tensors`, under the names `hf_quant.fuse` takes."""
    out = {}
    for _, names in _float_projections(args, tensors, skip):
        for name in names:
            out[name] = PackedParts((fp8_weight(tensors.pop(name)),))
    return out


def fp8_weight(weight) -> Fp8Weight:
    """W [N, K] float as float8_e4m3fn values and a float32 scale a row: s = the row's largest |w| /
    448, values w / s rounded to nearest even (torch's conversion); an all-zero row has s = 0."""
    w = torch.as_tensor(np.asarray(weight, dtype=np.float32))
    if w.dim() != 2:
        raise ValueError(f"fp8 quantization needs a matrix, got shape {tuple(w.shape)}")
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = (w / safe).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(values.contiguous(), scale.contiguous(), None)
