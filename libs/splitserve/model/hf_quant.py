"""Hugging Face quantized checkpoints: `quantization_config` read as GPTQ, AWQ and FP8 checkpoints
write it, and their tensors gathered into `packed_quant` weights (kept packed; see that module for
the layouts and their arithmetic).

Supported: quant_method "gptq" (bits 2, 4, 8; any group_size or -1; sym or zero points; desc_act
with g_idx; checkpoint_format "gptq" = v1, zeros stored minus one, or "gptq_v2"); "awq" (bits 4,
version "gemm", zero_point true); "fp8" (float8_e4m3fn weights, `weight_scale` per tensor or per
channel, or `weight_scale_inv` blocks with weight_block_size; activation_scheme dynamic or static, the
activations computed in float either way); "compressed-tensors" in its "float-quantized" format
(8-bit float weights, strategy tensor, channel or block). Anything else is a `ModelLoadError`
naming the field. A folder without the key in config.json may carry it as quantize_config.json
(older AutoGPTQ checkpoints).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from splitserve.kernels.packed_quant import Fp8Weight, GroupQuantWeight, PackedParts

METHODS = ("gptq", "awq", "fp8", "compressed-tensors")
# tensors of a quantized module that stay as they are (the rest of a checkpoint becomes float32)
RAW_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv", "input_scale")
FUSED = (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("self_attn.o_proj", ("o_proj",)),
         ("mlp.gate_up_proj", ("gate_proj", "up_proj")), ("mlp.down_proj", ("down_proj",)))


class QuantConfigError(ValueError):
    """A quantization_config this loader cannot run; the message names the field."""


@dataclass(frozen=True)
class QuantSpec:
    """What the loader needs of a checkpoint's quantization_config."""

    method: str  # "gptq", "awq" or "fp8" (compressed-tensors float-quantized reads as fp8)
    bits: int = 8
    group_size: int = -1  # -1: one group over the whole input (per channel)
    zero_offset: int = 0  # GPTQ v1: stored zeros are the zero minus one
    block: tuple[int, int] | None = None  # FP8 block scales (rows, columns)


def read_spec(folder: Path, cfg: dict) -> QuantSpec | None:
    """The checkpoint's quantization, None for a float checkpoint; QuantConfigError names a field
    this loader cannot run."""
    q = cfg.get("quantization_config")
    side = folder / "quantize_config.json"
    if q is None and side.is_file():
        q = json.loads(side.read_text())
        q.setdefault("quant_method", "gptq")  # AutoGPTQ's own file predates the key
    if q is None:
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "gptq":
        return _gptq(q)
    if method == "awq":
        return _awq(q)
    if method == "fp8":
        return _fp8(q)
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    raise QuantConfigError(f"quantization_config.quant_method = {q.get('quant_method')!r} is not supported "
                           f"(supported: {', '.join(METHODS)})")


def _group_size(q: dict, method: str) -> int:
    size = int(q.get("group_size", -1))
    if size != -1 and size <= 0:
        raise QuantConfigError(f"quantization_config.group_size = {size} ({method}): expected -1 or a positive size")
    return size


def _gptq(q: dict) -> QuantSpec:
    bits = int(q.get("bits", 4))
    if bits not in (2, 4, 8):
        raise QuantConfigError(f"quantization_config.bits = {bits} (gptq) is not supported (supported: 2, 4, 8; "
                               "3-bit words straddle int32 boundaries)")
    if q.get("dynamic"):
        raise QuantConfigError("quantization_config.dynamic (gptq per-module overrides) is not supported")
    fmt = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise QuantConfigError(f"quantization_config.checkpoint_format = {fmt!r} (gptq) is not supported "
                               "(supported: gptq, gptq_v2)")
    return QuantSpec("gptq", bits, _group_size(q, "gptq"), 1 if fmt == "gptq" else 0)


