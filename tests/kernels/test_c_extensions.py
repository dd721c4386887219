"""What the three C extensions share: each is built here, and each has an environment switch that
turns it off and refuses any other value, naming the variable."""
from __future__ import annotations

import platform

import pytest

from splitserve.kernels import cpu_attention, cpu_ops, cpu_quant

X86 = platform.machine() in ("x86_64", "AMD64", "i686")

# module, its extension's import name, the switch variable, its off value
EXTENSIONS = [
    (cpu_attention, "_cpu_attention", "SPLITSERVE_CPU_ATTENTION", "torch"),
    (cpu_ops, "_cpu_ops", "SPLITSERVE_CPU_OPS", "torch"),
    (cpu_quant, "_cpu_quant", "SPLITSERVE_CPU_QUANT", "off"),
]
IDS = [ext for _, ext, _, _ in EXTENSIONS]


@pytest.mark.parametrize("module,ext,variable,off", EXTENSIONS, ids=IDS)
def test_built_here(module, ext, variable, off):
    """The editable install compiles them; on x86 with AVX2 (this machine) each must be there and
    used, or CPU models silently take the slower torch path."""
    if X86:
        assert module.built(), f"splitserve.kernels.{ext} is missing: run `make install`"
    assert module.available() == module.built()


@pytest.mark.parametrize("module,ext,variable,off", EXTENSIONS, ids=IDS)
def test_the_switch(monkeypatch, module, ext, variable, off):
    monkeypatch.setenv(variable, off)
    assert not module.available()
    monkeypatch.setenv(variable, "fast")
    with pytest.raises(ValueError, match=f"{variable}='fast': expected kernel or {off}"):
        module.available()


def test_the_quantized_row_limit(monkeypatch):
    monkeypatch.delenv("SPLITSERVE_CPU_QUANT_ROWS", raising=False)
    assert cpu_quant.max_rows() == cpu_quant.DEFAULT_MAX_ROWS
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_ROWS", "8")
    assert cpu_quant.max_rows() == 8
    for bad in ("-1", "many"):
        monkeypatch.setenv("SPLITSERVE_CPU_QUANT_ROWS", bad)
        with pytest.raises(ValueError, match="SPLITSERVE_CPU_QUANT_ROWS"):
            cpu_quant.max_rows()
