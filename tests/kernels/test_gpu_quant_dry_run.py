"""benchmarks/gpu_quant_check.py (the `quant` section of gpu_check.py) runs its checks on the CPU as
a dry run: the script itself stays runnable for the day a GPU is lent, and every layout passes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_quant_check.py"


def test_the_quantized_checks_pass_as_a_cpu_dry_run():
    spec = importlib.util.spec_from_file_location("gpu_quant_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results, seen = {}, []
    module.quant_checks("cpu", lambda name, ok, **details: seen.append((name, ok, details)), results, timings=False)
    # six layouts, then (under the tests' TRITON_INTERPRET=1) the Triton GEMM's three
    assert len(seen) in (6, 9) and all(ok for _, ok, _ in seen), seen
    assert not any(details["fp8_tensor_cores"] for _, _, details in seen[:6])  # no FP8 tensor cores on a CPU
