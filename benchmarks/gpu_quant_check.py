"""The quantized-checkpoint checks of benchmarks/gpu_check.py (its `quant` section), also runnable
alone: GPTQ, AWQ and FP8 projections on the device against the CPU's, and their timings.

Weights are written from random matrices by the test suite's format writer (tests/hf_quant_writer.py:
round to nearest per group, as the formats describe) and loaded through the loader's own path
(`hf_quant.take_packed`). Checks:
  - GPTQ 4-bit (desc_act, g128; and 8-bit per channel), AWQ 4-bit g128, FP8 per channel and per
    block: the device's `PackedLinear` (a dequantized tile at a time) equals the CPU's within float32
    GEMM rounding;
  - FP8 per tensor and per channel through the FP8 tensor cores where the device has them
    (kernels/fp8_mm.py, capability 8.9+): the product of its quantized operands within the tensor
    cores' accumulation (1e-3 of max|y|), and within 5% (norm) of the weight-only product;
  - timings at 1 and 256 rows of a 4096 x 4096 projection: each layout's path against bf16 F.linear;
  - GPTQ and AWQ through the Triton GEMM (kernels/triton_quant.py) on CUDA against the float64
    product, and its timings against the tile path (`triton_quant_checks`).

    python benchmarks/gpu_quant_check.py                # on cuda
    python benchmarks/gpu_quant_check.py --device cpu   # a dry run of the script itself
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _layouts(w: torch.Tensor) -> dict:
    """name -> (QuantSpec, the module's tensors) for W [N, K]."""
    sys.path.insert(0, str(REPO / "tests"))
    import hf_quant_writer as writer
    from splitserve.model.hf_quant import QuantSpec

    return {
        "gptq-4bit-g128-desc_act": (QuantSpec("gptq", bits=4, group_size=128, zero_offset=1),
                                    writer.gptq(w, 4, 128, sym=False, desc_act=True, v1=True)),
        "gptq-8bit-per-channel": (QuantSpec("gptq", bits=8, group_size=-1, zero_offset=1),
                                  writer.gptq(w, 8, -1, sym=True, desc_act=False, v1=True)),
        "awq-4bit-g128": (QuantSpec("awq", bits=4, group_size=128, zero_offset=0), writer.awq(w, 128)),
        "fp8-per-tensor": (QuantSpec("fp8"), writer.fp8(w, "tensor")),
        "fp8-per-channel": (QuantSpec("fp8"), writer.fp8(w, "channel")),
        "fp8-block-128": (QuantSpec("fp8", block=(128, 128)), writer.fp8(w, "block")),
    }


def _packed(spec, tensors: dict):
    from splitserve.model import hf_quant

    found = {f"layers.0.q_proj.{name}": t for name, t in tensors.items()}
    return hf_quant.take_packed(spec, found, "gpu_quant_check")["layers.0.q_proj.weight"]


def _time(fn, device: str, reps: int = 20) -> float:
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def quant_checks(device: str, check, results: dict, timings: bool = True) -> None:
    from splitserve.kernels import fp8_mm
    from splitserve.kernels.packed_quant import Fp8Weight, PackedLinear

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(384, 512, generator=gen) * 0.05
    x = torch.randn(37, 512, generator=gen)
    for name, (spec, tensors) in _layouts(w).items():
        parts = _packed(spec, tensors)
        on_cpu = PackedLinear(parts)(x)
        layer = PackedLinear(_packed(spec, {k: v.clone() for k, v in tensors.items()}))
        got = layer(x.to(device)).float().cpu()
        part = parts.parts[0]
        tensor_cores = isinstance(part, Fp8Weight) and fp8_mm.usable(torch.device(device), part)
        if tensor_cores:  # W8A8: the product of the quantized operands, near the weight-only one
            x_q, s_x = fp8_mm.quantize_input(x)
            ref = (x_q.double() * s_x.double()) @ part.dequantize().double().t()
            exact_err = float((got.double() - ref).abs().max() / ref.abs().max())
            # Hopper's FP8 tensor cores accumulate with fewer bits than float32: 2.4e-4 of max|ref|
            # on an H200 over K = 512 (a float32 GEMM of the same operands: ~1e-7)
            ok = exact_err <= 1e-3 and float((got - on_cpu).norm() / on_cpu.norm()) <= 0.05
        else:
            exact_err = float((got - on_cpu).abs().max() / on_cpu.abs().max())
            ok = exact_err <= 1e-5
        check(f"quantized projection {name} on {device}", ok, fp8_tensor_cores=tensor_cores,
              max_rel_err=f"{exact_err:.2e}")
    if timings:
        _timings(device, results)
    triton_quant_checks(device, check, results, timings)  # GPTQ / AWQ through the Triton GEMM (CUDA)


def _timings(device: str, results: dict) -> None:
    from splitserve.kernels.packed_quant import PackedLinear

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4096, 4096, generator=gen) * 0.02
    dense = w.to(device=device, dtype=torch.bfloat16)
    layouts = {name: PackedLinear(_packed(*case)) for name, case in _layouts(w).items()
               if name in ("gptq-4bit-g128-desc_act", "awq-4bit-g128", "fp8-per-channel")}
    for rows in (1, 256):
        x = torch.randn(rows, 4096, generator=gen).to(device)
        row = {"bf16_linear_ms": _time(lambda: torch.nn.functional.linear(x.bfloat16(), dense), device)}
        for name, layer in layouts.items():
            row[f"{name}_ms"] = _time(lambda: layer(x), device)
        results.setdefault("timings", {})[f"projection_4096x4096_rows{rows}"] = row
        print(f"4096x4096 projection, {rows} rows: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_quant_check: no CUDA device", file=sys.stderr)
        return 2
    results, failed = {"checks": {}}, []

    def check(name: str, ok: bool, **details) -> None:
        results["checks"][name] = {"ok": bool(ok), **details}
        print(f"[{'PASS' if ok else 'FAIL'}] {name} {json.dumps(details, default=str)}", flush=True)
        if not ok:
            failed.append(name)

    quant_checks(args.device, check, results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"{len(results['checks']) - len(failed)} passed, {len(failed)} failed: {failed}")
    return 1 if failed else 0



