"""kernels/cpu_layers.c: a decode step's layers in one C call give the very bits of the layer-by-layer
path (greedy tokens and every logprob), in the exact and the int8 modes, alone and in batches; the
step falls back to the layers where it cannot run; bad indices are refused before any is followed."""
from __future__ import annotations

import contextlib

import pytest
import torch

from splitserve import SamplingParams
from splitserve.kernels import cpu_layers
from splitserve.kernels.cpu_layers import FusedDecode
from splitserve.model.attention import AttentionMetadata

pytestmark = pytest.mark.skipif(not cpu_layers.available(), reason="the fused decode kernel is not built for this CPU")

PROMPTS = ["The capital of France is", "def fib(n):\n    ", "Once upon a time, in a small village by the sea, there"]


@contextlib.contextmanager
def fused(llm, on: bool, mode: str = "exact"):
    """The model with its fused decode on or off and its quantized matmul in `mode`, counting the
    fused steps; restored after."""
    model = llm.engine.model
    saved, calls = model.fused_decode, []
    assert saved is not None, "the default model at float32 should decode through the fused kernel"
    run = saved.run

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return run(*args, **kwargs)

    model.fused_decode = saved if on else None
    saved.run = counting
    model.set_quantized_matmul(mode)
    try:
        yield calls
    finally:
        del saved.run
        model.fused_decode = saved
        model.set_quantized_matmul(llm.engine.quantized_matmul)
        # KV computed in another mode must not serve later tests' prefix hits (the cache is keyed
        # by tokens, not by how they were computed)
        assert llm.engine.block_manager.reset_prefix_cache()


def _outputs(llm, prompts, **kw):
    assert llm.engine.block_manager.reset_prefix_cache()  # every run computes its prompts alike
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, **kw)
    return [(o.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs])
            for o in llm.generate(prompts, params)]


# a prompt whose prefill step has more rows than the few-row kernel takes (cpu_quant.max_rows(), 48)
LONG = "A list of the rivers of Europe, from the longest to the shortest, with their sources: " * 4


@pytest.mark.parametrize("mode", ["exact", "int8"])
def test_fused_decode_gives_the_layer_by_layer_bits(llm_f32, mode):
    # int8: with a prefill step of more rows than max_rows, which runs fused too (in the exact mode
    # it would run layer by layer, its float GEMM batch-dependent: see the test below)
    prompts = PROMPTS + ([LONG] if mode == "int8" else [])
    with fused(llm_f32, True, mode) as calls:
        batch = _outputs(llm_f32, prompts)
        alone = _outputs(llm_f32, prompts[:1])
    assert len(prompts) in calls and 1 in calls  # batched and single decode steps ran fused (prefills too)
    assert (max(calls) > llm_f32.engine.model.fused_decode.max_rows) == (mode == "int8")
    with fused(llm_f32, False, mode) as calls:
        reference = _outputs(llm_f32, prompts)
    assert not calls
    assert batch == reference  # token ids and logprobs, to the bit
    assert alone[0] == reference[0]  # and a row's bits do not depend on the others in its step


@pytest.mark.parametrize("mode", ["exact", "int8"])
def test_more_rows_than_the_kernel_takes_run_layer_by_layer_in_the_exact_mode(llm_f32, mode):
    fd = llm_f32.engine.model.fused_decode
    saved, fd.max_rows = fd.max_rows, 2  # (the real limit, cpu_quant.max_rows(), is 48 rows)
    try:
        with fused(llm_f32, True, mode) as calls:
            out = llm_f32.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    finally:
        fd.max_rows = saved
    assert all(len(o.token_ids) == 3 for o in out)
    if mode == "exact":
        assert not calls  # every step had 3 rows or more: each ran through the layers
    else:  # the int8 kernel takes any number of rows: every step ran fused
        assert 3 in calls and max(calls) > 3


def test_bad_indices_are_refused_and_the_model_keeps_serving(llm_f32):
    engine = llm_f32.engine
    model, kv = engine.model, engine.runner._kv_pairs
    hidden = model.args.hidden_size
    blocks, block_size = kv[0][0].shape[0], kv[0][0].shape[1]
    x = torch.zeros(1, hidden)
    rope = model.rotary.lookup(torch.tensor([3]), torch.float32)

    def meta(slot: int, block: int, length: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=torch.tensor([slot]), num_decodes=1,
                                 decode_block_tables=torch.tensor([[block]], dtype=torch.int32),
                                 decode_seq_lens=torch.tensor([length], dtype=torch.int32), decode_mask=None,
                                 prefill_query_lens=(), prefill_seq_lens=(), prefill_block_tables=(),
                                 cpu_kernel=True)

    with pytest.raises(ValueError, match="slot"):
        model.fused_decode.run(x.clone(), rope, kv, meta(blocks * block_size, 0, 4))
    with pytest.raises(ValueError, match="block id"):
        model.fused_decode.run(x.clone(), rope, kv, meta(3, blocks, 4))
    with pytest.raises(ValueError, match="context length"):
        model.fused_decode.run(x.clone(), rope, kv, meta(3, 0, block_size + 1))
    out = llm_f32.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=3))
    assert len(out[0].token_ids) == 3


