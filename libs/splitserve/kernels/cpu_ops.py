"""A Llama layer's small ops on the CPU in one pass each: the C functions of `cpu_ops.c`, built by
`pip install` beside the attention kernel.

RMSNorm, SiLU-and-multiply and rotate-half RoPE on float32 rows. torch runs each as several
kernels (RMSNorm alone is pow, mean, add, rsqrt, mul, mul), and at 16-32 rows (a decode batch, a
prefix-cache hit) their dispatch costs more than their arithmetic. The model uses these where
`available()` says so, for contiguous float32 CPU tensors; everything else takes the torch ops.
SPLITSERVE_CPU_OPS=torch turns them off (to compare, or to rule them out).
RoPE gives the same bits as torch's ops; RMSNorm and SiLU may differ in the last bit
(tests/test_cpu_ops.py bounds the difference).

`pin_team` binds the threads of the calling thread's OpenMP team (the one every kernel and torch
op of a worker's engine loop runs on) to cores of their own; splitserve.worker decides when.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch  # first: the extension then shares torch's OpenMP runtime (libgomp is loaded once)

from splitserve.kernels import ext_ready, switched_on

try:
    from splitserve.kernels import _cpu_ops as _ext
except ImportError:  # not built (a source tree used without `pip install`): the torch ops run
    _ext = None


def built() -> bool:
    """The extension is importable and this CPU has what it was compiled for (AVX2 and FMA on x86)."""
    return ext_ready(_ext)


def available() -> bool:
    """`built()`, and SPLITSERVE_CPU_OPS (kernel, the default, or torch) does not turn it off."""
    return switched_on("SPLITSERVE_CPU_OPS", "kernel", "torch") and built()


def _check(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor, got {t.dtype} on {t.device}"
                         f"{'' if t.is_contiguous() else ', not contiguous'}")


def _need_ext() -> None:
    if _ext is None:
        raise RuntimeError("the CPU ops are not built: reinstall splitserve (pip install -e .)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2, -1) + eps)) over the last dim; x [..., dim], weight [dim]."""
    _need_ext()
    _check("x", x)
    _check("weight", weight)
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}; x's last dim is {dim}")
    out = torch.empty_like(x)
    if x.numel():
        _ext.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, float(eps))
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up = [gate | up] along the last dim: [..., 2n] -> [..., n]."""
    _need_ext()
    _check("gate_up", gate_up)
    two_n = gate_up.shape[-1]
    if two_n % 2:
        raise ValueError(f"gate_up's last dim ({two_n}) must be even: gate and up halves")
    n = two_n // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], n))
    if gate_up.numel():
        _ext.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // two_n, n)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + roll(x, dim/2) * signed_sin for every head: x [T, heads, dim] (its rows may be
    strided, its heads not), cos and signed_sin [T, 1, dim] or [T, dim] (see model.llama.apply_rope)."""
    _need_ext()
    for name, t in (("cos", cos), ("signed_sin", signed_sin)):
        _check(name, t)
    if x.dim() != 3:
        raise ValueError(f"x must be [tokens, heads, head_dim], got shape {tuple(x.shape)}")
    rows, heads, dim = x.shape
    if (x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(2) != 1 or x.stride(1) != dim
            or (rows > 1 and x.stride(0) < heads * dim)):
        raise ValueError(f"x must be float32 CPU [tokens, heads, head_dim] with contiguous heads, got {x.dtype} "
                         f"on {x.device}, strides {x.stride()}")
    for name, t in (("cos", cos), ("signed_sin", signed_sin)):
        if t.numel() != rows * dim or t.shape[0] != rows or t.shape[-1] != dim:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{rows}, 1, {dim}] or [{rows}, {dim}]")
    if dim % 2:
        raise ValueError(f"head_dim {dim} must be even")
    out = torch.empty_like(x)
    if x.numel():
        _ext.rope(x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), out.data_ptr(), rows,
                  x.stride(0) if rows > 1 else heads * dim, heads, dim)
    return out


def pin_team(cpus: Sequence[int]) -> list[int]:
    """Binds each thread of the calling thread's OpenMP team (as many as torch.get_num_threads() on
    this thread) to one core: thread i to cpus[i % len(cpus)]. Returns the threads' ids, thread 0 (the
    caller) first. Later kernels and torch ops of this thread run on those threads, so on those cores;
    other threads' teams are not touched. ValueError names a bad core list, OSError a core the
    process may not use."""
    _need_ext()
    try:
        cpus = list(cpus)
    except TypeError:
        raise ValueError(f"cpus must be a non-empty list of core numbers, got {cpus!r}") from None
    if not cpus or any(isinstance(c, bool) or not isinstance(c, int) for c in cpus):
        raise ValueError(f"cpus must be a non-empty list of core numbers, got {cpus!r}")
    return _ext.pin_team(cpus)
