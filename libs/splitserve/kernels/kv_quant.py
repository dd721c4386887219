"""8-bit KV cache: how a K or V vector is stored in int8 or fp8 (e4m3) with its scale, and read back.

Layout (engine.memory counts the same bytes; KVCache owns the tensors):
    values  [num_blocks, block_size, kv_heads, head_dim]  int8 | float8_e4m3fn
    scales  [num_blocks, block_size, kv_heads]            float32
One scale per layer, K or V, token and KV head: the head's `head_dim` values of one token share it.
A token's stored bits therefore depend on that token alone, never on the other tokens of its block,
the order they arrived in or how its prefill was cut: a prefix-cache hit, a block from the kvstore
and a recomputation read the very same K and V.

This module is the definition; every kernel that writes or reads an 8-bit cache (the torch paths,
the C decode kernels, the Triton kernels) reproduces it bit for bit:
    amax  = max_d |x_d|                         (float32)
    scale = amax / QMAX                         (float32 division; QMAX 127 for int8, 448 for fp8)
    q_d   = 0 if scale == 0 else x_d / scale    (float32 division, not a multiply by 1/scale)
    int8: round half to even, clamp to [-127, 127];  fp8: clamp to [-448, 448], round to nearest
          even e4m3fn (torch's float32 -> float8_e4m3fn conversion)
    read: x'_d = float(q_d) * scale             (float32), then the compute dtype
"""
from __future__ import annotations

import torch

QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}
STORAGE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
# what a cache dtype is called on the wire and by engine.memory, by its storage dtype
SCALED_BY_STORAGE = {torch.int8: "int8", torch.float8_e4m3fn: "fp8_e4m3"}


def quantize(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [..., head_dim] in STORAGE[name], scales [...] float32) of x [..., head_dim]."""
    qmax = QMAX[name]
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # a tensor divisor: on CUDA torch turns a division by a Python number into a multiplication by
    # its reciprocal, which rounds differently (measured on an H200: ~4% of int8 scales)
    scale = amax / torch.full_like(amax, qmax)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.where(scale.unsqueeze(-1) > 0, xf / safe, torch.zeros_like(xf))
    if name == "int8":
        values = torch.round(q).clamp_(-127.0, 127.0).to(torch.int8)
    else:
        values = q.clamp_(-qmax, qmax).to(torch.float8_e4m3fn)
    return values, scale


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x' [..., head_dim] in `dtype` from values [..., head_dim] and scales [...]."""
    return (values.float() * scales.unsqueeze(-1)).to(dtype)


def round_trip(x: torch.Tensor, name: str) -> torch.Tensor:
    """What reading x back from a cache of dtype `name` gives, in x's dtype."""
    values, scales = quantize(x, name)
    return dequantize(values, scales, x.dtype)