def test_the_last_layer_runs_for_the_read_rows_alone_with_their_bits(llm_f32):
    """meta.output_rows: every row's K/V is written in every layer, but the last layer attends and
    runs its MLP for those rows only, which get the bits of a step computing every row; kept rows
    that do not ascend inside the step are refused."""
    engine = llm_f32.engine
    model, kv = engine.model, engine.runner._kv_pairs
    fd = model.fused_decode
    rows, gen = 5, torch.Generator().manual_seed(5)
    x = torch.randn(rows, model.args.hidden_size, generator=gen)
    rope = model.rotary.lookup(torch.arange(3, 3 + rows), torch.float32)

    def meta(output_rows) -> AttentionMetadata:  # one sequence's positions 3..7 in block 0
        return AttentionMetadata(slot_mapping=torch.arange(3, 3 + rows), num_decodes=rows,
                                 decode_block_tables=torch.zeros((rows, 1), dtype=torch.int32),
                                 decode_seq_lens=torch.arange(4, 4 + rows, dtype=torch.int32), decode_mask=None,
                                 prefill_query_lens=(), prefill_seq_lens=(), prefill_block_tables=(),
                                 cpu_kernel=True, output_rows=output_rows)

    def cache_rows():
        return [(k[0, 3:3 + rows].clone(), v[0, 3:3 + rows].clone()) for k, v in kv]

    for mode in ("exact", "int8"):
        model.set_quantized_matmul(mode)
        try:
            full = fd.run(x.clone(), rope, kv, meta(None))
            full_cache = cache_rows()
            for kept in ([4], [0, 2, 4], [1], []):
                for k, v in kv:  # the next run writes them again
                    k[0, 3:3 + rows] = 0
                    v[0, 3:3 + rows] = 0
                out = fd.run(x.clone(), rope, kv, meta(torch.tensor(kept, dtype=torch.int32)))
                assert torch.equal(out[kept], full[kept]), (mode, kept)
                for (k, v), (k_full, v_full) in zip(cache_rows(), full_cache):
                    assert torch.equal(k, k_full) and torch.equal(v, v_full)
            with pytest.raises(ValueError, match="ascend"):
                fd.run(x.clone(), rope, kv, meta(torch.tensor([2, 1], dtype=torch.int32)))
        finally:
            model.set_quantized_matmul(engine.quantized_matmul)
    assert engine.block_manager.reset_prefix_cache()  # block 0's K/V were written outside the engine


def test_a_bfloat16_cache_runs_layer_by_layer(llm_bf16):
    """bfloat16 of the default model computes in float32 on its blocks (FusedDecode could take its
    layers) with a bfloat16 KV cache, whose pages the fused step does not read: every step runs
    layer by layer."""
    model = llm_bf16.engine.model
    assert model.compute_dtype == torch.float32 and llm_bf16.engine.kv_cache.k_caches[0].dtype == torch.bfloat16
    assert FusedDecode.supported(model)
    with fused(llm_bf16, True, llm_bf16.engine.quantized_matmul) as calls:
        out = llm_bf16.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert all(len(o.token_ids) == 3 for o in out) and not calls


def test_int8_mode_gives_the_same_bits_cold_cached_and_batched(llm_f32):
    """In int8 mode every projection runs the int8 kernel at every row count, so a prompt's greedy
    tokens and logprobs do not depend on how its prefill was cut: cold (one chunk of 70 rows),
    after a full-block prefix hit (a few rows), or beside other prompts."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 7  # ~70 tokens
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)

    def run(prompts):
        return [(o.token_ids, [(lp.token_id, lp.logprob) for lp in o.logprobs], o.num_cached_tokens)
                for o in llm_f32.generate(prompts, params)]

    with fused(llm_f32, True, "int8"):
        assert llm_f32.engine.block_manager.reset_prefix_cache()
        cold = run([prompt])[0]
        cached = run([prompt])[0]
        assert llm_f32.engine.block_manager.reset_prefix_cache()
        batched = run(PROMPTS + [prompt])[-1]
    assert cold[2] == 0 and cached[2] > 0
    assert cold[:2] == cached[:2] == batched[:2]


def test_a_step_in_pieces_gives_the_bits_of_one_call(llm_f32):
    """A step of more than PIECE_ROWS rows runs as several calls, one after another: every row's
    bits are those of one call (each attends up to its own position, to K/V the earlier pieces wrote)."""
    fd = llm_f32.engine.model.fused_decode
    with fused(llm_f32, True, "int8") as calls:
        whole = _outputs(llm_f32, PROMPTS + [LONG])
    assert max(calls) < fd.PIECE_ROWS  # (the first step's rows: one call)
    fd.PIECE_ROWS = 5
    try:
        with fused(llm_f32, True, "int8"):
            pieces = _outputs(llm_f32, PROMPTS + [LONG])
    finally:
        del fd.PIECE_ROWS
    assert pieces == whole


def test_a_cache_at_another_caches_addresses_gets_its_own_plan(llm_f32):
    """The plans are cached by the caches' page addresses. An int8 cache freed and an fp8 one of the
    same size allocated at the same addresses (the allocator hands freed memory back; a CI run
    met it between two engines sharing the model) must not get the int8 plan: the kernel would
    write and read the fp8 pages as int8 codes. Here the same memory is viewed as either dtype."""
    fd = llm_f32.engine.model.fused_decode
    shape = (4, 16, llm_f32.engine.model.args.num_kv_heads, llm_f32.engine.model.args.head_dim)
    layers = []
    for _ in fd._layers:
        k, v = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
        layers.append((k, v, torch.ones(shape[:3]), torch.ones(shape[:3])))
    as_fp8 = [(k.view(torch.float8_e4m3fn), v.view(torch.float8_e4m3fn), ks, vs) for k, v, ks, vs in layers]
    int8_plan, fp8_plan = fd._plan(layers), fd._plan(as_fp8)
    assert [t.data_ptr() for kv in layers for t in kv] == [t.data_ptr() for kv in as_fp8 for t in kv]
    kind = -1  # the plan's last field: the cache's kind (cpu_attention.KINDS)
    assert set(int8_plan[:, kind].tolist()) == {2} and set(fp8_plan[:, kind].tolist()) == {3}
