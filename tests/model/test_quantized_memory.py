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
                           | {"norm.weight", "rotary.cos", "rotary.sin"})
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
# default model at float32: importing torch alone holds 218 MiB; after load 358 MiB (1,090 MiB while
# every weight had a float32 copy), with a peak of 389-394 MiB during load (1,491 MiB before). What
# torch itself holds differs between machines (277 MiB on another), so only the model's share of
# the RSS is bounded.
MODEL_RSS_MIB = 170  # the model's part of the RSS after load (~140 measured)
LOAD_PEAK_MIB = 210  # the load's part of the peak over torch's own (~171-176 measured)


@needs_kernel
def test_rss_after_loading_the_default_model_at_float32():
    out = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    torch_rss, loaded = report["torch"]["VmRSS"], report["loaded"]
    assert report["backends"] == ["quant"], report
    assert loaded["VmRSS"] - torch_rss < MODEL_RSS_MIB, report
    assert loaded["VmHWM"] - torch_rss < LOAD_PEAK_MIB, report


def _retyped_gguf(src, dst, retype: dict, untie_as=None, rename: dict | None = None) -> None:
    """A copy of the GGUF file `src` with the tensors named in `retype` re-quantized to the given
    type (from GGUF's own float32 values; F16 as float16; the K-quants, which the `gguf` package
    does not quantize, by tests/kernels/test_cpu_kquant.quantize_k), and with `untie_as` a type, an
    `output.weight` (an untied LM head) made of the embedding's values in it: the metadata bytes
    unchanged but the tensor count, tensor infos and data rewritten (layout in model/gguf_file.py).
    `rename` maps a tensor's name in `src` to the one written (a malformed file: shapes swapped)."""
    import struct

    import gguf
    import numpy as np

    from splitserve.model.gguf_file import GGUFFile, _Cursor
    from tests.kernels.test_cpu_kquant import K_KINDS, quantize_k

    src_file = GGUFFile(src)
    cur = _Cursor(memoryview(src_file._map), str(src))
    cur.pos = 4 + 4 + 8 + 8  # magic, version, tensor and metadata counts
    for _ in range(len(src_file.fields)):
        cur.string()
        cur.value(cur.take("<I"))
    align = int(src_file.fields.get("general.alignment", 32))
    tensors = [(t.name, t) for t in src_file.tensors]
    if untie_as is not None:
        embedding = next(t for t in src_file.tensors if t.name == "token_embd.weight")
        tensors.append(("output.weight", embedding))
        retype = {**retype, "output.weight": untie_as}
    infos, blobs, offset = [], [], 0
    for tensor_name, t in tensors:
        kind, data = t.tensor_type, np.asarray(t.data)
        if tensor_name in retype:
            kind = retype[tensor_name]
            values = np.asarray(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32)
            if kind == gguf.GGMLQuantizationType.F16:
                data = values.astype(np.float16)
            else:
                data = quantize_k(values, kind.name) if kind.name in K_KINDS else gguf.quants.quantize(values, kind)
        name = (rename or {}).get(tensor_name, tensor_name).encode()
        infos.append(struct.pack(f"<Q{len(name)}sI{len(t.shape)}QIQ", len(name), name, len(t.shape), *t.shape,
                                 int(kind), offset))
        blob = data.tobytes()
        blobs.append(blob + b"\0" * (-len(blob) % align))
        offset += len(blobs[-1])
    head = bytearray(src_file._map[:cur.pos])
    head[8:16] = struct.pack("<Q", len(tensors))  # after the magic and version
    head = bytes(head) + b"".join(infos)
    with open(dst, "wb") as out:
        out.write(head + b"\0" * (-len(head) % align))
        for blob in blobs:
            out.write(blob)


@needs_kernel
def test_a_mix_of_formats_loads_and_answers_as_its_float32_copies(llm_f32, tmp_path, monkeypatch):
    """The default model re-quantized in parts: a Q4_0 embedding and layer 1, an untied Q4_1 LM
    head, a Q8_0 q_proj beside Q4_1 k/v (a fused qkv of mixed formats: a part a format, model/
    quant_parts.py), an F16 down_proj (dequantized: the float GEMM runs it). Held as blocks where it can be, it answers as the same file loaded
    with float32 copies everywhere (SPLITSERVE_CPU_QUANT=off)."""
    import gguf

    from splitserve import SamplingParams
    from splitserve.model.loader import load_model

    Q = gguf.GGMLQuantizationType
    retype = {"token_embd.weight": Q.Q4_0, "blk.0.attn_q.weight": Q.Q8_0, "blk.2.ffn_down.weight": Q.F16}
    retype |= {f"blk.1.{p}.weight": Q.Q4_0 for p in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                      "ffn_gate", "ffn_up", "ffn_down")}
    path = tmp_path / "mixed.gguf"
    _retyped_gguf(llm_f32.engine.model_path, path, retype, untie_as=Q.Q4_1)
    blocks, _ = load_model(str(path), "float32", "cpu")
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT", "off")
    copies, _ = load_model(str(path), "float32", "cpu")
    kinds = {name: (m.backend, m.quant.kind if m.quant is not None else None)
             for name, m in blocks.named_modules() if isinstance(m, CpuLinear)}
    assert not blocks.args.tie_word_embeddings and blocks.embed_tokens.quant.kind == "Q4_0"
    assert kinds["lm_head"] == ("quant", "Q4_1")
    assert [kinds[f"layers.0.self_attn.qkv_proj.parts.{i}"] for i in range(3)] == \
        [("quant", "Q8_0"), ("quant", "Q4_1"), ("quant", "Q4_1")]
    assert kinds["layers.0.mlp.gate_up_proj"] == ("quant", "Q4_1")
    assert {kinds[f"layers.1.{p}"] for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                              "mlp.down_proj")} == {("quant", "Q4_0")}
    assert kinds["layers.2.mlp.down_proj"] == ("onednn", None)
    assert {m.backend for m in copies.modules() if isinstance(m, CpuLinear)} == {"onednn"}
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    prompt = llm_f32.tokenizer.encode("The capital of France is")
    answers = []
    for model in (blocks, copies):  # the session's tokenizer and a small cache, this model's weights
        llm = llm_f32.with_config(kv_cache_memory_gb=0.01, enable_prefix_caching=False)
        llm.engine.model = llm.engine.runner.model = model
        answers.append(llm.generate([prompt], params)[0])
    assert answers[0].token_ids == answers[1].token_ids
    for a, b in zip(answers[0].logprobs, answers[1].logprobs):
        assert abs(a.logprob - b.logprob) < 1e-3
