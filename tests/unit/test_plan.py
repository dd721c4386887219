"""`splitserve plan`: the seed's worked example, exact weight bytes of real files, the KV arithmetic
shared with the worker, and errors that name what is wrong. No model is loaded (a GGUF file's
header and a safetensors header are read, never the weights)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from splitserve.engine import memory
from splitserve.launch.plan import PlanInputs, format_plan, make_plan
from splitserve.launch.plan_model import NAMED_SHAPES, weight_bytes
from splitserve.model.gguf_file import GGUFFile
from splitserve.model.paths import default_model_path

GIB = 1 << 30
SEED = dict(model="llama-3-70b", batch_size=32, context_len=4096, device_memory_gb=80)
REQUIRED_KEYS = {"weights_bytes", "kv_bytes_per_token", "kv_bytes", "total_bytes", "devices_needed",
                 "max_batch_size", "model", "quantization", "kv_cache_dtype", "batch_size", "context_len",
                 "device_memory_gb", "tensor_parallel_size"}


def test_seed_example_70b_fp16_needs_three_80gb_devices():
    plan = make_plan(PlanInputs(**SEED, quantization="none"))
    # 70.55 B parameters x 2 bytes; KV: 2 x 80 layers x 8 heads x 128 dims x 2 bytes a token
    assert plan["parameters"] == 70_553_706_496
    assert plan["weights_bytes"] == 2 * plan["parameters"]
    assert plan["kv_bytes_per_token"] == 2 * 80 * 8 * 128 * 2 == 327_680
    assert plan["kv_bytes"] == 32 * 4096 * 327_680  # 4096 tokens are 256 whole blocks: 40 GiB
    assert not plan["fits"] and plan["max_batch_size"] == 0
    assert plan["devices_needed"] == 3  # "at least 3x A100 80GB (240 GB total)"
    assert plan["tensor_parallel_size_needed"] == 4  # 3 does not split 64 heads


def test_seed_example_70b_awq_fits_one_80gb_device_with_room_for_the_kv():
    plan = make_plan(PlanInputs(**SEED, quantization="awq"))
    # "~35 GB": 4 bits per weight plus group-128 scales and zeros, embedding and LM head 16-bit
    assert 35 * GIB < plan["weights_bytes"] < 38 * GIB
    room = 80 * GIB - plan["weights_bytes"] - plan["overhead_bytes_per_device"]
    assert room > 40 * GIB  # "leaving 45 GB for KV cache" (41.8 GiB = 44.9e9 bytes)
    assert plan["fits"] and plan["devices_needed"] == 1 and plan["tensor_parallel_size_needed"] == 1
    assert plan["max_batch_size"] >= 32
    assert plan["max_batch_size"] == room // (256 * plan["kv_block_bytes_per_device"])


def test_q4_k_m_matches_llama_cpp_published_size():
    """llama.cpp lists Meta-Llama-3-8B Q4_K_M at 4.58 GiB, 4.89 bits per weight."""
    size, params = weight_bytes(NAMED_SHAPES["llama-3-8b"], "Q4_K_M")
    assert round(size / GIB, 2) == 4.58
    assert 4.85 <= size * 8 / params <= 4.9


@pytest.mark.parametrize("scheme, bits", [("none", 16), ("int8", 8), ("fp8", 8), ("gptq", 4), ("awq", 4)])
def test_linear_layers_cost_their_bits_plus_scales(scheme, bits):
    s = NAMED_SHAPES["llama-3-8b"]
    embed_and_head = 2 * s.vocab_size * s.hidden_size * 2
    norms = (2 * s.num_layers + 1) * s.hidden_size * 2
    size, params = weight_bytes(s, scheme)
    linear = params - 2 * s.vocab_size * s.hidden_size - (2 * s.num_layers + 1) * s.hidden_size
    extra = size - embed_and_head - norms - linear * bits // 8
    # per layer, 7 matrices: rows (outputs) and cols (inputs)
    rows = s.num_layers * (2 * 4096 + 2 * 1024 + 2 * 14336 + 4096)
    cols = s.num_layers * (6 * 4096 + 14336)
    # int8 and fp8: a float32 scale a row; 4-bit: a float16 scale and a 4-bit zero per
    # 128 inputs of a row (2.5 bytes), gptq also an int32 group index per input
    expected = {"none": 0, "int8": 4 * rows, "fp8": 4 * rows, "awq": linear // 128 * 5 // 2,
                "gptq": linear // 128 * 5 // 2 + 4 * cols}
    assert extra == expected[scheme]


def test_the_default_model_file_weighs_its_tensors():
    path = default_model_path()
    tensors = GGUFFile(path).tensors
    plan = make_plan(PlanInputs())  # no MODEL: the workers' default model, read from its file
    assert plan["source"] == "gguf file" and plan["model"] == path.name and plan["quantization"] is None
    assert plan["weights_bytes"] == sum(t.data.nbytes for t in tensors) == 96_576_768
    for t in tensors:  # each tensor's bytes are its elements in its type's blocks
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        assert t.data.nbytes == int(np.prod(t.shape)) // block * size, t.name
    # the named shape with the file's scheme (llama.cpp's Q4_1: tied embedding as the head, Q8_0) agrees
    shape_plan = make_plan(PlanInputs(model="smollm2-135m-instruct", quantization="Q4_1"))
    assert shape_plan["weights_bytes"] == plan["weights_bytes"]
    assert shape_plan["parameters"] == plan["parameters"] == sum(int(np.prod(t.shape)) for t in tensors)
    assert "as stored (Q4_1 x210, F32 x61, Q8_0 x1)" in format_plan(plan)


def test_hf_folder_and_config_json(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    config = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {"a": torch.zeros(256, 64, dtype=torch.bfloat16), "b": torch.zeros(3, 5, dtype=torch.float32)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    plan = make_plan(PlanInputs(model=str(tmp_path), context_len=512))
    assert plan["source"] == "hf folder"
    assert plan["weights_bytes"] == 256 * 64 * 2 + 15 * 4 and plan["parameters"] == 256 * 64 + 15
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # layers x K,V x kv heads x head_dim x bf16
    other = tmp_path / "other.json"
    other.write_text(json.dumps(config))
    shape_only = make_plan(PlanInputs(model=str(other), context_len=512))
    assert shape_only["source"] == "config.json" and shape_only["quantization"] == "none"
    assert shape_only["parameters"] == 2 * 256 * 64 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128 + 128) + 64


def test_kv_layout_of_every_dtype():
    # [layers, K|V, block, heads, dim] elements, plus one float32 scale per layer, K|V, token and head for 8-bit
    assert memory.kv_block_bytes(30, 3, 64, 16, "float32") == 30 * 2 * 16 * 3 * 64 * 4
    assert memory.kv_block_bytes(30, 3, 64, 16, "bfloat16") == memory.kv_block_bytes(30, 3, 64, 16, "float16")
    assert memory.kv_block_bytes(30, 3, 64, 16, "fp8_e4m3") == 30 * 2 * 16 * 3 * (64 + 4)
    assert memory.kv_block_bytes(30, 3, 64, 16, "int8") == 30 * 2 * 16 * 3 * (64 + 4)
    assert memory.kv_bytes_per_token(80, 8, 128, 16, "fp8_e4m3") == 2 * 80 * 8 * (128 + 4)
    fp8 = make_plan(PlanInputs(**SEED, quantization="awq", kv_cache_dtype="fp8_e4m3"))
    assert fp8["kv_bytes_per_token"] == 168_960 and fp8["max_batch_size"] > 60
    with pytest.raises(ValueError, match="'int4' is not one of float32, bfloat16, float16, fp8_e4m3, int8"):
        memory.kv_block_bytes(1, 1, 1, 16, "int4")


def test_tensor_parallel_splits_weights_and_kv_heads():
    one = make_plan(PlanInputs(**SEED, quantization="none"))
    four = make_plan(PlanInputs(**SEED, quantization="none", tensor_parallel_size=4))
    assert four["weights_bytes_per_device"] == one["weights_bytes"] // 4
    assert four["kv_bytes_per_device"] * 4 == one["kv_bytes"] == four["kv_bytes"]
    assert four["fits"] and four["max_batch_size"] >= 32
    # 16 devices hold 8 KV heads one each, replicated twice: the KV in all is twice the workload's
    sixteen = make_plan(PlanInputs(**SEED, quantization="none", tensor_parallel_size=16))
    assert sixteen["kv_bytes"] == 2 * one["kv_bytes"]


@pytest.mark.parametrize("inputs, message", [
    (dict(model="llama-9-900b"), "MODEL 'llama-9-900b' is neither a file or folder nor a named shape"),
    (dict(model="llama-3-8b", context_len=100_000), "--context-len 100000 exceeds llama-3-8b's context length 8192"),
    (dict(model="llama-3-8b", tensor_parallel_size=3), "--tensor-parallel-size 3 does not split llama-3-8b's 32"),
    (dict(model="llama-3-8b", quantization="Q3_XXL"), "--quantization 'Q3_XXL' is not one of none, int8"),
    (dict(model="llama-3-8b", block_size=12), "--block-size must be a positive power of two, got 12"),
    (dict(model="llama-3-8b", kv_cache_memory_gb=0.0001), "kv_cache_memory_gb=0.0001 holds no KV block"),
])
def test_errors_name_the_flag(inputs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make_plan(PlanInputs(**inputs))


def test_a_file_that_is_no_model(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_text("not a model\n")
    with pytest.raises(ValueError, match=f"{bad}: not a GGUF file"):
        make_plan(PlanInputs(model=str(bad)))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        make_plan(PlanInputs(model=str(tmp_path / "config.json")))
