"""A writer of GPTQ, AWQ and FP8 checkpoint tensors (round to nearest per group) and float64
references of their dequantization, both written from the formats' descriptions (see
libs/splitserve/kernels/packed_quant.py for the layouts), independently of the loader's code:
numpy, one value at a time where the layout is subtle."""
from __future__ import annotations

import numpy as np
import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8j + AWQ_ORDER[i]


def _groups(k: int, group_size: int, desc_act: bool, rng: np.random.Generator) -> np.ndarray:
    """g_idx [K]: each input channel's group; with desc_act the channels are taken in a shuffled
    order (as an activation order would take them) and grouped in that order."""
    size = k if group_size == -1 else group_size
    order = rng.permutation(k) if desc_act else np.arange(k)
    g_idx = np.empty(k, np.int64)
    g_idx[order] = np.arange(k) // size
    return g_idx


def _rtn(w: np.ndarray, g_idx: np.ndarray, bits: int, sym: bool, min_zero: int):
    """Round to nearest per (group, output column): q [K, N], zeros and scales [G, N] (float16).
    w is W^T [K, N] float64. sym: zero 2^(bits-1). min_zero 1 for GPTQ v1 (a stored zero minus one
    cannot be negative)."""
    maxq = (1 << bits) - 1
    groups = int(g_idx.max()) + 1
    q = np.empty(w.shape, np.int64)
    zeros = np.empty((groups, w.shape[1]), np.int64)
    scales = np.empty((groups, w.shape[1]), np.float16)
    for g in range(groups):
        rows = w[g_idx == g]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        if sym:
            amax = np.maximum(-lo, hi)
            s = np.where(amax > 0, 2 * amax / maxq, 1.0)
            z = np.full(w.shape[1], (maxq + 1) // 2)
        else:
            s = np.where(hi > lo, (hi - lo) / maxq, 1.0)
            z = np.clip(np.round(-lo / s), min_zero, maxq)
        s16 = s.astype(np.float16)
        s16[s16 == 0] = np.float16(2.0 ** -24)
        scales[g], zeros[g] = s16, z
        q[g_idx == g] = np.clip(np.round(rows / s16.astype(np.float64)) + z, 0, maxq)
    return q, zeros, scales


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """[R * per, C] -> int32 [R, C]: value r * per + i in bits [i * bits, (i + 1) * bits)."""
    per = 32 // bits
    v = values.astype(np.uint64).reshape(-1, per, values.shape[1])
    words = sum(v[:, i, :] << np.uint64(i * bits) for i in range(per))
    return words.astype(np.uint32).view(np.int32)


def _pack_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """[R, C * per] -> int32 [R, C]: column c * per + i in bits [i * bits, (i + 1) * bits)."""
    return np.ascontiguousarray(_pack_rows(values.T, bits).T)


def gptq(w: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool, v1: bool, seed: int = 0) -> dict:
    """GPTQ tensors of W [N, K]: qweight, qzeros (v1: each zero stored minus one), scales, g_idx."""
    rng = np.random.default_rng(seed)
    wt = w.double().numpy().T
    g_idx = _groups(wt.shape[0], group_size, desc_act, rng)
    q, zeros, scales = _rtn(wt, g_idx, bits, sym, 1 if v1 else 0)
    stored = (zeros - (1 if v1 else 0)) & ((1 << bits) - 1)
    return {"qweight": torch.from_numpy(_pack_rows(q, bits)), "qzeros": torch.from_numpy(_pack_columns(stored, bits)),
            "scales": torch.from_numpy(scales), "g_idx": torch.from_numpy(g_idx.astype(np.int32))}


def awq(w: torch.Tensor, group_size: int) -> dict:
    """AWQ GEMM tensors of W [N, K]: qweight [K, N/8], qzeros [K/group, N/8] (interleaved), scales."""
    wt = w.double().numpy().T
    k, n = wt.shape
    q, zeros, scales = _rtn(wt, np.arange(k) // group_size, 4, False, 0)

    def pack(values: np.ndarray) -> np.ndarray:  # [R, N] -> [R, N / 8]: nibble i <- column 8j + AWQ_ORDER[i]
        v = values.astype(np.uint64).reshape(values.shape[0], n // 8, 8)
        words = sum(v[:, :, col] << np.uint64(4 * i) for i, col in enumerate(AWQ_ORDER))
        return words.astype(np.uint32).view(np.int32)

    return {"qweight": torch.from_numpy(pack(q)), "qzeros": torch.from_numpy(pack(zeros)),
            "scales": torch.from_numpy(scales)}


def fp8(w: torch.Tensor, strategy: str, block: tuple[int, int] = (128, 128)) -> dict:
    """FP8 tensors of W [N, K]: weight float8_e4m3fn and a float32 scale per tensor ([1]), per
    channel ([N, 1]) or per block ([ceil(N / bn), K / bk]); amax maps to 448."""
    w = w.float()
    n, k = w.shape
    if strategy == "tensor":
        scale = (w.abs().max() / 448).reshape(1)
        full = scale.expand(n, k)
    elif strategy == "channel":
        scale = (w.abs().amax(1, keepdim=True) / 448)
        full = scale.expand(n, k)
    else:
        bn, bk = block
        padded = torch.nn.functional.pad(w.abs(), (0, 0, 0, -n % bn))
        scale = padded.view(-1, bn, k // bk, bk).amax((1, 3)) / 448
        full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    full = torch.where(full > 0, full, torch.ones_like(full))
    return {"weight": (w / full).clamp(-448, 448).to(torch.float8_e4m3fn), "weight_scale": scale.contiguous()}


# ------------------------------------------------------------------------ float64 references


def _value(word: int, index: int, bits: int) -> int:
    return (int(word) & 0xFFFFFFFF) >> (index * bits) & ((1 << bits) - 1)


def gptq_reference(t: dict, bits: int, v1: bool) -> np.ndarray:
    """W [N, K] float64 from GPTQ tensors, one value at a time from the description."""
    qweight, qzeros = t["qweight"].numpy(), t["qzeros"].numpy()
    scales, g_idx = t["scales"].numpy().astype(np.float64), t["g_idx"].numpy()
    per = 32 // bits
    k, n = qweight.shape[0] * per, qweight.shape[1]
    q = np.array([[_value(qweight[r // per, c], r % per, bits) for c in range(n)] for r in range(k)])
    z = np.array([[_value(qzeros[g, c // per], c % per, bits) for c in range(n)] for g in range(qzeros.shape[0])])
    z = z + (1 if v1 else 0)
    return ((q - z[g_idx]) * scales[g_idx]).T


def awq_reference(t: dict, group_size: int) -> np.ndarray:
    """W [N, K] float64 from AWQ GEMM tensors."""
    def unpack(words: np.ndarray) -> np.ndarray:
        out = np.empty((words.shape[0], words.shape[1] * 8), np.int64)
        for j in range(words.shape[1]):
            for i, col in enumerate(AWQ_ORDER):
                out[:, 8 * j + col] = [_value(wd, i, 4) for wd in words[:, j]]
        return out

    q, z = unpack(t["qweight"].numpy()), unpack(t["qzeros"].numpy())
    s = t["scales"].numpy().astype(np.float64)
    g = np.arange(q.shape[0]) // group_size
    return ((q - z[g]) * s[g]).T


def e4m3_value(byte: int) -> float:
    """The float8_e4m3fn value of a byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent
    0 is subnormal (m / 8 * 2^-6); S.1111.111 is NaN (no infinities)."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    if exp == 0:
        return sign * man / 8 * 2.0 ** -6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def fp8_reference(t: dict, block: tuple[int, int] | None = None) -> np.ndarray:
    """W [N, K] float64 from FP8 tensors (decoded from their bits, scaled in float64)."""
    table = np.array([e4m3_value(b) for b in range(256)])
    w = table[t["weight"].view(torch.uint8).numpy()]
    s = t["weight_scale"].double().numpy()
    if block is not None:
        n, k = w.shape
        s = np.repeat(np.repeat(s, block[0], 0)[:n], block[1], 1)
    return w * (s if s.ndim == 2 else s.reshape(-1, 1))
