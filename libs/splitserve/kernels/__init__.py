"""Kernels: Triton for GPUs, C extensions for CPUs (built by `pip install`, each optional)."""
from __future__ import annotations

from splitserve.config import env


def ext_ready(ext) -> bool:
    """A C extension module was importable and this CPU has what it was compiled for (its `supported`:
    AVX2 and FMA on x86)."""
    return ext is not None and bool(ext.supported)


def switched_on(variable: str, on: str, off: str) -> bool:
    """Whether the registered environment variable (config/env.py; its choices are `on` and `off`)
    leaves a kernel on; ValueError names the variable on any other value."""
    choices = env.REGISTRY[variable].choices
    if set(choices) != {on, off}:
        raise ValueError(f"{variable}: registered with choices {choices}, asked for {on} or {off}")
    return env.read(variable) == on
