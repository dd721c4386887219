"""Loads model weights and architecture from a GGUF file or a Hugging Face checkpoint folder.

GGUF tensors (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, F32, ...) are dequantized with the `gguf`
package, except, for a float32 model on a CPU with kernels.cpu_quant built, the matrices in a block
format that kernel takes (cpu_quant.BLOCK_BYTES: Q4_0, Q4_1, Q8_0 and the K-quants; the projections,
the embedding, the LM head): those are kept as their blocks only (`cpu_quant.QuantWeight`), never dequantized, and the model computes from them. llama.cpp's
converter permutes the rows of the Q and K projections of llama-architecture models (interleaved
RoPE); they are permuted back (as raw block rows for kept ones: a row is whole blocks, or whole
256-weight super-blocks for a K-quant) so that the model uses rotate-half RoPE like HF transformers.
"""
from __future__ import annotations

import contextlib
import json
import mmap
from pathlib import Path

import numpy as np
import torch

from splitserve import heap
from splitserve.kernels import cpu_quant
from splitserve.model import hf_quant, quant_parts
from splitserve.model.dtype_choice import (  # noqa: F401 (cpu_flags, resolve_model_dtype: re-exported)
    computes_gguf_blocks_on_cpu, cpu_flags, cpu_has_native_bf16, resolve_model_dtype)
from splitserve.model.gguf_file import GGUF_NAMES, GGUF_PROJECTIONS, GGUFFile, GGUFFormatError
from splitserve.model.int8_load import PROJECTION_PARTS, check_quantization, quantize_at_load
from splitserve.model.llama import LlamaModel, ModelArgs

# where the weights are: shared with `splitserve up`'s check of --model, which must not import torch
from splitserve.model.paths import default_model_path, resolve_model_path  # noqa: F401 (default_model_path: re-exported)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model file or folder that exists but cannot be loaded; the message names the file."""


def load_model(model: str | None, dtype: str, device: str, max_positions: int | None = None,
               quantization: str = "none") -> tuple[LlamaModel, Path]:
    """The model with its weights, and the resolved path. `dtype`: a concrete one ("auto" is resolved
    by `resolve_model_dtype`); `quantization`: see int8_load."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TORCH_DTYPES)} here, got {dtype!r} "
                         "(resolve 'auto' with resolve_model_dtype first)")
    path = resolve_model_path(model)
    storage = TORCH_DTYPES[dtype]
    on_cpu = torch.device(device).type == "cpu"
    # decides only for bfloat16 (float32 keeps blocks anyway); `auto` was resolved by reading it once
    gguf_blocks = on_cpu and storage == torch.bfloat16 and computes_gguf_blocks_on_cpu(model)
    compute = compute_dtype(storage, device, gguf_blocks)
    # float32 arithmetic on a CPU with the quantized kernel: quantized matrices stay GGUF blocks (their
    # only copy), in a float32 model and in a bfloat16 one of GGUF blocks
    quantized = {} if compute == torch.float32 and on_cpu and cpu_quant.available() \
        and (storage == torch.float32 or gguf_blocks) else None
    check_quantization(quantization, quantized is not None, dtype, device)
    packed: dict = {}  # an HF quantized checkpoint's GPTQ / AWQ / FP8 weights, kept packed (hf_quant)
    if path.is_dir():
        args, tensors, packed = _read_hf_folder(path)
    else:
        args, tensors = _read_gguf(path, quantized)
    blocks = _fuse_quantized(args, quantized or {}, tensors) | hf_quant.fuse(args.num_layers, args.tie_word_embeddings,
                                                                            packed, tensors)
    blocks |= quantize_at_load(quantization, args, tensors, blocks)
    del quantized  # raw views of the file's map: the map is closed once the last goes
    positions = max_positions or args.max_position_embeddings
    with torch.device("meta"), _without_random_init():
        model_obj = LlamaModel(args, positions)
    state = _to_state_dict(args, tensors, path, blocks)
    model_obj.load_state_dict(state, strict=False, assign=True)
    del state
    model_obj.hold_blocks(blocks)  # before any move: those modules' float weights were never made
    missing = [n for n, p in model_obj.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{path}: tensors missing from the checkpoint: {', '.join(missing[:8])}")
    if compute != storage:  # bf16 values, float32 arithmetic (see compute_dtype)
        for p in model_obj.parameters():
            p.data = p.data.to(storage).to(compute)
    model_obj = model_obj.to(device=device, dtype=compute)
    model_obj.rotary.to(dtype=torch.float32)  # cos/sin stay float32, as HF computes them
    if torch.device(device).type == "cpu":
        model_obj.use_cpu_kernels(compute)
    model_obj.eval()
    heap.trim()  # the file's copies and the fused parts were freed between the kept blocks
    return model_obj, path


@contextlib.contextmanager
def _without_random_init():
    """Module constructors skip their random initialization: every weight is replaced by the
    checkpoint's, and on the meta device the first init call imports torch._dynamo (~2.5 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _fuse_quantized(args: ModelArgs, quantized: dict, tensors: dict) -> dict[str, cpu_quant.QuantWeight]:
    """The kept blocks as `QuantWeight`s under the model's parameter names, fused as `_to_state_dict`
    fuses float weights: `embed_tokens.weight`, `lm_head.weight` (the embedding's own object when
    tied: one copy), `layers.N.self_attn.qkv_proj.weight`, ... A fused projection whose parts are
    blocks of different formats (a Q4_K_M file's Q6_K attn_v beside Q4_K q/k) keeps a part a format
    (`quant_parts`); one with a part not kept as blocks is dequantized into `tensors` (the float32
    GEMM runs it). Raw rows of one format stack (a K-quant row is its super-blocks). Empties `quantized`."""
    fused: dict[str, cpu_quant.QuantWeight] = {}
    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in quantized:
            fused[name] = cpu_quant.QuantWeight.from_gguf(*quantized.pop(name))
    if args.tie_word_embeddings and "embed_tokens.weight" in fused:
        fused["lm_head.weight"] = fused["embed_tokens.weight"]
    for i in range(args.num_layers):
        p = f"layers.{i}."
        for suffix, parts in PROJECTION_PARTS:
            target = p + suffix
            found = [quantized.pop(f"{p}{part}.weight", None) for part in parts]
            if all(w is not None for w in found):  # one block matrix, or a part a format (quant_parts)
                fused[target] = quant_parts.fuse(found)
                continue
            for part, kept in zip(parts, found):
                if kept is not None:
                    tensors[f"{p}{part}.weight"] = _dequantize_raw(*kept)
    for name, kept in list(quantized.items()):  # none in a well-formed file: dequantized, not dropped
        tensors[name] = _dequantize_raw(*quantized.pop(name))
    return fused


