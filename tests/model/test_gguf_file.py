"""The GGUF reader against the `gguf` package's own: the same metadata and the same tensor bytes, on
the default model and on a small file with every metadata type; malformed bytes are refused with a
message that says what and where."""
from __future__ import annotations

import struct
import subprocess
import sys

import gguf
import numpy as np
import pytest

from splitserve.model.gguf_file import BLOCK_SIZES, GGMLType, GGUFFile, GGUFFormatError
from splitserve.model.paths import default_model_path


def _same_as_gguf_package(path) -> GGUFFile:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, value in ours.fields.items():
        expected = theirs.fields[key].contents()
        assert value == expected, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(b.shape.tolist()), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name
    return ours


def test_the_element_types_and_block_sizes_are_the_gguf_packages():
    for kind in GGMLType:
        theirs = gguf.GGMLQuantizationType[kind.name]
        assert int(kind) == int(theirs) and BLOCK_SIZES[kind] == gguf.GGML_QUANT_SIZES[theirs], kind.name
    assert set(BLOCK_SIZES) == set(GGMLType)


def test_loading_the_default_model_imports_no_gguf():
    """The reader and the loader need the package only to dequantize blocks they do not keep (its
    import, with PyYAML, maps 3.5 MiB in every worker)."""
    code = ("import sys; from splitserve.engine.llm_engine import LLMEngine; "
            "from splitserve.config.engine import EngineConfig; "
            "e = LLMEngine(EngineConfig.from_kwargs(kv_cache_memory_gb=0.02)); "
            "print(e.model.args.num_layers, sorted(m for m in sys.modules if m.split('.')[0] in ('gguf', 'yaml')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["30", "[]"]


def test_default_model_reads_as_the_gguf_package_reads_it():
    f = _same_as_gguf_package(default_model_path())
    assert f.fields["general.architecture"] == "llama"
    assert len(f.fields["tokenizer.ggml.tokens"]) == 49152
    assert {t.tensor_type.name for t in f.tensors} >= {"Q4_1", "F32"}


def _write_small(path, alignment: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "naïve ☃ 𝄞")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.floats", [0.5, -1.0])
    w.add_array("t.bools", [True, False])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 4)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_metadata_type_and_tensor_kind(tmp_path, alignment):
    path = tmp_path / "small.gguf"
    _write_small(path, alignment)
    f = _same_as_gguf_package(path)
    assert f.fields["t.str"] == "naïve ☃ 𝄞" and f.fields["t.strs"] == ["a", "", "ü"]
    assert f.fields["t.u64"] == 2**63 + 5 and f.fields["t.bools"] == [True, False]
    q8 = next(t for t in f.tensors if t.name == "q8")
    assert q8.shape == (64, 2) and q8.data.shape == (2, 68)  # two rows of two 34-byte Q8_0 blocks


def _header(version: int = 3, n_tensors: int = 0, n_fields: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_fields)


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", kind) + payload


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "not a GGUF file"),
    (b"GGML" + bytes(40), "not a GGUF file"),
    (_header(version=1), "GGUF version 1 is not supported"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    (_header()[:10], "ends at byte 10 inside its header"),
    (_header(n_fields=1) + _kv("k", 99, b""), "unknown metadata value type 99"),
    (_header(n_fields=1) + _kv("k", 8, struct.pack("<Q", 10**12)), "runs past the end"),
    (_header(n_fields=1) + _kv("k", 9, struct.pack("<IQ", 8, 10**15)), "claims 1000000000000000 items"),
    (_header(n_fields=1) + _kv("k", 9, struct.pack("<IQ", 4, 10**6)), "runs past the end"),
    (_header(n_fields=1) + _kv("k", 8, struct.pack("<Q", 2) + b"\xff\xfe"), "not UTF-8"),
    (_header(n_tensors=1) + struct.pack("<Q", 1) + b"w" + struct.pack("<I", 0), "0 dimensions"),
    (_header(n_tensors=1) + struct.pack("<Q", 1) + b"w" + struct.pack("<IQI", 1, 4, 77), "unknown element type 77"),
    (_header(n_tensors=1) + struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 33, 2, 0), "not whole Q4_0 blocks"),
    (_header(n_tensors=1) + struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 4, 0, 0), "truncated"),
    (_header(n_fields=1) + _kv("general.alignment", 4, struct.pack("<I", 3)), "not a power of two"),
])
def test_malformed_bytes_are_refused_by_name(tmp_path, raw, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    with pytest.raises(GGUFFormatError, match=message) as info:
        GGUFFile(path)
    assert "bad.gguf" in str(info.value)
