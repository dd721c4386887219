"""Which dtype "auto" means for a model on this machine: the CPU's flags, CUDA's bfloat16 support and
whether the model's projections are GGUF blocks the CPU kernels compute (config.engine.resolve_dtype
decides; this module reads the machine and the model file's header)."""
from __future__ import annotations

from pathlib import Path

import torch

from splitserve.config.engine import CPU_BF16_FLAGS, resolve_dtype
from splitserve.kernels import cpu_quant
from splitserve.model.gguf_file import GGUF_PROJECTIONS, GGUFFile
from splitserve.model.paths import resolve_model_path


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set flags the CPU reports (the `flags` lines of /proc/cpuinfo, or of the text
    given); empty where there is no such file (then no bf16 instructions are assumed)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            found.update(value.split())
    return frozenset(found)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & set(CPU_BF16_FLAGS))


_PROJECTION_WEIGHTS = tuple(f"{g}.weight" for g in GGUF_PROJECTIONS)


def computes_gguf_blocks_on_cpu(model: str | None) -> bool:
    """Whether `model` (None: the default) is a GGUF file with projections in block formats the CPU
    kernels compute, and those kernels are built. Reads the file's header only; False for anything
    that is not such a file (the loader reports what is wrong with it)."""
    if not cpu_quant.available():
        return False
    try:
        path = resolve_model_path(model)
        if path.is_dir():
            return False
        gguf = GGUFFile(path)
    except (OSError, ValueError):
        return False
    return any(t.tensor_type.name in cpu_quant.BLOCK_BYTES and t.name.endswith(_PROJECTION_WEIGHTS)
               for t in gguf.tensors)



def resolve_model_dtype(dtype: str, device: str, model: str | None = None) -> tuple[str, str]:
    """`config.engine.resolve_dtype` with this machine's CPU flags and CUDA bf16 support, for
    `model` (None: the default model)."""
    cuda_bf16 = False
    if dtype == "auto" and device.startswith("cuda") and torch.cuda.is_available():
        cuda_bf16 = bool(torch.cuda.is_bf16_supported())
    auto_cpu = dtype == "auto" and not device.startswith("cuda")
    return resolve_dtype(dtype, device, cpu_flags() if dtype == "auto" else frozenset(), cuda_bf16,
                         cpu_blocks=auto_cpu and computes_gguf_blocks_on_cpu(model))
