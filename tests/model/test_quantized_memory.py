"""A quantized GGUF loaded at float32 holds its quantized weights only as their blocks (issue 19):
no float copy of the embedding, a projection or the LM head exists after load, and the process's
memory shows it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from splitserve.kernels import cpu_quant
from splitserve.kernels.cpu_quant import QuantWeight
from splitserve.model.llama import CpuLinear, QuantEmbedding

needs_kernel = pytest.mark.skipif(not cpu_quant.available(), reason="the quantized kernel is not built for this CPU")


def _held_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model holds: parameters, buffers, and tensors kept as plain attributes of its
    modules (oneDNN-packed weights) or inside their `QuantWeight`s, by a dotted name."""
    held = {}
    for prefix, module in model.named_modules():
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers"):
                items = value.items()
            elif isinstance(value, QuantWeight):
                items = [(f"{name}.packed", value.packed)]
            else:
                items = [(name, value)]
            for key, t in items:
                if isinstance(t, torch.Tensor):
                    held[f"{prefix}.{key}" if prefix else key] = t
    return held


@needs_kernel
def test_no_float_copy_of_a_quantized_weight_after_load(llm_f32):
    model = llm_f32.engine.model
    args = model.args
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.embed_tokens.quant.kind == "Q8_0"
    linears = {name: m for name, m in model.named_modules() if isinstance(m, CpuLinear)}
    assert len(linears) == 4 * args.num_layers + 1
    assert {m.backend for m in linears.values()} == {"quant"}
    assert linears["lm_head"].quant is model.embed_tokens.quant  # the tied head: one copy of the blocks
    held = _held_tensors(model)
    # the float tensors left are the norms' weights and the RoPE tables
    floats = {name: t for name, t in held.items() if t.is_floating_point()}
    assert set(floats) == ({f"layers.{i}.{norm}.weight" for i in range(args.num_layers)
                            for norm in ("input_layernorm", "post_attention_layernorm")}
                           | {"norm.weight", "rotary.cos", "rotary.sin", "rotary.signed_sin"})
    quantized_sizes = {m.quant.out_features * m.quant.in_features for m in linears.values()}
    quantized_sizes |= {args.vocab_size * args.hidden_size, args.intermediate_size * args.hidden_size,
                        args.num_heads * args.head_dim * args.hidden_size}  # the unfused parts too
    assert not [name for name, t in floats.items() if t.numel() in quantized_sizes]
    assert sum(t.numel() for name, t in floats.items() if not name.startswith("rotary.")) == \
        (2 * args.num_layers + 1) * args.hidden_size
    # the blocks themselves: 4.5 bits a weight as Q4_1 (the projections), 8.5 as Q8_0 (embedding)
    blocks = {t.data_ptr(): t.numel() for name, t in held.items() if name.endswith("quant.packed")}
    assert sum(blocks.values()) < 120 * 2**20


RSS_PROBE = """
import json, sys
def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields
import torch
torch_only = status()
from splitserve.model.loader import load_model
model, _ = load_model(None, "float32", "cpu")
print(json.dumps({"torch": torch_only, "loaded": status(), "backends": sorted({
    getattr(m, "backend", "") for m in model.modules()} - {""})}))
"""

# Measured on this 2-core VM (torch 2.13 CPU build), a process that imports torch and loads the
# default model at float32: importing torch alone holds 218 MiB; after load 357 MiB (1,090 MiB while
# every weight had a float32 copy), with a peak of 450 MiB during load (1,491 MiB before).
MODEL_RSS_MIB = 170  # the model's part of the RSS after load (~140 measured)
LOAD_PEAK_MIB = 270  # the load's part of the peak over torch's own (~232 measured)


@needs_kernel
def test_rss_after_loading_the_default_model_at_float32():
    out = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    torch_rss, loaded = report["torch"]["VmRSS"], report["loaded"]
    assert report["backends"] == ["quant"], report
    assert loaded["VmRSS"] - torch_rss < MODEL_RSS_MIB, report
    assert loaded["VmHWM"] - torch_rss < LOAD_PEAK_MIB, report
    assert loaded["VmRSS"] < 400, report  # the target for a worker less its KV pool
