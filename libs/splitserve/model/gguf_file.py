"""A GGUF file's metadata and tensors, decoded straight from its bytes (GGUF versions 2 and 3).

The `gguf` package's reader makes a numpy view for every part of every metadata value: for a
tokenizer's vocabulary and merges that is ~200,000 views, 5 s of every worker start on this
machine. Here the metadata is decoded with `struct` in one pass and each tensor's bytes are a numpy
view of one memory map; the `gguf` package still does the dequantizing where the model loader asks
for it, and is not imported otherwise (its import maps 3.5 MiB: issue 19's bound on a worker's memory).

Layout (little-endian): magic "GGUF", version u32, tensor count u64, metadata count u64; each
metadata entry is a string key, a u32 value type and the value (strings are a u64 length and UTF-8
bytes; arrays a u32 item type, a u64 count and the items); then each tensor's name, u32 dimension
count, u64 dimensions (fastest first), u32 type and u64 offset into the data section, which starts at
the next multiple of `general.alignment` (32 unless given).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"GGUF"


class GGMLType(IntEnum):
    """A tensor's element type, by its number in the file (the format's ggml_type)."""

    F32, F16, Q4_0, Q4_1 = 0, 1, 2, 3
    Q5_0, Q5_1, Q8_0, Q8_1 = 6, 7, 8, 9
    Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K = 10, 11, 12, 13, 14, 15
    IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS = 16, 17, 18, 19, 20, 21, 22, 23
    I8, I16, I32, I64, F64, IQ1_M, BF16 = 24, 25, 26, 27, 28, 29, 30
    TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0 = 34, 35, 39, 40, 41


# (elements a block, bytes a block) of each type, from the block layouts: a Q4_0 block is a float16
# scale and 32 4-bit codes (18 bytes); a K-quant's super-block holds 256 (tests/model/test_gguf_file.py
# checks every entry against the gguf package's table)
BLOCK_SIZES = {
    GGMLType.F32: (1, 4), GGMLType.F16: (1, 2), GGMLType.BF16: (1, 2), GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1), GGMLType.I16: (1, 2), GGMLType.I32: (1, 4), GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18), GGMLType.Q4_1: (32, 20), GGMLType.Q5_0: (32, 22), GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34), GGMLType.Q8_1: (32, 40), GGMLType.IQ4_NL: (32, 18), GGMLType.MXFP4: (32, 17),
    GGMLType.Q2_K: (256, 84), GGMLType.Q3_K: (256, 110), GGMLType.Q4_K: (256, 144), GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210), GGMLType.Q8_K: (256, 292), GGMLType.IQ2_XXS: (256, 66), GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98), GGMLType.IQ1_S: (256, 50), GGMLType.IQ3_S: (256, 110), GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136), GGMLType.IQ1_M: (256, 56), GGMLType.TQ1_0: (256, 54), GGMLType.TQ2_0: (256, 66),
    GGMLType.NVFP4: (64, 36), GGMLType.Q1_0: (128, 18),
}
# A llama-architecture GGUF's tensor names (blk.N.<name>.weight, or top-level) -> the model's
GGUF_NAMES = {
    "token_embd": "embed_tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}
# the GGUF names of the projections (the matrices the CPU block kernels multiply by)
GGUF_PROJECTIONS = tuple(g for g, name in GGUF_NAMES.items() if name.endswith("_proj"))
# value type -> struct format of one scalar (8: string, 9: array are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# element types stored as plain numbers (everything else is quantized blocks, kept as uint8 rows)
_PLAIN = {
    GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.F64: np.float64, GGMLType.I8: np.int8,
    GGMLType.I16: np.int16, GGMLType.I32: np.int32, GGMLType.I64: np.int64,
}
_MAX_DIMS = 4  # GGML_MAX_DIMS


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file; the message says where."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLType
    shape: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first
    # numpy's order (the reverse); quantized types as uint8 [..., bytes per row], as llama.cpp stores them
    data: np.ndarray


class _Cursor:
    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf, self.pos, self.what = buf, 0, what

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFormatError(f"{self.what}: the file ends at byte {len(self.buf)} inside its header")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"{self.what}: a string of {n} bytes at byte {self.pos} runs past the end")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFormatError(f"{self.what}: a string at byte {self.pos - n} is not UTF-8 ({exc.reason})") from exc

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take("<" + _SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALARS and item != 7:  # numbers: one view, copied out of the map
                size = struct.calcsize(_SCALARS[item]) * count
                if self.pos + size > len(self.buf):
                    raise GGUFFormatError(f"{self.what}: an array of {count} items runs past the end")
                arr = np.frombuffer(self.buf, dtype="<" + _SCALARS[item], count=count, offset=self.pos)
                self.pos += size
                return arr.tolist()
            if count > len(self.buf):  # each item takes at least one byte
                raise GGUFFormatError(f"{self.what}: an array claims {count} items, more than the file's bytes")
            return [self.value(item) for _ in range(count)]
        raise GGUFFormatError(f"{self.what}: unknown metadata value type {kind} at byte {self.pos - 4}")


class GGUFFile:
    """`fields`: metadata key -> Python value (arrays as lists); `tensors`: in file order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        what = str(self.path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint8)
        cur = _Cursor(memoryview(self._map), what)
        if bytes(self._map[:4]) != _MAGIC:
            raise GGUFFormatError(f"{what}: not a GGUF file (the first bytes are {bytes(self._map[:4])!r}, not b'GGUF')")
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise GGUFFormatError(f"{what}: GGUF version {version} is not supported (2 and 3 are){hint}")
        n_tensors, n_fields = cur.take("<Q"), cur.take("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = cur.string()
            self.fields[key] = cur.value(cur.take("<I"))
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        align = int(self.fields.get("general.alignment", 32))
        if align <= 0 or align & (align - 1):
            raise GGUFFormatError(f"{what}: general.alignment {align} is not a power of two")
        start = -(-cur.pos // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _tensor_info(self, cur: _Cursor) -> tuple:
        name = cur.string()
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFFormatError(f"{self.path}: tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        dims = tuple(cur.take("<Q") for _ in range(n_dims))
        raw_type = cur.take("<I")
        try:
            kind = GGMLType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"{self.path}: tensor {name} has unknown element type {raw_type}") from None
        return name, dims, kind, cur.take("<Q")

    def _tensor(self, start: int, name: str, dims: tuple[int, ...], kind: GGMLType, offset: int) -> GGUFTensor:
        block, type_size = BLOCK_SIZES[kind]
        if dims[0] % block:
            raise GGUFFormatError(f"{self.path}: tensor {name}'s rows of {dims[0]} are not whole {kind.name} blocks of {block}")
        n_elements = int(np.prod(dims))
        n_bytes = n_elements // block * type_size
        begin = start + offset
        if begin + n_bytes > len(self._map):
            raise GGUFFormatError(f"{self.path}: tensor {name} ({n_bytes} bytes at byte {begin}) runs past the end of "
                                  f"the file ({len(self._map)} bytes): the file is truncated")
        raw = self._map[begin:begin + n_bytes]
        np_shape = tuple(reversed(dims))
        if kind in _PLAIN:
            data = raw.view(_PLAIN[kind]).reshape(np_shape)
        else:
            data = raw.reshape(*np_shape[:-1], np_shape[-1] // block * type_size)
        return GGUFTensor(name, kind, dims, data)
