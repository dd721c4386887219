"""`splitserve plan` and a worker's real KV pool agree: the session's float32 engine (no second
load) allocated exactly the blocks the plan counts for its budget, each as many bytes as the plan's
block, and caps its sequences where the plan says."""
from __future__ import annotations

import pytest
from splitserve.launch.plan import PlanInputs, make_plan


def _plan_for(engine, budget_gb: float) -> dict:
    cc = engine.config.cache
    return make_plan(PlanInputs(kv_cache_memory_gb=budget_gb, kv_cache_dtype=engine.config.model.dtype,
                                block_size=cc.block_size, context_len=256))


def test_plan_counts_the_blocks_the_worker_allocated(llm_f32):
    engine = llm_f32.engine
    plan = _plan_for(engine, engine.config.cache.kv_cache_memory_gb)
    kv = engine.kv_cache
    assert plan["kv_pool_blocks"] == kv.num_blocks == engine.block_manager.num_blocks
    assert plan["kv_pool_tokens"] == kv.num_blocks * kv.block_size
    # the bytes the worker's tensors really hold, all layers, K and V, over its blocks
    allocated = sum(t.nbytes for t in kv.k_caches + kv.v_caches)
    assert plan["kv_block_bytes_per_device"] * kv.num_blocks == allocated
    assert plan["max_model_len"] == engine.max_model_len
    assert plan["max_batch_size"] == kv.num_blocks // (256 // kv.block_size)
    assert (plan["num_layers"], plan["num_kv_heads"], plan["head_dim"]) == (kv.num_layers, kv.num_kv_heads, kv.head_dim)


@pytest.mark.parametrize("budget_gb", [0.001, 0.06, 0.25, 3.7])
def test_plan_and_the_engine_size_any_budget_alike(llm_f32, budget_gb):
    """The engine's own sizing call (KVCache.num_blocks_for_budget, torch dtype) for other budgets."""
    from splitserve.engine.kv_cache import KVCache
    from splitserve.model.loader import TORCH_DTYPES

    engine = llm_f32.engine
    args, cc = engine.model.args, engine.config.cache
    blocks = KVCache.num_blocks_for_budget(budget_gb, args.num_layers, args.num_kv_heads, args.head_dim,
                                           cc.block_size, TORCH_DTYPES[engine.config.model.dtype])
    assert _plan_for(engine, budget_gb)["kv_pool_blocks"] == blocks


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3", "bfloat16"])
def test_plan_counts_an_other_kv_dtype_s_pool_with_its_scales(llm_f32, kv_dtype):
    """--kv-cache-dtype: the worker's pool (values and, for 8 bits, the float32 scales beside them)
    is what the plan counts for that dtype."""
    engine = llm_f32.with_config(kv_cache_memory_gb=0.02, kv_cache_dtype=kv_dtype).engine
    kv = engine.kv_cache
    plan = make_plan(PlanInputs(kv_cache_memory_gb=0.02, kv_cache_dtype=kv_dtype,
                                block_size=engine.config.cache.block_size, context_len=256))
    assert kv.dtype_name == kv_dtype and plan["kv_pool_blocks"] == kv.num_blocks
    allocated = sum(t.nbytes for t in kv.k_caches + kv.v_caches + kv.k_scales + kv.v_scales)
    assert plan["kv_block_bytes_per_device"] * kv.num_blocks == allocated
    assert bool(kv.k_scales) == (kv_dtype != "bfloat16")
