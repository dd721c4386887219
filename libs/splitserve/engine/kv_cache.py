"""The paged KV cache: per-layer K and V tensors indexed by block id (ids come from BlockManager).

    k_caches[l], v_caches[l]: [num_blocks, block_size, kv_heads, head_dim], cache dtype, on `device`
    k_scales[l], v_scales[l]: [num_blocks, block_size, kv_heads] float32, only for an 8-bit cache
                              (int8 or float8_e4m3fn values; kernels.kv_quant defines the arithmetic)

The serialized form of one block (`read_block`/`write_block`, and the payload on the wire) is the
raw bytes, in the cache dtype and native (little-endian) byte order, of
    [num_layers, 2 (K, V), block_size, kv_heads, head_dim]
followed, for an 8-bit cache, by its float32 scales
    [num_layers, 2 (K, V), block_size, kv_heads]
"""
from __future__ import annotations

import numpy as np
import torch

from splitserve.engine import memory
from splitserve.kernels import kv_quant

# KV-cache dtypes by the names of --kv-cache-dtype and engine.memory
KV_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   **kv_quant.STORAGE}


def dtype_name(dtype: torch.dtype) -> str:
    """The name engine.memory knows a torch dtype by ("float32", "bfloat16", "int8", "fp8_e4m3", ...)."""
    return kv_quant.SCALED_BY_STORAGE.get(dtype) or str(dtype).removeprefix("torch.")


class KVCache:
    """Owns the KV pages of every layer; allocates all memory up front and never grows."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ):
        for name, value in (
            ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
            ("block_size", block_size), ("num_blocks", num_blocks),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if dtype not in KV_TORCH_DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(map(str, KV_TORCH_DTYPES.values()))}, got {dtype!r}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        # 8-bit caches: a float32 scale per token and kv head beside each page (empty lists otherwise)
        self.scaled = dtype in kv_quant.SCALED_BY_STORAGE
        scales = (num_blocks, block_size, num_kv_heads)
        self.k_scales = [torch.zeros(scales, dtype=torch.float32, device=self.device)
                         for _ in range(num_layers if self.scaled else 0)]
        self.v_scales = [torch.zeros(scales, dtype=torch.float32, device=self.device)
                         for _ in range(num_layers if self.scaled else 0)]
        self._views: list[np.ndarray] | None = None  # built on first use (_host_views)

    @staticmethod
    def block_nbytes(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                     dtype: torch.dtype) -> int:
        """Bytes of one block across all layers, K and V (engine.memory: the planner's arithmetic too)."""
        return memory.kv_block_bytes(num_layers, num_kv_heads, head_dim, block_size, dtype_name(dtype))

    @staticmethod
    def num_blocks_for_budget(memory_gb: float, num_layers: int, num_kv_heads: int, head_dim: int,
                              block_size: int, dtype: torch.dtype) -> int:
        """floor(memory_gb GiB / bytes per block); ValueError if not even one block fits."""
        return memory.num_blocks_for_budget(memory_gb, num_layers, num_kv_heads, head_dim, block_size,
                                            dtype_name(dtype))

    @property
    def bytes_per_block(self) -> int:
        return self.block_nbytes(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size,
                                 self.dtype)

    @property
    def dtype_name(self) -> str:
        """The cache dtype by its --kv-cache-dtype / wire name."""
        return dtype_name(self.dtype)

    @property
    def layers(self) -> list[tuple[torch.Tensor, ...]]:
        """Per-layer pages, the form the model's forward takes: (K, V), or (K, V, K scales, V scales)
        for an 8-bit cache."""
        if self.scaled:
            return list(zip(self.k_caches, self.v_caches, self.k_scales, self.v_scales))
        return list(zip(self.k_caches, self.v_caches))

    def _pages(self) -> list[torch.Tensor]:
        """Every tensor of the pool in payload order: K0, V0, K1, V1, ..., then K0 scales, V0 scales, ..."""
        values = [t for k, v in zip(self.k_caches, self.v_caches) for t in (k, v)]
        return values + [t for k, v in zip(self.k_scales, self.v_scales) for t in (k, v)]

    def read_block(self, block_id: int) -> bytes:
        """Raw bytes of one block, layout [layers, 2, block_size, kv_heads, head_dim]."""
        parts = self.block_parts(block_id)
        if parts is not None:  # one copy: the 2 x layers page slices joined into the payload
            return b"".join(parts)
        # each page's slice as bytes (uint8 views: numpy lacks bf16 and fp8), in payload order
        return b"".join(t[block_id].contiguous().view(torch.uint8).cpu().numpy().tobytes() for t in self._pages())

    def block_parts(self, block_id: int) -> list[memoryview] | None:
        """A CPU cache's block as the slices of its pages, in payload order (read_block's bytes,
        joined), aliasing the cache: valid while the block is neither freed nor written (a pinned
        block, BlockManager.pin). None on other devices."""
        self._check_block_id(block_id)
        views = self._host_views()
        return None if views is None else [view[block_id].data for view in views]

    def write_block(self, block_id: int, data: bytes | bytearray | memoryview) -> None:
        """Inverse of read_block; ValueError if data is not exactly bytes_per_block long."""
        self._check_block_id(block_id)
        nbytes = memoryview(data).nbytes
        if nbytes != self.bytes_per_block:
            raise ValueError(
                f"KV block payload is {nbytes} bytes, expected {self.bytes_per_block} "
                f"for this cache's shape and dtype {self.dtype}"
            )
        views = self._host_views()
        if views is not None:  # one copy per page slice, straight from the (read-only) payload
            src = np.frombuffer(data, dtype=np.uint8)
            offset = 0
            for view in views:
                size = view.shape[1]
                view[block_id] = src[offset:offset + size]
                offset += size
            return
        # bytearray copy: torch.frombuffer needs a writable buffer it may alias.
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        offset = 0
        for page in self._pages():
            part = page[block_id].view(torch.uint8)
            part.copy_(raw[offset:offset + part.numel()].view(part.shape))
            offset += part.numel()

    def copy_tokens(self, src: int, dst: int, num_tokens: int) -> None:
        """Copies the K and V of the first num_tokens token slots of block src into block dst, in
        every layer (a partial prefix-cache hit: BlockManager's `copy_tokens` hook)."""
        self._check_block_id(src)
        self._check_block_id(dst)
        if not isinstance(num_tokens, int) or not 0 < num_tokens <= self.block_size:
            raise ValueError(f"num_tokens must be in [1, {self.block_size}], got {num_tokens!r}")
        for page in self._pages():
            page[dst, :num_tokens] = page[src, :num_tokens]

    def _host_views(self) -> list[np.ndarray] | None:
        """For a CPU cache: numpy uint8 views [num_blocks, bytes per page] aliasing K0, V0, K1, V1, ...
        and the scales after them (payload order), so block export and import are plain memory
        copies without per-call torch overhead. None on other devices."""
        if self.device.type != "cpu":
            return None
        if self._views is None:
            self._views = [t.view(torch.uint8).numpy().reshape(self.num_blocks, -1) for t in self._pages()]
        return self._views

    def _check_block_id(self, block_id: int) -> None:
        if not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} is outside [0, {self.num_blocks})")
