"""Block hashing: exact sha256 vectors computed here with hashlib, chaining, determinism across processes."""
import hashlib
import os
import struct
import subprocess
import sys

import pytest

from splitserve.engine.hashing import (
    HASH_SCHEME_VERSION,
    ROOT_HASH,
    block_hashes,
    extend_block_hashes,
    hash_block,
    hash_namespace,
)


def lp(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def reference_namespace(model_id: str, salt: str) -> bytes:
    return hashlib.sha256(
        lp(b"splitserve.block-hash") + struct.pack("<I", HASH_SCHEME_VERSION)
        + lp(model_id.encode()) + lp(salt.encode())
    ).digest()


def test_namespace_matches_reference_encoding():
    assert HASH_SCHEME_VERSION == 1
    assert hash_namespace("m") == reference_namespace("m", "")
    assert hash_namespace("m", "s") == reference_namespace("m", "s")
    assert len(hash_namespace("m")) == 32


def test_namespace_is_unambiguous():
    assert hash_namespace("ab", "c") != hash_namespace("a", "bc")
    assert hash_namespace("m", "s") != hash_namespace("m")
    assert hash_namespace("m", "") == hash_namespace("m", None)  # an empty salt is no salt
    assert hash_namespace("m1") != hash_namespace("m2")


def test_hash_block_known_vector():
    ns = hash_namespace("model")
    expected = hashlib.sha256(bytes(32) + ns + bytes.fromhex("01000000" "02000000" "ffffffff")).digest()
    assert ROOT_HASH == bytes(32)
    assert hash_block(ROOT_HASH, ns, [1, 2, 2**32 - 1]) == expected


def test_block_hashes_chain_and_partial_block():
    ns = hash_namespace("model")
    tokens = list(range(10))  # block_size 4: two full blocks, 2 tokens left unhashed
    h0 = hashlib.sha256(bytes(32) + ns + struct.pack("<4I", 0, 1, 2, 3)).digest()
    h1 = hashlib.sha256(h0 + ns + struct.pack("<4I", 4, 5, 6, 7)).digest()
    assert block_hashes(tokens, 4, ns) == [h0, h1]
    assert block_hashes(tokens[:7], 4, ns) == [h0]
    assert block_hashes(tokens[:3], 4, ns) == []
    # A continuation chained from its parent equals the tail of the whole.
    assert block_hashes(tokens[4:], 4, ns, parent=h0) == [h1]


def test_same_block_different_prefix_differs():
    ns = hash_namespace("model")
    a = block_hashes([1, 2, 3, 4, 9, 9, 9, 9], 4, ns)
    b = block_hashes([5, 6, 7, 8, 9, 9, 9, 9], 4, ns)
    assert a[1] != b[1]


def test_extend_is_incremental():
    ns = hash_namespace("model")
    tokens = list(range(20))
    hashes: list[bytes] = []
    for n in range(len(tokens) + 1):
        extend_block_hashes(hashes, tokens[:n], 4, ns)
        assert len(hashes) == n // 4
    assert hashes == block_hashes(tokens, 4, ns)
    with pytest.raises(ValueError, match="5 entries but token_ids holds only 1 full blocks"):
        extend_block_hashes(hashes, tokens[:7], 4, ns)


def test_salt_changes_every_hash():
    tokens = list(range(8))
    plain = block_hashes(tokens, 4, hash_namespace("model"))
    salted = block_hashes(tokens, 4, hash_namespace("model", "tenant-a"))
    assert len(plain) == len(salted) == 2
    assert not set(plain) & set(salted)


def test_token_id_out_of_range_is_named():
    ns = hash_namespace("model")
    with pytest.raises(ValueError, match="token id -1"):
        block_hashes([0, 1, -1, 2], 4, ns)
    with pytest.raises(ValueError, match=f"token id {2**32}"):
        hash_block(ROOT_HASH, ns, [2**32])
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1], 0, ns)
    with pytest.raises(ValueError, match="namespace must be 32 bytes"):
        hash_block(ROOT_HASH, b"short", [1])


def test_same_hashes_in_another_process():
    code = (
        "from splitserve.engine.hashing import block_hashes, hash_namespace;"
        "print(','.join(h.hex() for h in block_hashes(list(range(50)), 16, hash_namespace('m', 's'))))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # Python's hash() would differ; ours must not
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = ",".join(h.hex() for h in block_hashes(list(range(50)), 16, hash_namespace("m", "s")))
    assert out.stdout.strip() == here
