"""A fused projection whose GGUF parts come in different block formats: a Q4_K_M file's attn_v
in Q6_K beside attn_q and attn_k in Q4_K (llama.cpp gives V more bits), or a Q4_0 file's Q8_0
attn_v. The parts cannot stack into one block matrix, so each stays its own blocks (`QuantParts`)
and `QuantPartsLinear` runs one `CpuLinear` a part on the same input, side by side in the output.
Every output element is its own part's dot product, so a row's values are those of the parts run
alone, and no float copy of the projection is ever made (the alternative, dequantizing the fused
weight for the float32 GEMM, held 4 bytes a weight)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from splitserve.kernels import cpu_quant


@dataclass(frozen=True)
class QuantParts:
    """GGUF block matrices stacked by output rows, each in its own format; they share the input."""

    parts: tuple[cpu_quant.QuantWeight, ...]

    def __post_init__(self) -> None:
        if not self.parts or len({p.shape[1] for p in self.parts}) != 1:
            raise ValueError(f"fused parts must share their input features, got {[p.shape for p in self.parts]}")

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]


def fuse(found: list[tuple[str, np.ndarray]]) -> cpu_quant.QuantWeight | QuantParts:
    """The (kind, raw rows) parts of a fused projection: one block matrix when they share a format
    (raw rows of one format stack), else `QuantParts`."""
    if len({kind for kind, _ in found}) == 1:
        return cpu_quant.QuantWeight.from_gguf(found[0][0], np.concatenate([raw for _, raw in found]))
    return QuantParts(tuple(cpu_quant.QuantWeight.from_gguf(kind, raw) for kind, raw in found))


class QuantPartsLinear(nn.Module):
    """y = x @ W^T (+ bias) for a `QuantParts` W: a `CpuLinear` a part (few rows by the block
    kernel, more by the tiled GEMM, or the int8 path: `LlamaModel.set_quantized_matmul` reaches
    them as any CpuLinear), outputs concatenated."""

    backend = "quant_parts"  # not "quant": the one-call decode step (cpu_layers) takes one format a projection

    def __init__(self, weight: QuantParts, bias: torch.Tensor | None = None) -> None:
        from splitserve.model.llama import CpuLinear  # llama imports this module

        super().__init__()
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; the weight has {self.out_features} outputs")
        self.parts = nn.ModuleList()
        start = 0
        for part in weight.parts:
            rows = part.shape[0]
            self.parts.append(CpuLinear(None, None if bias is None else bias[start:start + rows], torch.float32, part))
            start += rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)
