"""The Triton GEMM from GPTQ/AWQ packed words (kernels/triton_quant.py) against float64 products of
the format writer's reference dequantization, on the CPU through triton's interpreter.

Tolerance: the kernel accumulates in float32 (x in float32, or float16 against the exact integer
matrix), the reference in float64: |y - ref| <= 1e-5 * max |ref| + 1e-5 * |ref| (K = 256 terms).
Weights come through the loader's own path (`hf_quant.take_packed`), as a checkpoint's would.
What the interpreter cannot show: the GPU's dot precisions (it ignores tf32x3 and computes every dot
with numpy), the block sizes' fit to a GPU's registers, and speed; benchmarks/gpu_quant_check.py's
`triton_quant_checks` covers those on a device.
"""
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernel (at its first call)

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from hf_quant_writer import awq, awq_reference, gptq, gptq_reference
from splitserve.kernels import triton_quant
from splitserve.kernels.packed_quant import GroupQuantWeight, PackedLinear
from splitserve.model import hf_quant

N, K = 64, 256


def _weight(spec: hf_quant.QuantSpec, tensors: dict) -> GroupQuantWeight:
    found = {f"layers.0.q_proj.{name}": t for name, t in tensors.items()}
    return hf_quant.take_packed(spec, found, "test")["layers.0.q_proj.weight"].parts[0]


def _assert_close(y: torch.Tensor, x: torch.Tensor, reference: np.ndarray) -> None:
    ref = x.double().numpy() @ reference.T
    assert y.dtype == torch.float32 and tuple(y.shape) == ref.shape
    err = np.abs(y.numpy() - ref)
    bound = 1e-5 * np.abs(ref).max() + 1e-5 * np.abs(ref)
    print(f"max abs diff {err.max():.3e} (max |ref| {np.abs(ref).max():.3e})")
    assert np.all(err <= bound), f"max abs diff {err.max()}, worst ratio {(err / bound).max()}"


GPTQ_CASES = [  # bits, group_size, sym, desc_act, v1, k
    (4, 128, False, False, True, K), (4, 32, True, False, False, K), (4, 64, False, True, True, K),
    (4, -1, False, False, True, K), (8, 128, False, True, False, K), (8, 64, False, False, True, K),
    (8, -1, True, False, False, K), (2, 32, False, False, False, K),
    (4, 96, False, False, True, 224),  # K not a multiple of the group: the last group partial (g_idx)
    (4, -1, False, False, False, 200),  # per channel, K not a multiple of the K step (gathered groups)
]


@pytest.mark.parametrize("bits,group_size,sym,desc_act,v1,k", GPTQ_CASES)
@pytest.mark.parametrize("m", [1, 5])
def test_gptq_product_matches_float64(bits, group_size, sym, desc_act, v1, k, m):
    torch.manual_seed(bits * 100 + abs(group_size) + k)
    w = torch.randn(N, k)
    tensors = gptq(w, bits, group_size, sym, desc_act, v1, seed=abs(group_size))
    weight = _weight(hf_quant.QuantSpec("gptq", bits, group_size, 1 if v1 else 0), tensors)
    assert (weight.g_idx is not None) == (desc_act or (group_size > 0 and k % group_size != 0))
    x = torch.randn(m, k)
    _assert_close(triton_quant.packed_matmul(x, weight), x, gptq_reference(tensors, bits, v1))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 5])
def test_awq_product_matches_float64(group_size, m):
    torch.manual_seed(group_size + m)
    w = torch.randn(N, K)
    tensors = awq(w, group_size)
    weight = _weight(hf_quant.QuantSpec("awq", 4, group_size), tensors)
    x = torch.randn(m, K)
    _assert_close(triton_quant.packed_matmul(x, weight), x, awq_reference(tensors, group_size))


BF16_DOT = pytest.mark.xfail(strict=True, reason="triton 3.9's interpreter runs a bfloat16 tl.dot as numpy's "
                             "matmul of the raw 16-bit words (garbage); a GPU's dot is right")


@pytest.mark.parametrize("layout,dtype", [
    ("gptq-desc_act", torch.float16), ("gptq", torch.float16), ("awq", torch.float16),
    ("gptq-desc_act", torch.bfloat16),  # gathered groups: x widened to float32 before its dot
    pytest.param("gptq", torch.bfloat16, marks=BF16_DOT), pytest.param("awq", torch.bfloat16, marks=BF16_DOT)])
def test_half_inputs_and_many_rows(layout, dtype):
    """float16/bfloat16 x (against the integer matrix in x's dtype, exact) and rows past one BLOCK_M
    (70: two tiles of 64, the second partial); N not a multiple of BLOCK_N (72)."""
    torch.manual_seed(7)
    n = 72
    w = torch.randn(n, K)
    if layout == "awq":
        tensors, spec = awq(w, 64), hf_quant.QuantSpec("awq", 4, 64)
        reference = awq_reference(tensors, 64)
    else:
        tensors = gptq(w, 4, 64, False, layout == "gptq-desc_act", True, seed=3)
        spec, reference = hf_quant.QuantSpec("gptq", 4, 64, 1), gptq_reference(tensors, 4, True)
    weight = _weight(spec, tensors)
    x = torch.randn(70, K).to(dtype)
    _assert_close(triton_quant.packed_matmul(x, weight), x.float(), reference)
    xs = torch.randn(3, 2 * K)[:, ::2]  # a strided x (the kernel reads rows by their stride)
    _assert_close(triton_quant.packed_matmul(xs, weight), xs, reference)