def compute_dtype(dtype: torch.dtype, device: str, gguf_blocks: bool = False) -> torch.dtype:
    """The dtype the model computes in for weights and KV cache stored as `dtype`.

    bfloat16 on a CPU computes in float32 with the KV cache in bfloat16 (half the memory) where
    the CPU has no bf16 instructions (every bf16 operation would be emulated, 2-3x slower than
    float32) or the model's projections are GGUF blocks (`gguf_blocks`: the block kernels multiply
    them by float32 rows, keeping the blocks as the weights' only copy; a bf16 GEMM would need a
    dequantized copy, is slower, and its rows' values depend on the batch). Float weights are then
    rounded to bfloat16 (the same values as a bf16 model). Elsewhere the model computes in `dtype`.
    """
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and (gguf_blocks or not cpu_has_native_bf16()):
        return torch.float32
    return dtype


# ---------------------------------------------------------------------------------------------- GGUF


def read_gguf_args(reader: GGUFFile, path: Path) -> ModelArgs:
    def field(name, default=None, required=True):
        value = reader.fields.get(name)
        if value is None:
            if required and default is None:
                raise ModelLoadError(f"{path}: GGUF metadata key {name!r} is missing")
            return default
        return value

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} (supported: llama, qwen2, mistral)")
    hidden = int(field(f"{arch}.embedding_length"))
    heads = int(field(f"{arch}.attention.head_count"))
    kv_heads = int(field(f"{arch}.attention.head_count_kv", heads))
    tensor_names = {t.name for t in reader.tensors}
    vocab = field(f"{arch}.vocab_size", required=False)
    if vocab is None:
        vocab = len(reader.fields.get("tokenizer.ggml.tokens") or ())
        if not vocab:
            raise ModelLoadError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    scaling: dict = {}
    scale_type = field(f"{arch}.rope.scaling.type", required=False)
    if scale_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(field(f"{arch}.rope.scaling.factor"))}
    elif scale_type not in (None, "none"):
        raise ModelLoadError(f"{path}: unsupported rope scaling {scale_type!r}")
    if "rope_freqs.weight" in tensor_names:  # llama 3.x: per-frequency divisors shipped as a tensor
        t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        scaling = {"rope_type": "freq_factors", "factors": _dequantize(t).reshape(-1).tolist()}
    return ModelArgs(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_layers=int(field(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(field(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(field(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=scaling,
    )


def _dequantize(tensor) -> np.ndarray:
    if tensor.data.dtype != np.uint8:  # a plain float (or integer) tensor: its values as float32
        return np.array(tensor.data, dtype=np.float32)
    import gguf  # here: loading a model whose kept blocks and norms are plain imports no gguf

    # numpy shape is the reverse of GGUF's ne order: [out_features, in_features] for a matrix.
    kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    return np.asarray(gguf.quants.dequantize(tensor.data, kind), dtype=np.float32)


def _dequantize_raw(kind: str, raw: np.ndarray) -> np.ndarray:
    """A kept matrix's raw block rows (format, uint8 [rows, bytes]) as float32 [rows, columns]."""
    import gguf

    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]), dtype=np.float32)


def _keeps_blocks(quantized: dict | None, tensor) -> bool:
    """Whether a matrix stays as its raw blocks: blocks are being kept (`quantized` given) and the
    CPU kernel computes with its format (cpu_quant)."""
    return quantized is not None and tensor.tensor_type.name in cpu_quant.BLOCK_BYTES and len(tensor.data.shape) == 2


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (interleaved pairs back to rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# the projections whose GGUF blocks `CpuLinear` can compute with directly (kernels.cpu_quant)
_QUANT_PROJECTIONS = {GGUF_NAMES[g] for g in GGUF_PROJECTIONS}


def _read_gguf(path: Path, quantized: dict | None = None) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    """The model's arguments and its tensors dequantized to float32. `quantized`, when given,
    receives instead the projections, embedding and LM head stored in a format the CPU kernel takes
    (cpu_quant.BLOCK_BYTES), as (format, raw uint8 rows) under the same names, rows in the same order
    (Q and K un-permuted): those are never dequantized."""
    try:
        reader = GGUFFile(path)
    except (GGUFFormatError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    args = read_gguf_args(reader, path)
    names = GGUF_NAMES
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "rope_freqs":
            continue
        if parts[0] == "blk":
            base = names.get(parts[2])
            if base is None:
                raise ModelLoadError(f"{path}: unexpected tensor {t.name}")
            name = f"layers.{parts[1]}.{base}.{parts[3]}"
            keep = base in _QUANT_PROJECTIONS and parts[3] == "weight" and _keeps_blocks(quantized, t)
            heads = {"q_proj": args.num_heads, "k_proj": args.num_kv_heads}.get(base)
        elif parts[0] in names:
            name = f"{names[parts[0]]}.{parts[1]}"
            keep = name in ("embed_tokens.weight", "lm_head.weight") and _keeps_blocks(quantized, t)
            heads = None
        else:
            raise ModelLoadError(f"{path}: unexpected tensor {t.name}")
        # the raw blocks copied out of the file's map, whose pages are then let go (else every kept
        # tensor's pages stay resident until the read ends: ~100 MB more at the peak of a load),
        # or a new float32 array
        data = _copy_out(reader, t.data) if keep else _dequantize_checked(path, t)
        if args.architecture == "llama" and heads is not None:
            # the same row permutation on raw block rows as on float rows (a row is whole blocks)
            data = _unpermute(data, heads)
        if keep:
            quantized[name] = (t.tensor_type.name, data)
        else:
            tensors[name] = data
    return args, tensors


def _copy_out(reader: GGUFFile, view: np.ndarray) -> np.ndarray:
    """A copy of a tensor's bytes (a view of the reader's map), the map's pages under them dropped
    from this process (MADV_DONTNEED: they stay in the OS's page cache, and a later read faults them
    back in, as one of a neighbour sharing the first page would)."""
    data = np.array(view)
    mapped = getattr(reader._map, "_mmap", None)  # None for an empty file (no map)
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        start = view.ctypes.data - reader._map.ctypes.data
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, first, start + view.nbytes - first)
    return data


def _dequantize_checked(path: Path, tensor) -> np.ndarray:
    try:
        return _dequantize(tensor)
    except Exception as exc:
        raise ModelLoadError(f"{path}: tensor {tensor.name} ({tensor.tensor_type.name}) cannot be dequantized: {exc}") \
            from exc


# ------------------------------------------------------------------------------------ HF checkpoints


def read_hf_config(path: Path) -> ModelArgs:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json (a Hugging Face checkpoint folder needs one)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_file}: invalid JSON: {exc}") from exc
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ModelLoadError(f"{cfg_file}: unsupported model_type {model_type!r} (supported: llama, mistral, qwen2)")
    # transformers >= 5 writes `rope_parameters` (theta and scaling together) instead of
    # `rope_theta` and `rope_scaling`; older checkpoints have the latter.
    rope = dict(cfg.get("rope_parameters") or {})
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelArgs(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_scaling=dict(cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else {})),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None,
        )
    except KeyError as exc:
        raise ModelLoadError(f"{cfg_file}: missing key {exc.args[0]!r}") from exc


def _read_hf_folder(path: Path) -> tuple[ModelArgs, dict[str, np.ndarray | torch.Tensor], dict]:
    """The arguments, the float tensors (float32) and, for a quantized checkpoint, its packed weights
    (`hf_quant.take_packed`: never made float)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    args = read_hf_config(path)
    try:
        spec = hf_quant.read_spec(path, json.loads((path / "config.json").read_text()))
    except (hf_quant.QuantConfigError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'}: {exc}") from exc
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    tensors: dict = {}
    for f in files:
        try:
            loaded = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{f}: cannot read safetensors file: {exc}") from exc
        for name, t in loaded.items():
            key = name.removeprefix("model.")
            key = key.replace("self_attn.", "").replace("mlp.", "")
            tensors[key] = t if spec is not None and hf_quant.keeps_raw(key, t) else t.float()
    try:
        packed = hf_quant.take_packed(spec, tensors, path) if spec is not None else {}
    except hf_quant.QuantConfigError as exc:
        raise ModelLoadError(str(exc)) from exc
    return args, tensors, packed


# ------------------------------------------------------------------------------------------- common


def _to_state_dict(args: ModelArgs, tensors: dict, path: Path, held: dict | None = None) -> dict[str, torch.Tensor]:
    """Maps flat names (`layers.N.q_proj.weight`, ...) onto the model's fused parameters, but for
    the `held` ones (name -> `QuantWeight`, kept as blocks: the model holds them apart,
    `LlamaModel.hold_blocks`); the shapes of both are checked."""
    held = held or {}

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ModelLoadError(f"{path}: tensor {name} is missing")
        t = tensors.pop(name)
        return torch.from_numpy(np.require(t, np.float32, ["W", "C"])) if isinstance(t, np.ndarray) else t

    def put(target: str, *parts: str) -> None:  # the parts concatenated by rows, unless held
        if target not in held:
            state[target] = take(parts[0]) if len(parts) == 1 else torch.cat([take(part) for part in parts])

    state = {"norm.weight": take("norm.weight")}
    put("embed_tokens.weight", "embed_tokens.weight")
    if not args.tie_word_embeddings:
        put("lm_head.weight", "lm_head.weight")
    tensors.pop("lm_head.weight", None)  # a tied checkpoint may still carry a copy
    for i in range(args.num_layers):
        p = f"layers.{i}."
        put(p + "input_layernorm.weight", p + "input_layernorm.weight")
        put(p + "post_attention_layernorm.weight", p + "post_attention_layernorm.weight")
        put(p + "self_attn.qkv_proj.weight", p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight")
        if args.attention_bias:
            put(p + "self_attn.qkv_proj.bias", p + "q_proj.bias", p + "k_proj.bias", p + "v_proj.bias")
        put(p + "self_attn.o_proj.weight", p + "o_proj.weight")
        put(p + "mlp.gate_up_proj.weight", p + "gate_proj.weight", p + "up_proj.weight")
        put(p + "mlp.down_proj.weight", p + "down_proj.weight")
    qkv_rows = (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
    expected = {"embed_tokens.weight": (args.vocab_size, args.hidden_size),
                "layers.0.self_attn.qkv_proj.weight": (qkv_rows, args.hidden_size)}
    # every held weight too: no state dict checks them, and the fused decode step (cpu_layers.c)
    # reads each projection's blocks with the model's own sizes
    by_suffix = {"self_attn.qkv_proj.weight": (qkv_rows, args.hidden_size),
                 "self_attn.o_proj.weight": (args.hidden_size, args.num_heads * args.head_dim),
                 "mlp.gate_up_proj.weight": (2 * args.intermediate_size, args.hidden_size),
                 "mlp.down_proj.weight": (args.hidden_size, args.intermediate_size),
                 "lm_head.weight": expected["embed_tokens.weight"]}
    expected |= {name: by_suffix[name if name in by_suffix else name.split(".", 2)[-1]]  # layers.N.<suffix>
                 for name in held if name not in expected}
    for name, shape in expected.items():
        got = held[name] if name in held else state[name]
        if tuple(got.shape) != shape:
            raise ModelLoadError(f"{path}: tensor {name} has shape {tuple(got.shape)}, expected {shape}")
    return state
