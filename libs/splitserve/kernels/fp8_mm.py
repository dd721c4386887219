"""FP8 projections on GPUs with FP8 tensor cores (compute capability 8.9 and up: Ada, Hopper):
W8A8 through `torch._scaled_mm`, the activations quantized on the fly.

An FP8 weight (an FP8 checkpoint's, or `--quantization fp8`'s) is float8_e4m3fn values with a
float32 scale per tensor or per output channel. Elsewhere `PackedLinear` dequantizes it a tile at a
time and runs a float GEMM (weight-only). Here the GEMM itself runs in FP8:
    s_x = max |x| / 448 over the whole input (a dynamic per-tensor scale, the "dynamic" activation
          scheme of FP8 checkpoints), x_q = x / s_x rounded to e4m3
    y   = (x_q @ W_q^T) * s_x * s_w         accumulated in float32 by the tensor cores
The per-channel weight scales multiply the float32 output columns after the product (a per-tensor
`_scaled_mm` with float32 output is what every FP8-capable build offers). Block-scaled weights
(DeepSeek-style grids) keep the tile path.

`usable` decides per call; SPLITSERVE_FP8_MM=off keeps the tile path (to compare, or to rule this
out). `scaled_linear` itself also runs on a CPU (torch's reference `_scaled_mm`, ~10x slower than
the tile path there), which is how the tests check its arithmetic without a GPU;
benchmarks/gpu_check.py checks it on a device.
"""
from __future__ import annotations

import torch

from splitserve.kernels import switched_on

FP8_MAX = 448.0
MIN_CAPABILITY = (8, 9)
ALIGN = 16  # _scaled_mm's dimensions are multiples of 16


def usable(device: torch.device, weight) -> bool:
    """The FP8 GEMM runs this weight (a packed_quant.Fp8Weight) on this device."""
    if device.type != "cuda" or not switched_on("SPLITSERVE_FP8_MM", "on", "off"):
        return False
    if weight.block is not None:
        return False
    n, k = weight.shape
    return n % ALIGN == 0 and k % ALIGN == 0 and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q float8_e4m3fn [M, K], s_x float32 scalar tensor) of x [M, K] (any float dtype)."""
    xf = x.float()
    amax = xf.abs().amax()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def scaled_linear(x: torch.Tensor, weight) -> torch.Tensor:
    """y = x @ W^T, float32 [M, N], with W an Fp8Weight of per-tensor or per-channel scales."""
    if weight.block is not None:
        raise ValueError("block-scaled FP8 weights run the tile path, not the FP8 GEMM")
    x_q, s_x = quantize_input(x)
    m = x_q.shape[0]
    pad = -m % ALIGN  # rows padded to a multiple of 16 (zeros: their outputs are dropped)
    if pad:
        x_q = torch.cat([x_q, torch.zeros((pad, x_q.shape[1]), dtype=x_q.dtype, device=x_q.device)])
    one = torch.ones((), dtype=torch.float32, device=x.device)
    y = torch._scaled_mm(x_q, weight.weight.t(), scale_a=s_x.reshape(()), scale_b=one, out_dtype=torch.float32)
    y = y[:m]
    return y * weight.scale.reshape(1, -1) if weight.scale.numel() > 1 else y * weight.scale.reshape(())
