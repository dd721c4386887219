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
        ("hash", "abc", "block_hash"), ("model", "", "model_id"), ("dtype", "int8", "dtype"),
        ("xxh3", -1, "checksum"), ("xxh3", 1.5, "checksum"),
    ]:
        with pytest.raises(KVBlockError, match=f"'{field}'"):
            BlockHeader.from_bytes(msgpack.packb({**good, key: value}))
    with pytest.raises(KVBlockError, match="'layout_version' is 1"):
        BlockHeader.from_bytes(msgpack.packb({**good, "layout": 1}))
    # Unknown keys from a newer sender are ignored.
    assert BlockHeader.from_bytes(msgpack.packb({**good, "extra": 1})) == header
    assert issubclass(KVBlockError, ValueError)