def _awq(q: dict) -> QuantSpec:
    bits = int(q.get("bits", q.get("w_bit", 4)))
    if bits != 4:
        raise QuantConfigError(f"quantization_config.bits = {bits} (awq) is not supported (supported: 4)")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantConfigError(f"quantization_config.version = {q.get('version')!r} (awq) is not supported "
                               "(supported: gemm)")
    if not q.get("zero_point", True):
        raise QuantConfigError("quantization_config.zero_point = false (awq) is not supported")
    return QuantSpec("awq", 4, _group_size(q, "awq"))


def _fp8(q: dict) -> QuantSpec:
    scheme = str(q.get("activation_scheme", "dynamic")).lower()
    if scheme not in ("dynamic", "static"):
        raise QuantConfigError(f"quantization_config.activation_scheme = {scheme!r} (fp8) is not supported "
                               "(supported: dynamic, static)")
    block = q.get("weight_block_size")
    return QuantSpec("fp8", block=None if block is None else (int(block[0]), int(block[1])))


def _compressed_tensors(q: dict) -> QuantSpec:
    groups = q.get("config_groups") or {}
    if not groups:
        raise QuantConfigError("quantization_config.config_groups (compressed-tensors) is missing or empty")
    blocks = set()
    for name, group in groups.items():
        fmt = str(group.get("format") or q.get("format") or "")
        if fmt != "float-quantized":
            raise QuantConfigError(f"quantization_config.config_groups.{name}.format = {fmt!r} (compressed-tensors) "
                                   "is not supported (supported: float-quantized)")
        w = group.get("weights") or {}
        if w.get("type") != "float" or int(w.get("num_bits", 0)) != 8:
            raise QuantConfigError(f"quantization_config.config_groups.{name}.weights: type {w.get('type')!r} with "
                                   f"num_bits {w.get('num_bits')!r} is not supported (supported: float, 8)")
        strategy = w.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            raise QuantConfigError(f"quantization_config.config_groups.{name}.weights.strategy = {strategy!r} "
                                   "is not supported (supported: tensor, channel, block)")
        blocks.add(tuple(w["block_structure"]) if strategy == "block" else None)
    if len(blocks) != 1:
        raise QuantConfigError("quantization_config.config_groups (compressed-tensors): groups with different "
                               "block structures are not supported")
    (block,) = blocks
    return QuantSpec("fp8", block=block)


def keeps_raw(key: str, t: torch.Tensor) -> bool:
    """A tensor of a quantized module, kept in its own dtype (the loader makes the rest float32)."""
    return not t.dtype.is_floating_point or t.dtype == torch.float8_e4m3fn or key.rsplit(".", 1)[-1] in RAW_SUFFIXES


def take_packed(spec: QuantSpec, tensors: dict, where: Path) -> dict[str, PackedParts]:
    """Pops every quantized module's tensors from `tensors` (flat names, `layers.N.q_proj.qweight`)
    and returns its packed weight under `<module>.weight`; QuantConfigError names a bad tensor."""
    packed = {}
    if spec.method in ("gptq", "awq"):
        modules = [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]
        build = _group_weight
    else:
        modules = [k.removesuffix(".weight") for k, t in tensors.items()
                   if k.endswith(".weight") and t.dtype == torch.float8_e4m3fn]
        build = _fp8_weight
    for module in modules:
        found = {s: tensors.pop(f"{module}.{s}") for s in RAW_SUFFIXES + ("weight",) if f"{module}.{s}" in tensors}
        try:
            packed[f"{module}.weight"] = PackedParts((build(spec, found),))
        except (KeyError, ValueError) as exc:
            raise QuantConfigError(f"{where}: module {module}: {exc}") from exc
    for key in [k for k in tensors if k.rsplit(".", 1)[-1] in RAW_SUFFIXES]:
        raise QuantConfigError(f"{where}: tensor {key} belongs to no quantized weight")
    return packed


def _need(found: dict, name: str, dtype: torch.dtype | tuple, shape: tuple | None = None) -> torch.Tensor:
    if name not in found:
        raise ValueError(f"tensor {name!r} is missing")
    t = found[name]
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes or (shape is not None and tuple(t.shape) != shape):
        raise ValueError(f"tensor {name!r} is {t.dtype} {list(t.shape)}, expected {dtypes[0]} {list(shape or ())}")
    return t.contiguous()


