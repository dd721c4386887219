"""Llama-family decoder (Llama, SmolLM, Mistral, Qwen2) over the paged KV cache.

Numerics follow HF transformers' Llama so that float32 outputs agree token for token: RMSNorm in
float32, rotate-half RoPE with cos/sin computed in float32 from the checkpoint's theta and scaling.
The forward pass works on a flat run of tokens `[T]` (all sequences of a step concatenated); the
attention layer is the only place where sequences are told apart (through `AttentionMetadata`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.config import env
from splitserve.model.attention import AttentionMetadata, paged_attention
from splitserve.kernels import cpu_ops, cpu_quant, packed_quant
from splitserve.kernels.cpu_layers import FusedDecode
from splitserve.model import quant_parts


@dataclass(frozen=True)
class ModelArgs:
    """Architecture hyper-parameters, read from GGUF metadata or a config.json."""

    architecture: str  # "llama", "mistral", "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    rope_scaling: dict = field(default_factory=dict)  # HF `rope_scaling` ({} = none)
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )


def rope_inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the attention scaling of cos/sin."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = dict(args.rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "freq_factors":  # GGUF llama 3.x: the scaled frequencies are shipped as divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32), 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, freq_factors)")


class RotaryEmbedding(nn.Module):
    def __init__(self, args: ModelArgs, max_positions: int) -> None:
        super().__init__()
        # computed on the CPU even while the model is built on the meta device (the loader's)
        with torch.device("cpu"):
            self._build(args, max_positions)

    def _build(self, args: ModelArgs, max_positions: int) -> None:
        inv_freq, attention_scaling = rope_inv_freq(args)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # [max_positions, head_dim // 2]
        # HF's cos and sin are those of cat(freqs, freqs): two equal halves, so one is kept ([P,
        # head_dim // 2] each, 2 MiB at 8K positions of 64 instead of 4) and `lookup` doubles the
        # rows it takes. The same bits: cos and sin are elementwise.
        self.register_buffer("cos", freqs.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_scaling, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of each token's position: [T, 1, head_dim] in `dtype` (once per step,
        not per layer). The signed sin is HF's sin with its first half negated, what `apply_rope`
        multiplies by (negation is exact, in float32 and after rounding to any dtype)."""
        cos, sin = self.cos[positions].to(dtype), self.sin[positions].to(dtype)
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half RoPE, x * cos + rotate_half(x) * sin, with the same bits in fewer ops:
    rotate_half(x) = cat(-x2, x1) is x rolled by half with the sign moved onto the sin (negation
    is exact), so each layer runs 4 ops on its q/k instead of 7.
    x: [T, n, head_dim] (q and k heads together); cos, signed_sin: [T, 1, head_dim]."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused_ops = False  # float32 on the CPU: kernels.cpu_ops (LlamaModel.use_cpu_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops and x.is_contiguous():  # one pass instead of six kernels
            return cpu_ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and x.device.type == "cpu":
            # one op instead of eight, the same bits on the CPU (tests/test_model_parts.py)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        # Fused q, k, v projection: weight [q_size + 2 * kv_size, hidden]
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.scale = args.head_dim**-0.5
        self.fused_ops = False  # float32 on the CPU: RoPE in kernels.cpu_ops (the same bits)

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden]; rope: (cos, sin) [T, 1, head_dim]
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = cpu_ops.rope(qk, *rope) if self.fused_ops else apply_rope(qk, *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, *kv_cache[:2], meta, self.scale, *kv_cache[2:])  # [T, heads, head_dim]
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        # Fused gate and up projections: weight [2 * intermediate, hidden]
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.fused_ops = False  # float32 on the CPU: SiLU-and-multiply in kernels.cpu_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused_ops:
            return self.down_proj(cpu_ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, rope, kv_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, max_positions: int) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary = RotaryEmbedding(args, max_positions)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.fused_decode: FusedDecode | None = None  # decode steps in one C call (use_cpu_kernels)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V) pages
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden] final-normed hidden states (of meta.output_rows' rows, when it is set)
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        if self.fused_decode is not None and self.fused_decode.accepts(x.shape[0], kv_caches, meta):
            return self.norm(self.fused_decode.run(x, rope, kv_caches, meta))  # the same bits as the loop
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, rope, kv, meta)
        return self.norm(x)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of activations (the final norm's weight: float in every layout of the weights)."""
        return self.norm.weight.dtype

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden [N, hidden] -> [N, vocab] f32
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def hold_blocks(self, blocks: dict[str, "cpu_quant.QuantWeight"]) -> None:
        """Swaps the modules whose weights the loader kept as GGUF blocks for ones that compute from
        the blocks alone (float32 on the CPU): `QuantEmbedding` for `embed_tokens.weight`,
        `CpuLinear` for a projection (fused names: `layers.N.self_attn.qkv_proj.weight`, ...) and for
        `lm_head.weight` (the tied LM head is the embedding's own `QuantWeight`, one copy). Called
        before the weights are moved: the swapped modules' float weights were never made (meta)."""
        for prefix, module in list(self.named_modules()):
            for name, child in list(module.named_children()):
                quant = blocks.get(f"{prefix}.{name}.weight" if prefix else f"{name}.weight")
                if quant is not None and isinstance(child, nn.Linear):
                    bias = None if child.bias is None else child.bias.detach()
                    # an HF checkpoint's GPTQ / AWQ / FP8 tensors: computed by tiles from them
                    if isinstance(quant, packed_quant.PackedParts):
                        setattr(module, name, packed_quant.PackedLinear(quant, bias))
                    elif isinstance(quant, quant_parts.QuantParts):  # a part a block format
                        setattr(module, name, quant_parts.QuantPartsLinear(quant, bias))
                    else:
                        setattr(module, name, CpuLinear(None, bias, torch.float32, quant))
        if "embed_tokens.weight" in blocks:
            self.embed_tokens = QuantEmbedding(blocks["embed_tokens.weight"])
        if "lm_head.weight" in blocks and self.lm_head is None:  # tied: the embedding's blocks
            self.lm_head = CpuLinear(None, None, torch.float32, blocks["lm_head.weight"])

    def use_cpu_kernels(self, compute_dtype: torch.dtype) -> None:
        """CPU: swaps every remaining projection for a `CpuLinear` (and unties the LM head); in
        float32, runs RMSNorm, SiLU-and-multiply and RoPE in `kernels.cpu_ops` where it is built."""
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, CpuLinear(child.weight, child.bias, compute_dtype))
        if self.lm_head is None:  # tied: the embedding's weight (or its blocks)
            quant = self.embed_tokens.quant if isinstance(self.embed_tokens, QuantEmbedding) else None
            self.lm_head = CpuLinear(None if quant else self.embed_tokens.weight, None, compute_dtype, quant)
        fused = compute_dtype == torch.float32 and cpu_ops.available()
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.fused_ops = fused
        self.fused_decode = FusedDecode(self) if FusedDecode.supported(self) else None

    def set_quantized_matmul(self, mode: str) -> None:
        """How projections held as GGUF blocks multiply: "exact" (float arithmetic on the dequantized
        weights, HF's values; few rows by the block kernel, more by the tiled float GEMM) or "int8"
        (activations quantized per block of 32, integer dot products, cpu_quant.c, at every row
        count). Models without such projections ignore it."""
        if mode not in ("exact", "int8"):
            raise ValueError(f"quantized_matmul must be 'exact' or 'int8' here, got {mode!r}")
        self.int8_copy = None  # the int8 kernel's copy that runs (SPLITSERVE_CPU_INT8), when int8 does
        if mode == "int8" and any(isinstance(m, CpuLinear) and m.quant is not None for m in self.modules()):
            self.int8_copy = cpu_quant.int8_copy()
        for module in self.modules():
            if isinstance(module, CpuLinear):
                module.int8 = mode == "int8"
        if self.fused_decode is not None:
            self.fused_decode.int8 = mode == "int8"


