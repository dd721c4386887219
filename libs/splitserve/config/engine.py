"""Engine configuration: frozen dataclasses, one docstring per field, validated on construction.

`EngineConfig` is built once per process from the shared sub-configs; derived values are properties.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from splitserve.config.speculative import SpeculativeConfig, canonical

DTYPES = ("auto", "float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8_e4m3", "int8")
QUANTIZED_MATMULS = ("auto", "exact", "int8")
QUANTIZATIONS = ("none", "int8", "fp8")
# what "auto" runs: int8, measured on a 2-core AVX-512 VNNI VM (docs/performance.md: one stream decodes
# 1.7-1.9x as fast as exact, a 1,000-token prefill ~0.85x; perplexity within 1%, benchmarks/quality_gate.py)
QUANTIZED_MATMUL_AUTO = "int8"
# flags in /proc/cpuinfo that mean bfloat16 dot products in hardware
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_dtype(dtype: str, device: str, cpu_flags: frozenset[str] | set[str] = frozenset(),
                  cuda_bf16: bool = False, cpu_blocks: bool = False) -> tuple[str, str]:
    """The concrete dtype `dtype` stands for on `device`, and why (for the startup log).

    "auto": on a CPU, float32 for a model whose projections are GGUF blocks the CPU kernels compute
    (`cpu_blocks`: they multiply the blocks by float32 activations; in bfloat16 the model would
    take the slower float path), else float32 on a CPU without bfloat16 instructions (`cpu_flags`
    has none of CPU_BF16_FLAGS: bf16 there is float32 arithmetic on rounded values, slower and no
    smaller in compute), bfloat16 on a CPU with them; on CUDA bfloat16 where `cuda_bf16`
    (torch.cuda.is_bf16_supported()), else float16. An explicit dtype is returned as it is. Pure:
    the caller reads the CPU flags, the CUDA support and the model's formats.
    """
    if dtype != "auto":
        return dtype, "given explicitly"
    if device.startswith("cuda"):
        if cuda_bf16:
            return "bfloat16", "this CUDA device supports bfloat16"
        return "float16", "this CUDA device has no bfloat16 support"
    if cpu_blocks:
        return "float32", "the model's weights are GGUF blocks, which the CPU kernels compute in float32"
    found = sorted(set(cpu_flags) & set(CPU_BF16_FLAGS))
    if found:
        return "bfloat16", f"this CPU has native bfloat16 ({', '.join(found)})"
    return "float32", f"this CPU has no native bfloat16 (no {'/'.join(CPU_BF16_FLAGS)} flags)"


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """GGUF file or Hugging Face checkpoint folder; None loads the default SmolLM2-135M-Instruct Q4_1."""
    dtype: str = field(default="auto", metadata={"choices": DTYPES})
    """Compute and KV-cache dtype: float32 or bfloat16 on the CPU; float16 or bfloat16 on CUDA. "auto"
    (the default) is resolved once where the engine is built (`resolve_dtype`): float32 on a CPU
    without native bfloat16 (no avx512_bf16/amx_bf16), bfloat16 on a CPU with it and on CUDA (float16
    where CUDA lacks bf16); the startup log says what it chose and why."""
    device: str = "cpu"
    """Torch device the weights and the KV cache live on ("cpu" or "cuda")."""
    max_model_len: int | None = None
    """Longest prompt + output a sequence may have, in tokens; None takes the model's context length."""
    quantized_matmul: str = field(default="auto", metadata={"choices": QUANTIZED_MATMULS})
    """How a float32 CPU model multiplies activations by weights held as GGUF blocks: "exact" (float
    arithmetic on the dequantized weights: HF transformers' values, greedy tokens equal to theirs) or
    "int8" (activations quantized to 8 bits per block of 32, integer dot products at every row
    count: faster decode steps, perplexity within 1% of exact, greedy tokens may differ from
    exact's). "auto" picks the one measured best (docs/performance.md). Other models ignore it."""
    quantization: str = field(default="none", metadata={"choices": QUANTIZATIONS})
    """Quantize a checkpoint's float projection weights at load time: "int8" keeps each as signed
    8-bit codes with one scale per output channel (a quarter of float32's bytes), computed by the
    same kernels as GGUF's blocks (float32 on the CPU only); "fp8" keeps each as float8_e4m3fn with
    one float32 scale per output channel, computed a dequantized tile at a time like an FP8
    checkpoint's weights (any device and dtype; weight-only). Weights the checkpoint already stores
    quantized (GGUF blocks, GPTQ, AWQ, FP8) are kept as they are; embeddings, norms and the LM head
    stay float. "none" (the default) computes with the checkpoint's values."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantized_matmul not in QUANTIZED_MATMULS:
            raise ValueError(f"quantized_matmul must be one of {', '.join(QUANTIZED_MATMULS)}, "
                             f"got {self.quantized_matmul!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.device.startswith("cpu") and self.dtype == "float16":
            raise ValueError("dtype 'float16' is not supported on the CPU; use 'float32' or 'bfloat16'")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block; also the unit of prefix-cache hashing and of block transfer."""
    kv_cache_memory_gb: float = 1.0
    """Memory budget of the paged KV cache in GiB (all layers, K and V); the pool never grows past it."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of full prompt blocks seen before (chained block hashes)."""
    kv_cache_dtype: str = field(default="auto", metadata={"choices": KV_CACHE_DTYPES})
    """How K and V are stored, apart from the compute dtype: "auto" (the compute dtype), float32,
    bfloat16, float16, or 8 bits with a float32 scale per token and KV head (fp8_e4m3, int8: about
    half a 16-bit cache's bytes, a quarter of float32's, so the same budget holds ~2-4x the tokens;
    kernels/kv_quant.py). Prefill and decode workers of one deployment must agree: a block of another
    dtype is refused and recomputed."""

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most sequences in one step's batch (running sequences, prefill chunks included)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: decode tokens plus prefill chunk tokens."""
    long_prefill_token_threshold: int = 0
    """Longest prefill chunk one sequence gets in a step (0: up to the whole budget)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model and how to run it."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The paged KV cache."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Continuous batching limits."""
    use_triton: bool | None = None
    """Triton kernels for KV writes and decode attention; None: on when the device is CUDA."""
    speculative_config: str | None = None
    """Speculative decoding, as a JSON object: {"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_min": 2, "prompt_lookup_max": 4} or {"method": "draft_model", "model": PATH,
    "num_speculative_tokens": 4} (docs/configuration.md has every key). None: off. Greedy output is
    unchanged by it; sampled output keeps the model's distribution."""

    def __post_init__(self) -> None:
        # Validated once here (errors name the key) and kept as canonical JSON: a scalar that goes
        # through flags, `up` and compose unchanged, and compares equal however it was written.
        object.__setattr__(self, "speculative_config", canonical(self.speculative_config))

    @property
    def speculative(self) -> SpeculativeConfig | None:
        return SpeculativeConfig.parse(self.speculative_config)

    @property
    def triton_enabled(self) -> bool:
        if self.use_triton is None:
            return self.model.device.startswith("cuda")
        return self.use_triton

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Builds the config from flat keyword arguments (the `LLM(...)` surface); unknown names fail."""
        parts = {}
        for name, sub in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            names = {f.name for f in fields(sub)}
            parts[name] = sub(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        use_triton = kwargs.pop("use_triton", None)
        speculative = kwargs.pop("speculative_config", None)
        if kwargs:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(kwargs))}")
        return cls(**parts, use_triton=use_triton, speculative_config=canonical(speculative))