def triton_quant_checks(device: str, check, results: dict, timings: bool = True) -> None:
    """The Triton GEMM from GPTQ/AWQ words (kernels/triton_quant.py): within 1e-5 (max relative) of
    the float64 product of the dequantized weight, for float32, float16 and bfloat16 x (the half ones
    against the rounded x); PackedLinear on the device takes it and agrees with its tile path; timings
    of a 4096 x 4096 projection against the tile path and bf16 F.linear. On a CPU it runs only under
    TRITON_INTERPRET=1 (tests/kernels/test_triton_quant.py), without timings."""
    from splitserve.kernels import triton_quant
    from splitserve.kernels.packed_quant import PackedLinear

    if not triton_quant.available() or (not device.startswith("cuda") and not triton_quant._kernel().interpret):
        results["triton_quant"] = "skipped: needs triton and CUDA (or TRITON_INTERPRET=1 on a CPU)"
        print(f"triton quant checks {results['triton_quant']}", flush=True)
        return
    # the interpreter computes a bfloat16 dot from the raw 16-bit words (tests/kernels/test_triton_quant.py)
    dtypes = (torch.float32, torch.float16) + (() if triton_quant._kernel().interpret else (torch.bfloat16,))
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(384, 512, generator=gen) * 0.05
    x = torch.randn(37, 512, generator=gen)
    names = ("gptq-4bit-g128-desc_act", "gptq-8bit-per-channel", "awq-4bit-g128")
    for name, (spec, tensors) in ((n, c) for n, c in _layouts(w).items() if n in names):
        part = _packed(spec, tensors).parts[0]
        wt = part.dequantize().double().t()
        on_device = part.to(torch.device(device))
        errors = {}
        for dtype in dtypes:
            xd = x.to(dtype)
            ref = xd.double() @ wt
            got = triton_quant.packed_matmul(xd.to(device), on_device).double().cpu()
            errors[str(dtype).removeprefix("torch.")] = float((got - ref).abs().max() / ref.abs().max())
        layer = PackedLinear(_packed(spec, {k: v.clone() for k, v in tensors.items()}))
        taken = triton_quant.usable(torch.device(device))
        through_layer = layer(x.to(device)).double().cpu()
        errors["packed_linear"] = float((through_layer - x.double() @ wt).abs().max() / (x.double() @ wt).abs().max())
        check(f"triton packed matmul {name} on {device}", max(errors.values()) <= 1e-5,
              packed_linear_takes_triton=taken, **{k: f"{v:.2e}" for k, v in errors.items()})
    if timings and device.startswith("cuda"):
        _triton_timings(device, results)


def _triton_timings(device: str, results: dict) -> None:
    import os

    from splitserve.kernels import triton_quant
    from splitserve.kernels.packed_quant import PackedLinear

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4096, 4096, generator=gen) * 0.02
    dense = w.to(device=device, dtype=torch.bfloat16)
    for name, case in _layouts(w).items():
        if name not in ("gptq-4bit-g128-desc_act", "gptq-8bit-per-channel", "awq-4bit-g128"):
            continue
        layer = PackedLinear(_packed(*case))
        layer(torch.zeros(1, 4096, device=device))  # moves the packed tensors to the device
        part = layer.weight_parts.parts[0]
        for rows in (1, 16, 256):
            x = torch.randn(rows, 4096, generator=gen).to(device)
            xh = x.half()
            row = {"bf16_linear_ms": _time(lambda x=x: torch.nn.functional.linear(x.bfloat16(), dense), device),
                   "triton_fp32_x_ms": _time(lambda x=x, w=part: triton_quant.packed_matmul(x, w), device),
                   "triton_fp16_x_ms": _time(lambda x=xh, w=part: triton_quant.packed_matmul(x, w), device)}
            saved = os.environ.get("SPLITSERVE_TRITON_QUANT")
            os.environ["SPLITSERVE_TRITON_QUANT"] = "off"  # PackedLinear's tile path, for the comparison
            try:
                row["tile_path_ms"] = _time(lambda x=x, layer=layer: layer(x), device)
            finally:
                os.environ.pop("SPLITSERVE_TRITON_QUANT")
                if saved is not None:
                    os.environ["SPLITSERVE_TRITON_QUANT"] = saved
            row["speedup_fp16_x_over_tiles"] = row["tile_path_ms"] / row["triton_fp16_x_ms"]
            results.setdefault("timings", {})[f"triton_{name}_4096x4096_rows{rows}"] = row
            print(f"triton {name} 4096x4096, {rows} rows: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