class QuantEmbedding(nn.Module):
    """The token embedding of a quantized GGUF (float32 on the CPU), held only as its blocks: a
    lookup dequantizes the gathered rows alone (kernels.cpu_quant.embedding), the same float32
    values as the table GGUF's dequantization would give (113 MB for the default model, 30 MB as
    Q8_0 blocks, shared with the tied LM head)."""

    def __init__(self, quant: "cpu_quant.QuantWeight") -> None:
        super().__init__()
        self.quant = quant
        self.num_embeddings, self.embedding_dim = quant.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] int64 -> [T, hidden] float32
        return cpu_quant.embedding(input_ids, self.quant)


class CpuLinear(nn.Module):
    """y = x @ W^T for CPUs, with W laid out once at load time for the GEMM that runs it.

    A quantized GGUF weight in float32 (`quant`, where kernels.cpu_quant is built) is held only as
    its blocks (a fifth of the float32 bytes for Q4_1): up to `quant_rows` rows run the few-row
    kernel on them, more rows (prefill chunks) dequantize a tile of weight rows at a time into a
    reused buffer and run oneDNN's GEMM on it (`cpu_quant.linear_tiled`). Against the pre-packed
    float32 copy this replaces (2-core AMD EPYC VM, docs/performance.md): the default model's 30
    layers at 512 rows take 1.07x its time, and a loaded model holds 358 MiB RSS instead of 1,090.

    Otherwise float32 runs on pre-packed weights, so no call repacks them (plain `torch.mm` hands the BLAS an
    ordinary matrix, which it repacks on every call):
    - "onednn" (the default where torch has it): the weight is reordered into oneDNN's blocked
      layout (`mkldnn._reorder_linear_weight`, the op torch's own CPU compiler uses) and every call
      runs oneDNN's inner-product primitive on it. On a 2-core AMD EPYC VM the 30 layers' projections
      of the default model take 56 ms at 24 rows (a prefix hit) against 85-111 ms with MKL's packed
      GEMM, and 77 against 138 ms at 32 rows (a batch of decodes); 824 against 857 ms at 512 rows.
      MKL splits a skinny GEMM over the threads badly (2 threads were no faster than 1 there).
    - "mkl": MKL's `sgemm_pack` panels (`mkl._mkl_reorder_linear_weight` / `mkl._mkl_linear`).
    Otherwise (bf16/fp16 compute, "plain", or neither library), W is stored transposed, [in, out]
    contiguous: the BLAS's GEMM with a transposed right operand (what F.linear does with the usual
    [out, in] weight) is 2-4x slower for 1-48 rows than a plain row-major one.
    SPLITSERVE_CPU_GEMM=onednn|mkl|plain picks one (to compare, or to rule one out); a backend
    this torch lacks falls back to the next one that it has.
    """

    PACK_ROWS_HINT = 512  # MKL packs for an expected row count; 512 (a prefill chunk) suits 8-512

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 quant: "cpu_quant.QuantWeight | None" = None) -> None:
        """`weight` [out, in] float, or None with `quant` (its blocks). Given both, the blocks are
        kept and the float weight only checked against them, where the blocks can be computed with
        (float32, the kernel built); else the float weight (or the blocks' dequantized values)."""
        super().__init__()
        self.quant = None  # the GGUF blocks, the only copy of W when set (backend "quant")
        self.int8 = False  # few rows by the int8 kernel (LlamaModel.set_quantized_matmul)
        if quant is not None:
            if weight is not None and quant.shape != tuple(weight.shape):
                raise ValueError(f"{quant.kind} weight {quant.shape} does not match the float weight "
                                 f"{tuple(weight.shape)}")
            if compute_dtype == torch.float32 and cpu_quant.available():
                self.quant, self.quant_rows = quant, cpu_quant.max_rows()
            elif weight is None:
                weight = quant.dequantize()
        elif weight is None:
            raise ValueError("CpuLinear needs a weight or its quantized blocks (quant)")
        self.out_features, self.in_features = quant.shape if self.quant is not None else weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; the weight has {self.out_features} outputs")
        self.out_dtype = torch.float32 if self.quant is not None else weight.dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype).contiguous())
        self.backend = "plain"
        self.packed = None  # an opaque (MkldnnCPU) tensor: a plain attribute, outside state_dict() and .to()
        if self.quant is not None:
            self.backend = "quant"
            self.register_buffer("weight_t", None)
            return
        if compute_dtype == torch.float32 and weight.device.type == "cpu":
            self.backend = cpu_gemm_backend()
        if self.backend != "plain":
            w = weight.detach().to(torch.float32).contiguous()
            if self.backend == "onednn":
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            else:
                self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w, self.PACK_ROWS_HINT)
                # The op takes the original weight only for its shape (it would fall back to it for
                # a row count other than the one passed, and we always pass the real one): a
                # zero-stride view of the right shape, no memory.
                self._shape_only = w.new_zeros(1).expand(self.out_features, self.in_features)
            self.register_buffer("weight_t", None)
        else:
            self.register_buffer("weight_t", weight.detach().t().to(compute_dtype).contiguous())  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.quant is not None:
            if self.int8 or x2.shape[0] <= self.quant_rows:  # int8: one kernel at every row count, so a
                # row's output never depends on how many rows its step had (cold or cached alike)
                y = cpu_quant.linear(x2, self.quant, self.bias, self.int8)
            else:
                y = cpu_quant.linear_tiled(x2, self.quant, self.bias)
        elif self.backend == "onednn":
            y = torch.ops.mkldnn._linear_pointwise(x2.to(torch.float32), self.packed, self.bias, "none", [], "")
        elif self.backend == "mkl":
            y = torch.ops.mkl._mkl_linear(x2.to(torch.float32), self.packed, self._shape_only, self.bias, x2.shape[0])
        else:
            x2 = x2.to(self.weight_t.dtype)
            y = torch.mm(x2, self.weight_t) if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.to(self.out_dtype).view(*x.shape[:-1], y.shape[-1])


CPU_GEMM_BACKENDS = ("onednn", "mkl", "plain")


def cpu_gemm_backend() -> str:
    """The float32 CPU GEMM `CpuLinear` uses: SPLITSERVE_CPU_GEMM (onednn, mkl or plain; default
    onednn), or the next one in that order that this torch build has (x86 CPU builds have both)."""
    wanted = str(env.CPU_GEMM.read())  # one of CPU_GEMM_BACKENDS (the registry's choices)
    available = {
        "onednn": bool(torch.backends.mkldnn.is_available())
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"),
        "mkl": bool(torch.backends.mkl.is_available())
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and hasattr(torch.ops.mkl, "_mkl_linear"),
        "plain": True,
    }
    for name in CPU_GEMM_BACKENDS[CPU_GEMM_BACKENDS.index(wanted):]:
        if available[name]:
            return name
    return "plain"
