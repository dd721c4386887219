"""Kernels: Triton for GPUs, C extensions for CPUs (built by `pip install`, each optional)."""
from __future__ import annotations

import os


def ext_ready(ext) -> bool:
    """A C extension module was importable and this CPU has what it was compiled for (its `supported`:
    AVX2 and FMA on x86)."""
    return ext is not None and bool(ext.supported)


def switched_on(variable: str, on: str, off: str) -> bool:
    """Whether the environment variable (default `on`) leaves a kernel on; ValueError names any
    other value."""
    choice = os.environ.get(variable, on).strip().lower() or on
    if choice not in (on, off):
        raise ValueError(f"{variable}={choice!r}: expected {on} or {off}")
    return choice == on