def test_packed_linear_takes_the_kernel_only_on_cuda(monkeypatch):
    """PackedLinear's switch: CUDA and the variable on; the tile path (same values) elsewhere."""
    assert not triton_quant.usable(torch.device("cpu"))
    monkeypatch.setenv("SPLITSERVE_TRITON_QUANT", "off")
    assert not triton_quant.usable(torch.device("cuda"))
    monkeypatch.setenv("SPLITSERVE_TRITON_QUANT", "maybe")
    with pytest.raises(ValueError, match="SPLITSERVE_TRITON_QUANT"):
        triton_quant.usable(torch.device("cuda"))
    monkeypatch.delenv("SPLITSERVE_TRITON_QUANT")
    assert triton_quant.usable(torch.device("cuda")) == triton_quant.available()
    torch.manual_seed(2)
    tensors = gptq(torch.randn(N, K), 4, 128, False, True, True)
    parts = hf_quant.take_packed(hf_quant.QuantSpec("gptq", 4, 128, 1),
                                 {f"m.{k}": v for k, v in tensors.items()}, "test")["m.weight"]
    x = torch.randn(5, K)
    tiles = PackedLinear(parts)(x)  # the CPU: tiles
    assert torch.allclose(triton_quant.packed_matmul(x, parts.parts[0]), tiles, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem():
    torch.manual_seed(0)
    weight = _weight(hf_quant.QuantSpec("awq", 4, 64), awq(torch.randn(N, K), 64))
    with pytest.raises(ValueError, match=r"x \(5, 128\) must be \[M, 256\]"):
        triton_quant.packed_matmul(torch.randn(5, 128), weight)
    assert triton_quant.packed_matmul(torch.randn(0, K), weight).shape == (0, N)



COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from splitserve.kernels import triton_quant

fn = triton_quant._kernel().fn  # the JITFunction PackedLinear launches
assert not triton_quant._kernel().interpret
pointers = {"x_ptr": "*fp32", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp32", "g_ptr": "*i64", "y_ptr": "*fp32"}
for awq, gidx, one_group, x_type, bits in [
        (False, False, True, "*fp32", 4), (True, False, True, "*fp32", 4), (False, True, False, "*fp32", 4),
        (False, False, True, "*fp16", 8), (True, False, True, "*bf16", 4), (False, False, False, "*fp16", 4),
        (False, True, False, "*bf16", 8), (False, False, True, "*fp32", 2)]:
    const = dict(BITS=bits, AWQ=awq, HAS_GIDX=gidx, ONE_GROUP=one_group, HALF=x_type != "*fp32",
                 PRECISION="tf32x3", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
    signature = {name: "constexpr" if name in const else pointers.get(name, "i32") for name in fn.arg_names}
    signature["x_ptr"] = x_type
    compiled = triton.compile(ASTSource(fn, signature, const), target=GPUTarget("cuda", int(sys.argv[1]), 32))
    print(len(compiled.asm["cubin"]), "mma" in compiled.asm["ptx"], const)
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_for_a_gpu_without_one(arch):
    """The interpreter runs the kernel as Python, so it cannot see what only the compiler rejects
    (types across branches and loop iterations, dot shapes): compile every specialization to a cubin
    for sm_80 and sm_90 with triton's own ptxas, in a process without TRITON_INTERPRET (which would
    hand the compiler interpreted functions); the PTX must use the tensor cores (mma)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE, str(arch)], check=False, env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode and "ptxas" in run.stderr.lower() and "not found" in run.stderr.lower():
        pytest.skip(f"this triton install cannot assemble: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 8 and all(line.split()[1] == "True" and int(line.split()[0]) > 0 for line in lines), lines


def test_the_gpu_checks_pass_as_an_interpreted_dry_run():
    """benchmarks/gpu_quant_check.py's `triton_quant_checks` (its device checks of this kernel) runs
    here through the interpreter, so the script is known to run on the day a GPU is lent."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_quant_check.py"
    spec = importlib.util.spec_from_file_location("gpu_quant_check_triton", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []
    module.triton_quant_checks("cpu", lambda name, ok, **details: seen.append((name, ok, details)), {}, timings=False)
    assert len(seen) == 3 and all(ok for _, ok, _ in seen), seen
    assert all(set(d) == {"packed_linear_takes_triton", "float32", "float16", "packed_linear"} for _, _, d in seen)
    assert not any(d["packed_linear_takes_triton"] for _, _, d in seen)  # a CPU keeps the tiles