def _group_weight(spec: QuantSpec, found: dict) -> GroupQuantWeight:
    """A GPTQ or AWQ module's tensors, their shapes checked against each other."""
    qweight, per = found.get("qweight"), 32 // spec.bits
    if qweight is None or qweight.dim() != 2:
        raise ValueError("tensor 'qweight' is missing or not a matrix")
    k, n = (qweight.shape[0] * per, qweight.shape[1]) if spec.method == "gptq" else \
        (qweight.shape[0], qweight.shape[1] * 8)
    size = k if spec.group_size == -1 else spec.group_size
    groups = -(-k // size)
    floats = (torch.float16, torch.bfloat16, torch.float32)
    scales = _need(found, "scales", floats, (groups, n)).to(torch.float32).contiguous()
    qzeros = _need(found, "qzeros", torch.int32, (groups, n // per) if spec.method == "gptq" else (groups, n // 8))
    g_idx = None
    if spec.method == "gptq" and "g_idx" in found:
        g_idx = _need(found, "g_idx", (torch.int32, torch.int64), (k,)).to(torch.int64)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ValueError(f"tensor 'g_idx' holds groups outside [0, {groups})")
        if k % size == 0 and torch.equal(g_idx, torch.arange(k) // size):
            g_idx = None  # groups in order: each tile broadcasts instead of gathering
    elif k % size:
        if spec.method == "awq":
            raise ValueError(f"in_features {k} is not a multiple of group_size {size}")
        g_idx = torch.arange(k) // size  # GPTQ's last group partial
    return GroupQuantWeight(spec.method, spec.bits, n, k, size, spec.zero_offset, _need(found, "qweight", torch.int32),
                            qzeros, scales, g_idx)


def _fp8_weight(spec: QuantSpec, found: dict) -> Fp8Weight:
    """An FP8 module's weight and scale: one value, one per output row, or a block grid."""
    weight = _need(found, "weight", torch.float8_e4m3fn)
    n, k = weight.shape
    scale = found.get("weight_scale", found.get("weight_scale_inv"))
    if scale is None:
        raise ValueError("tensor 'weight_scale' (or 'weight_scale_inv') is missing")
    scale = scale.to(torch.float32)
    if spec.block is not None:
        bn, bk = spec.block
        if k % bk or tuple(scale.shape) != (-(-n // bn), k // bk):
            raise ValueError(f"block scales {list(scale.shape)} do not fit a [{n}, {k}] weight in {bn}x{bk} blocks")
        return Fp8Weight(weight, scale.contiguous(), (bn, bk))
    if scale.numel() == 1:
        return Fp8Weight(weight, scale.reshape(1, 1), None)
    if scale.numel() == n and scale.dim() <= 2 and scale.shape[0] == n:
        return Fp8Weight(weight, scale.reshape(n, 1).contiguous(), None)
    raise ValueError(f"tensor 'weight_scale' {list(scale.shape)} is neither per tensor nor per channel of [{n}, {k}]")


def fuse(num_layers: int, tied: bool, packed: dict[str, PackedParts], tensors: dict) -> dict[str, PackedParts]:
    """The packed weights under the model's fused names (`layers.N.self_attn.qkv_proj.weight`, ...,
    `lm_head.weight`). A fused projection with some parts float in the checkpoint (a module left out
    of the quantization) has its packed parts dequantized into `tensors` instead. Empties `packed`."""
    fused = {}
    head = packed.pop("lm_head.weight", None)
    if head is not None and not tied:
        fused["lm_head.weight"] = head
    for i in range(num_layers):
        p = f"layers.{i}."
        for target, names in FUSED:
            found = [packed.pop(f"{p}{name}.weight", None) for name in names]
            if all(f is not None for f in found):
                fused[f"{p}{target}.weight"] = PackedParts(tuple(part for f in found for part in f.parts))
                continue
            for name, f in zip(names, found):
                if f is not None:
                    tensors[f"{p}{name}.weight"] = f.dequantize()
    if packed:
        raise QuantConfigError(f"quantized weights of no projection this model has: {', '.join(sorted(packed)[:4])}")
    return fused
