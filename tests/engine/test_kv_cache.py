"""KVCache block bytes and the KV block wire format: round trips and every kind of damage."""

import msgpack
import pytest
import xxhash
import torch

from splitserve.transfer.block import (
    LAYOUT_VERSION,
    BlockHeader,
    KVBlockError,
    check_block,
    encode_block,
    import_block,
)
from splitserve.engine.kv_cache import KVCache

SHAPE = dict(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4)
HASH = bytes(range(32))


def make_cache(dtype, num_blocks=5, seed=None):
    cache = KVCache(**SHAPE, num_blocks=num_blocks, dtype=dtype)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        for t in cache.k_caches + cache.v_caches:
            t.copy_(torch.randn(t.shape, generator=gen))
    return cache


def test_shapes_and_budget_arithmetic():
    cache = make_cache(torch.bfloat16)
    assert len(cache.k_caches) == len(cache.v_caches) == 3
    assert cache.k_caches[0].shape == (5, 4, 2, 8) and cache.k_caches[0].dtype == torch.bfloat16
    assert not cache.k_caches[0].any()
    assert cache.bytes_per_block == 3 * 2 * 4 * 2 * 8 * 2  # layers * KV * tokens * heads * dim * bytes
    assert [k for k, _ in cache.layers] == cache.k_caches
    # SmolLM2-135M-like: 30 layers, 3 KV heads, head_dim 64, block 16, bf16 -> 368,640 bytes a block.
    per_block = 30 * 2 * 16 * 3 * 64 * 2
    assert KVCache.num_blocks_for_budget(1.0, 30, 3, 64, 16, torch.bfloat16) == (1 << 30) // per_block == 2912
    assert KVCache.num_blocks_for_budget(1.0, 30, 3, 64, 16, torch.float32) == (1 << 30) // (2 * per_block)
    with pytest.raises(ValueError, match=rf"kv_cache_memory_gb=0.0001 .* {per_block} bytes"):
        KVCache.num_blocks_for_budget(0.0001, 30, 3, 64, 16, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_round_trip_between_caches(dtype):
    src = make_cache(dtype, seed=0)
    dst = make_cache(dtype, num_blocks=3)
    data = src.read_block(2)
    assert isinstance(data, bytes) and len(data) == src.bytes_per_block
    dst.write_block(1, data)
    for layer in range(3):
        assert torch.equal(dst.k_caches[layer][1], src.k_caches[layer][2])
        assert torch.equal(dst.v_caches[layer][1], src.v_caches[layer][2])
        assert not dst.k_caches[layer][0].any() and not dst.k_caches[layer][2].any()
    assert dst.read_block(1) == data


def test_copy_tokens_copies_the_leading_slots_of_every_layer():
    cache = make_cache(torch.float32, seed=3)
    before = [t.clone() for t in cache.k_caches + cache.v_caches]
    cache.copy_tokens(1, 4, 3)
    for t, old in zip(cache.k_caches + cache.v_caches, before):
        assert torch.equal(t[4, :3], old[1, :3])  # the shared tokens, K and V, in every layer
        assert torch.equal(t[4, 3:], old[4, 3:])  # the rest of the block is untouched
        assert torch.equal(t[:4], old[:4])
    for args, what in (((1, 5, 2), "outside"), ((9, 0, 2), "outside"), ((1, 2, 0), "num_tokens"),
                       ((1, 2, 5), "num_tokens")):
        with pytest.raises(ValueError, match=what):
            cache.copy_tokens(*args)


def test_payload_layout_is_layers_kv_tokens_heads_dim():
    src = make_cache(torch.float32, seed=1)
    raw = torch.frombuffer(bytearray(src.read_block(3)), dtype=torch.float32).view(3, 2, 4, 2, 8)
    assert torch.equal(raw[1, 0], src.k_caches[1][3])
    assert torch.equal(raw[2, 1], src.v_caches[2][3])


def test_write_block_rejects_wrong_length_and_id():
    cache = make_cache(torch.float32)
    n = cache.bytes_per_block
    with pytest.raises(ValueError, match=f"{n - 1} bytes, expected {n}"):
        cache.write_block(0, bytes(n - 1))
    with pytest.raises(ValueError, match="block id 5"):
        cache.read_block(5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wire_round_trip(dtype):
    src = make_cache(dtype, seed=2)
    dst = make_cache(dtype)
    header, payload = encode_block(src, 4, HASH, "model-x")
    assert header.dtype == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    assert (header.layout_version, header.payload_size) == (LAYOUT_VERSION, src.bytes_per_block)
    assert header.checksum == xxhash.xxh3_64_intdigest(payload)
    wire = header.to_bytes()
    assert b"pickle" not in wire and isinstance(msgpack.unpackb(wire), dict)
    received = BlockHeader.from_bytes(wire)
    assert received == header
    import_block(dst, 0, received, payload, "model-x", block_hash=HASH)
    assert dst.read_block(0) == src.read_block(4)


def test_flipped_payload_byte_is_a_checksum_error():
    src, dst = make_cache(torch.float32, seed=3), make_cache(torch.float32)
    header, payload = encode_block(src, 0, HASH, "m")
    damaged = bytearray(payload)
    damaged[17] ^= 0x01
    with pytest.raises(KVBlockError, match="checksum mismatch"):
        import_block(dst, 0, header, bytes(damaged), "m")
    assert not dst.k_caches[0][0].any()  # nothing written


def test_mismatches_are_named():
    src = make_cache(torch.float32, seed=4)
    header, payload = encode_block(src, 0, HASH, "m")
    with pytest.raises(KVBlockError, match="dtype mismatch: block has 'float32', this cache has 'bfloat16'"):
        check_block(header, payload, make_cache(torch.bfloat16), "m")
    with pytest.raises(KVBlockError, match="model_id mismatch"):
        check_block(header, payload, make_cache(torch.float32), "other")
    with pytest.raises(KVBlockError, match="block_hash mismatch"):
        check_block(header, payload, make_cache(torch.float32), "m", block_hash=bytes(32))
    other_shape = KVCache(num_layers=3, num_kv_heads=1, head_dim=8, block_size=4, num_blocks=2,
                          dtype=torch.float32)
    with pytest.raises(KVBlockError, match="num_kv_heads mismatch"):
        check_block(header, payload, other_shape, "m")
    with pytest.raises(KVBlockError, match="received 100 bytes.*truncated"):
        check_block(header, payload[:100], make_cache(torch.float32), "m")


def test_malformed_headers_are_named():
    header, _ = encode_block(make_cache(torch.float32), 0, HASH, "m")
    good = msgpack.unpackb(header.to_bytes())
    with pytest.raises(KVBlockError, match="not valid msgpack"):
        BlockHeader.from_bytes(b"\xc1garbage")
    with pytest.raises(KVBlockError, match="not valid msgpack"):
        BlockHeader.from_bytes(b"")
    with pytest.raises(KVBlockError, match="must be a msgpack map, got list"):
        BlockHeader.from_bytes(msgpack.packb([1, 2]))
    missing = {k: v for k, v in good.items() if k != "xxh3"}
    with pytest.raises(KVBlockError, match="missing field.*'checksum' \\(key 'xxh3'\\)"):
        BlockHeader.from_bytes(msgpack.packb(missing))
    for key, value, field in [
        ("layers", "3", "num_layers"), ("layers", True, "num_layers"), ("size", -1, "payload_size"),
        ("hash", "abc", "block_hash"), ("model", "", "model_id"), ("dtype", "int4", "dtype"), ("dtype", "fp8", "dtype"),
        ("xxh3", -1, "checksum"), ("xxh3", 1.5, "checksum"),
    ]:
        with pytest.raises(KVBlockError, match=f"'{field}'"):
            BlockHeader.from_bytes(msgpack.packb({**good, key: value}))
    with pytest.raises(KVBlockError, match="'layout_version' is 1"):
        BlockHeader.from_bytes(msgpack.packb({**good, "layout": 1}))
    # Unknown keys from a newer sender are ignored.
    assert BlockHeader.from_bytes(msgpack.packb({**good, "extra": 1})) == header
    assert issubclass(KVBlockError, ValueError)


# ----------------------------------------------------------------------------- 8-bit caches
EIGHT_BIT = [torch.int8, torch.float8_e4m3fn]


def make_scaled_cache(dtype, num_blocks=5, seed=0):
    """An 8-bit cache holding the quantized form of random K/V (written as write_kv_torch writes)."""
    from splitserve.kernels import kv_quant
    from splitserve.model.attention import write_kv_torch

    cache = KVCache(**SHAPE, num_blocks=num_blocks, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    slots = torch.arange(num_blocks * SHAPE["block_size"])
    for layer in cache.layers:
        k, v = (torch.randn(len(slots), 2, 8, generator=gen) * 3 for _ in range(2))
        write_kv_torch(k, v, layer[0], layer[1], slots, layer[2], layer[3])
        assert torch.equal(layer[2].view(-1, 2), kv_quant.quantize(k, cache.dtype_name)[1])
    return cache


@pytest.mark.parametrize("dtype", EIGHT_BIT, ids=["int8", "fp8_e4m3"])
def test_scaled_block_bytes_are_values_then_scales(dtype):
    from splitserve.engine import memory

    cache = make_scaled_cache(dtype)
    assert cache.scaled and len(cache.layers[0]) == 4
    assert cache.k_scales[0].shape == (5, 4, 2) and cache.k_scales[0].dtype == torch.float32
    # 1 byte an element and a float32 scale per token and kv head; engine.memory counts the same
    assert cache.bytes_per_block == 3 * 2 * 4 * 2 * (8 + 4) == memory.kv_block_bytes(3, 2, 8, 4, cache.dtype_name)
    payload = cache.read_block(2)
    assert len(payload) == cache.bytes_per_block
    values = 3 * 2 * 4 * 2 * 8  # K0 V0 K1 V1 K2 V2 first, then their scales in the same order
    assert payload[:64 * 2] == cache.k_caches[0][2].view(torch.uint8).numpy().tobytes() \
        + cache.v_caches[0][2].view(torch.uint8).numpy().tobytes()
    assert payload[values:values + 32] == cache.k_scales[0][2].numpy().tobytes()
    assert payload[-32:] == cache.v_scales[2][2].numpy().tobytes()


@pytest.mark.parametrize("dtype", EIGHT_BIT, ids=["int8", "fp8_e4m3"])
def test_scaled_blocks_round_trip_with_their_scales(dtype):
    src = make_scaled_cache(dtype, seed=1)
    dst = KVCache(**SHAPE, num_blocks=5, dtype=dtype)
    header, payload = encode_block(src, 3, HASH, "m")
    assert header.dtype == src.dtype_name and header.payload_size == src.bytes_per_block
    header = BlockHeader.from_bytes(header.to_bytes())  # through the wire
    import_block(dst, 1, header, payload, "m", HASH)
    for a, b in zip(src.layers, dst.layers):
        for t_src, t_dst in zip(a, b):
            assert torch.equal(t_src[3].view(torch.uint8), t_dst[1].view(torch.uint8))
    assert dst.read_block(1) == payload and not dst.k_scales[0][0].any()  # other pages untouched
    dst.copy_tokens(1, 4, 3)  # a partial prefix hit copies the scales with the values
    assert torch.equal(dst.k_scales[1][4, :3], src.k_scales[1][3, :3]) and not dst.k_scales[1][4, 3].any()
    assert torch.equal(dst.v_caches[2][4, :3].view(torch.uint8), src.v_caches[2][3, :3].view(torch.uint8))


@pytest.mark.parametrize("sender, receiver", [
    (torch.float32, torch.int8), (torch.int8, torch.float32), (torch.int8, torch.float8_e4m3fn),
    (torch.float8_e4m3fn, torch.int8), (torch.bfloat16, torch.float8_e4m3fn),
])
def test_a_block_of_another_kv_dtype_is_refused_never_misread(sender, receiver):
    """int8 and fp8 blocks have the same size: only the header's dtype tells them apart, and the
    receiver refuses (the block is recomputed) rather than reinterpret the bytes."""
    src = make_scaled_cache(sender) if sender in EIGHT_BIT else make_cache(sender, seed=2)
    dst = KVCache(**SHAPE, num_blocks=5, dtype=receiver)
    header, payload = encode_block(src, 0, HASH, "m")
    with pytest.raises(KVBlockError, match="dtype mismatch: block has '.*', this cache has '.*'"):
        import_block(dst, 0, header, payload, "m", HASH)
    assert all(not t.view(torch.uint8).any() for layer in dst.layers for t in layer)  # nothing written


def test_scaled_header_names_and_unknown_cache_dtypes():
    for name in ("int8", "fp8_e4m3"):
        header, _ = encode_block(make_scaled_cache(torch.int8 if name == "int8" else torch.float8_e4m3fn), 0, HASH, "m")
        assert BlockHeader.from_bytes(header.to_bytes()).dtype == name
    with pytest.raises(ValueError, match="dtype must be one of"):
        KVCache(**SHAPE, num_blocks=2, dtype=torch.uint8)


@pytest.mark.parametrize("dtype", EIGHT_BIT, ids=["int8", "fp8_e4m3"])
def test_the_torch_write_path_stores_the_c_kernel_s_bits(dtype, monkeypatch):
    """write_kv_torch quantizes with torch when the C kernel is off (SPLITSERVE_CPU_ATTENTION=torch,
    or not built): the same values and scales."""
    kernel = make_scaled_cache(dtype, seed=3)
    monkeypatch.setenv("SPLITSERVE_CPU_ATTENTION", "torch")
    torch_path = make_scaled_cache(dtype, seed=3)
    for a, b in zip(kernel.layers, torch_path.layers):
        for t_a, t_b in zip(a, b):
            assert torch.equal(t_a.view(torch.uint8), t_b.view(torch.uint8))
