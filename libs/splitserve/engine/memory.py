"""KV-cache memory arithmetic, shared by the worker that sizes its pool and by `splitserve plan`.

The worker (LLMEngine through KVCache) and the planner call the same functions here, so a plan and
the pool a worker really allocates cannot disagree. No torch: the planner runs without it.

One block holds `block_size` tokens of every layer, K and V:
    elements  [num_layers, 2 (K, V), block_size, kv_heads, head_dim]  in the KV dtype
    scales    [num_layers, 2 (K, V), block_size, kv_heads]  float32, only for the 8-bit KV dtypes
The 8-bit dtypes (fp8_e4m3, int8) carry one float32 scale per layer, K or V, token and KV head (the
absmax of that head's `head_dim` values; kernels.kv_quant defines the arithmetic), the layout KVCache
stores. The 16- and 32-bit dtypes have no scales.
"""
from __future__ import annotations

from typing import NamedTuple

GIB = 1 << 30  # kv_cache_memory_gb, and every *_gb of the planner, is in GiB


class KVDtype(NamedTuple):
    element_bytes: int  # bytes of one K or V element
    scale_bytes: int  # bytes of the scale of one (layer, K|V, token, kv head); 0: unscaled


KV_DTYPES = {
    "float32": KVDtype(4, 0),
    "bfloat16": KVDtype(2, 0),
    "float16": KVDtype(2, 0),
    "fp8_e4m3": KVDtype(1, 4),
    "int8": KVDtype(1, 4),
}
# torch's names of the same dtypes (str(torch.float8_e4m3fn) without "torch.")
_ALIASES = {"float8_e4m3fn": "fp8_e4m3"}


def kv_dtype(name: str) -> KVDtype:
    """The layout of a KV dtype by name; ValueError naming the choices otherwise."""
    spec = KV_DTYPES.get(_ALIASES.get(name, name))
    if spec is None:
        raise ValueError(f"KV-cache dtype {name!r} is not one of {', '.join(KV_DTYPES)}")
    return spec


def kv_block_bytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: str) -> int:
    """Bytes of one KV block across all layers, K and V, scales included (the layout above)."""
    spec = kv_dtype(dtype)
    per_token_head = head_dim * spec.element_bytes + spec.scale_bytes
    return num_layers * 2 * block_size * num_kv_heads * per_token_head


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: str) -> float:
    """One token's share of a block: 2 x layers x kv_heads x (head_dim x element bytes + scale bytes)."""
    return kv_block_bytes(num_layers, num_kv_heads, head_dim, block_size, dtype) / block_size


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks one sequence of `num_tokens` occupies: pages are whole blocks."""
    return -(-num_tokens // block_size)


def num_blocks_for_budget(memory_gb: float, num_layers: int, num_kv_heads: int, head_dim: int,
                          block_size: int, dtype: str) -> int:
    """The blocks a pool of `memory_gb` GiB holds: floor(budget / bytes per block). ValueError when
    not even one block fits (a worker cannot serve without one)."""
    per_block = kv_block_bytes(num_layers, num_kv_heads, head_dim, block_size, dtype)
    num_blocks = int(memory_gb * GIB) // per_block
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_memory_gb={memory_gb} holds no KV block: one block needs {per_block} bytes "
            f"({num_layers} layers x K,V x {block_size} tokens x {num_kv_heads} heads x "
            f"{head_dim} dims, {dtype}{', each token and head with a float32 scale' if kv_dtype(dtype).scale_bytes else ''}); "
            "raise kv_cache_memory_gb"
        )
    return num_blocks
