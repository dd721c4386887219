"""One KV block on the wire: a msgpack header and the raw payload (no pickle anywhere).

payload: the bytes of [num_layers, 2 (K, V), block_size, kv_heads, head_dim] in `dtype`, little-endian,
         and for the 8-bit dtypes (int8, fp8_e4m3) their float32 scales [num_layers, 2, block_size,
         kv_heads] after them (exactly `KVCache.read_block`); the transport may chunk it, the
         receiver reassembles it. A block of another dtype than the receiver's cache is refused
         (KVBlockError: the receiver recomputes it), never reinterpreted.
header:  a msgpack map with the short keys of `_KEYS`; `checksum` is the 64-bit xxh3 of the payload
         (`payload_checksum`: ~20 GB/s, so checking every block on put, get and import stays cheap).
The receiver runs `check_block` (or `import_block`) before a page is written: a block computed for
another model, shape or dtype, or damaged in transit, raises KVBlockError and is never written.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from typing import TYPE_CHECKING

import msgpack
import xxhash

if TYPE_CHECKING:  # torch is not imported at run time: the kvstore parses headers without it
    import torch

    from splitserve.engine.kv_cache import KVCache

LAYOUT_VERSION = 2  # 2: xxh3-64 checksum (1 had crc32)
_WIRE_DTYPES = ("float32", "bfloat16", "float16", "fp8_e4m3", "int8")
_MAX_HASH_BYTES = 64

# field name -> msgpack key
_KEYS = {
    "block_hash": "hash",
    "model_id": "model",
    "num_layers": "layers",
    "num_kv_heads": "kv_heads",
    "head_dim": "head_dim",
    "block_size": "block_size",
    "dtype": "dtype",
    "layout_version": "layout",
    "checksum": "xxh3",
    "payload_size": "size",
}


class KVBlockError(ValueError):
    """A KV block that must not be written: malformed header, mismatch with the receiver, or damage."""


@dataclass(frozen=True)
class BlockHeader:
    """Describes one block's payload. Validated on construction (KVBlockError naming the field)."""

    block_hash: bytes  # the chained block hash (splitserve.engine.hashing), 1..64 bytes
    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens
    dtype: str  # "float32" | "bfloat16" | "float16" | "fp8_e4m3" | "int8" (values, then scales)
    layout_version: int  # == LAYOUT_VERSION
    checksum: int  # payload_checksum(payload), [0, 2**64)
    payload_size: int  # bytes

    def __post_init__(self) -> None:
        if not isinstance(self.block_hash, bytes) or not 0 < len(self.block_hash) <= _MAX_HASH_BYTES:
            raise KVBlockError(f"KV block header field 'block_hash' must be 1..{_MAX_HASH_BYTES} bytes, "
                               f"got {_describe(self.block_hash)}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise KVBlockError(f"KV block header field 'model_id' must be a non-empty string, "
                               f"got {_describe(self.model_id)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "layout_version",
                     "checksum", "payload_size"):
            value = getattr(self, name)
            low = 0 if name in ("checksum", "payload_size") else 1
            if type(value) is not int or value < low:
                raise KVBlockError(f"KV block header field '{name}' must be an integer >= {low}, "
                                   f"got {_describe(value)}")
        if self.checksum >= 1 << 64:
            raise KVBlockError(f"KV block header field 'checksum' must be a 64-bit xxh3 (< 2**64), "
                               f"got {self.checksum}")
        if self.dtype not in _WIRE_DTYPES:
            raise KVBlockError(f"KV block header field 'dtype' must be one of "
                               f"{', '.join(_WIRE_DTYPES)}, got {_describe(self.dtype)}")
        if self.layout_version != LAYOUT_VERSION:
            raise KVBlockError(f"KV block header field 'layout_version' is {self.layout_version}; "
                               f"this build reads only layout version {LAYOUT_VERSION}")

    def to_bytes(self) -> bytes:
        packed = {_KEYS[f.name]: getattr(self, f.name) for f in fields(self)}
        return msgpack.packb(packed, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "BlockHeader":
        """Parses a header; KVBlockError naming the problem on anything malformed.

        Unknown keys are ignored (a newer sender may add fields); missing ones are errors.
        """
        try:
            obj = msgpack.unpackb(data, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise KVBlockError(f"KV block header is not valid msgpack: {e}") from None
        if not isinstance(obj, dict):
            raise KVBlockError(f"KV block header must be a msgpack map, got {type(obj).__name__}")
        missing = [f"'{name}' (key '{key}')" for name, key in _KEYS.items() if key not in obj]
        if missing:
            raise KVBlockError(f"KV block header is missing field(s) {', '.join(missing)}")
        return cls(**{name: obj[key] for name, key in _KEYS.items()})


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


class PagePayload:
    """A block's payload as the slices of the cache's pages it is made of (`KVCache.block_parts`, in
    payload order), not joined: what a pinned export (splitserve.transfer.pages.PinnedExport) hands
    to the kvstore client, which writes the slices straight into its slot. len() is the payload's
    bytes; `tobytes` joins them (a stream's chunks, one block at a time)."""

    __slots__ = ("parts", "nbytes")

    def __init__(self, parts: list[memoryview]) -> None:
        self.parts = parts
        self.nbytes = sum(part.nbytes for part in parts)

    def __len__(self) -> int:
        return self.nbytes

    def tobytes(self) -> bytes:
        return b"".join(self.parts)


def payload_checksum(payload: bytes | bytearray | memoryview | PagePayload) -> int:
    """The checksum a header carries for `payload`: 64-bit xxh3 (seed 0). A PagePayload's slices are
    hashed in order, as the joined bytes would be."""
    if isinstance(payload, PagePayload):
        state = xxhash.xxh3_64()
        for part in payload.parts:
            state.update(part)
        return state.intdigest()
    return xxhash.xxh3_64_intdigest(payload)


def dtype_name(dtype: "torch.dtype") -> str:
    """The wire name of a cache dtype (the cache's own name for it); KVBlockError for a dtype the
    wire format has no name for."""
    from splitserve.engine.kv_cache import dtype_name as cache_dtype_name

    name = cache_dtype_name(dtype)
    if name not in _WIRE_DTYPES:
        raise KVBlockError(f"KV cache dtype {dtype} has no wire name (supported: {', '.join(_WIRE_DTYPES)})")
    return name


def encode_block(
    cache: "KVCache", block_id: int, block_hash: bytes, model_id: str, copy: bool = True
) -> tuple[BlockHeader, bytes | PagePayload]:
    """The header and payload of one cached block, ready to send. With copy=False (a CPU cache) the
    payload is the block's page slices (PagePayload), valid only while the block stays pinned."""
    parts = None if copy else cache.block_parts(block_id)
    payload = cache.read_block(block_id) if parts is None else PagePayload(parts)
    header = BlockHeader(
        block_hash=block_hash, model_id=model_id, num_layers=cache.num_layers,
        num_kv_heads=cache.num_kv_heads, head_dim=cache.head_dim, block_size=cache.block_size,
        dtype=dtype_name(cache.dtype), layout_version=LAYOUT_VERSION,
        checksum=payload_checksum(payload), payload_size=len(payload),
    )
    return header, payload


def check_block(
    header: BlockHeader, payload: bytes, cache: "KVCache", model_id: str, block_hash: bytes | None = None
) -> None:
    """Raises KVBlockError naming the first mismatch between a received block and the receiving cache
    (model id, expected hash if given, shape fields, dtype, payload size, checksum)."""
    check_header(header, cache, model_id, block_hash)
    check_payload(header, payload)


def check_header(header: BlockHeader, cache: "KVCache", model_id: str, block_hash: bytes | None = None) -> None:
    """check_block without the payload: the header against the receiving cache (a payload read
    straight into its page was checked against the header's checksum as it was read)."""
    if header.model_id != model_id:
        raise KVBlockError(f"KV block model_id mismatch: block is for {header.model_id!r}, "
                           f"this cache serves {model_id!r}")
    if block_hash is not None and header.block_hash != block_hash:
        raise KVBlockError(f"KV block block_hash mismatch: got {header.block_hash.hex()[:16]}..., "
                           f"requested {block_hash.hex()[:16]}...")
    for name, ours in (("num_layers", cache.num_layers), ("num_kv_heads", cache.num_kv_heads),
                       ("head_dim", cache.head_dim), ("block_size", cache.block_size),
                       ("dtype", dtype_name(cache.dtype))):
        theirs = getattr(header, name)
        if theirs != ours:
            raise KVBlockError(f"KV block {name} mismatch: block has {theirs!r}, this cache has {ours!r}")
    if header.payload_size != cache.bytes_per_block:
        raise KVBlockError(f"KV block payload_size mismatch: header says {header.payload_size} bytes, "
                           f"this cache's blocks are {cache.bytes_per_block} bytes")


def check_payload(header: BlockHeader, payload: bytes, where: str = "") -> None:
    """KVBlockError unless the payload has the header's size and checksum (`where` names the block
    in the message). The one integrity check of a block's bytes, for the kvstore and the importer."""
    received = len(payload) if isinstance(payload, PagePayload) else memoryview(payload).nbytes
    if received != header.payload_size:
        raise KVBlockError(f"KV block payload size mismatch: received {received} bytes, "
                           f"header says {header.payload_size} (truncated or padded in transit){where}")
    checksum = payload_checksum(payload)
    if checksum != header.checksum:
        raise KVBlockError(f"KV block checksum mismatch: payload xxh3 {checksum:#018x}, "
                           f"header says {header.checksum:#018x}{where}")


def import_block(
    cache: "KVCache", block_id: int, header: BlockHeader, payload: bytes, model_id: str,
    block_hash: bytes | None = None,
) -> None:
    """check_block, then write the payload into page `block_id` (nothing is written on error)."""
    check_block(header, payload, cache, model_id, block_hash)
    cache.write_block(block_id, payload)
