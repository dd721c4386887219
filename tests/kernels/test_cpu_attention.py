"""The C decode-attention kernel for CPUs (kernels/cpu_attention.c) against the torch reference."""
from __future__ import annotations

import pytest
import torch

from splitserve.model.attention import AttentionMetadata, paged_attention, paged_decode_attention_torch
from splitserve.kernels import cpu_attention



def _case(heads, kv_heads, head_dim, block_size, dtype, lens, seed=0, num_blocks=None):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int32)
    max_blocks = int((lens.max() + block_size - 1) // block_size)
    num_blocks = num_blocks or len(lens) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    # every row gets its own scattered pages (a permutation: no page shared, none in order)
    tables = torch.randperm(num_blocks, generator=gen)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    q = torch.randn(len(lens), heads, head_dim, generator=gen) * 3  # peaked softmaxes too
    return q, k_cache, v_cache, tables.to(torch.int32), lens


needs_kernel = pytest.mark.skipif(not cpu_attention.built(), reason="the C kernel is not built for this CPU")


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),  # the default model (SmolLM2-135M)
    (8, 8, 128, 16),  # no GQA
    (12, 2, 32, 8),  # groups of 6, small pages
    (16, 1, 64, 32),  # multi-query, the largest group
    (4, 2, 256, 4),  # the largest head
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_torch_path(heads, kv_heads, head_dim, block_size, dtype):
    # lengths of 1 token, exactly one page, one past it, and several chunks of the kernel's softmax
    lens = [1, 5, block_size, block_size + 1, 33, 100, 3 * block_size - 1]
    q, k_cache, v_cache, tables, lens = _case(heads, kv_heads, head_dim, block_size, dtype, lens)
    scale = head_dim**-0.5
    ref = paged_decode_attention_torch(q, k_cache.float(), v_cache.float(), tables, lens, scale)
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert (out - ref).abs().max().item() <= 1e-5


@needs_kernel
def test_long_context_and_far_apart_scores():
    """2,000 keys, one of them far above the rest: the online softmax rescales without overflow."""
    q, k_cache, v_cache, tables, lens = _case(9, 3, 64, 16, torch.float32, [2000, 1999, 37], seed=3)
    k_cache[tables[0, 100].item(), 5] *= 40.0  # position 1605 of row 0 dominates its row
    ref = paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, 0.125)
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= 1e-5


@needs_kernel
def test_empty_batch_and_bf16_query():
    q, k_cache, v_cache, tables, lens = _case(9, 3, 64, 16, torch.float32, [20, 7])
    empty = cpu_attention.paged_decode_attention(q[:0], k_cache, v_cache, tables[:0], lens[:0], 0.125)
    assert empty.shape == (0, 9, 64)
    out = cpu_attention.paged_decode_attention(q.bfloat16(), k_cache, v_cache, tables, lens, 0.125)
    ref = paged_decode_attention_torch(q.bfloat16().float(), k_cache, v_cache, tables, lens, 0.125)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max().item() <= 2e-2


@needs_kernel
def test_bad_arguments_are_named_and_nothing_is_read_out_of_bounds():
    q, k_cache, v_cache, tables, lens = _case(9, 3, 64, 16, torch.float32, [20, 7])
    bad = tables.clone()
    bad[1, 0] = k_cache.shape[0]  # one past the cache
    with pytest.raises(ValueError, match="row 1: block id .* outside the cache"):
        cpu_attention.paged_decode_attention(q, k_cache, v_cache, bad, lens, 0.125)
    with pytest.raises(ValueError, match="row 0: context length 40 outside"):
        cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([40, 7], dtype=torch.int32),
                                             0.125)
    with pytest.raises(ValueError, match="context length 0"):
        cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([0, 7], dtype=torch.int32),
                                             0.125)
    with pytest.raises(ValueError, match="must be int32"):
        cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables.long(), lens, 0.125)
    with pytest.raises(ValueError, match="unsupported by the CPU kernel: cache torch.float16"):
        cpu_attention.paged_decode_attention(q, k_cache.half(), v_cache.half(), tables, lens, 0.125)
    with pytest.raises(ValueError, match="v_cache .* differs from k_cache"):
        cpu_attention.paged_decode_attention(q, k_cache, v_cache.bfloat16(), tables, lens, 0.125)
    with pytest.raises(ValueError, match="do not match a batch of 2"):
        cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables[:1], lens, 0.125)
    # still serving after the refusals
    out = cpu_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    assert (out - paged_decode_attention_torch(q, k_cache, v_cache, tables, lens, 0.125)).abs().max() <= 1e-5


@pytest.mark.parametrize("kernel", [pytest.param("cpu_kernel", marks=needs_kernel), "use_triton"])
def test_paged_attention_dispatch_writes_the_cache_and_matches(kernel):
    """`paged_attention` through the C kernel or the Triton kernels (interpreted on the CPU): the new
    K/V land in their slots and the output equals the torch path's."""
    if kernel == "use_triton":
        pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
    q, k_cache, v_cache, tables, lens = _case(9, 3, 64, 16, torch.float32, [30, 17, 64])
    gen = torch.Generator().manual_seed(8)
    k, v = torch.randn(2, 3, 3, 64, generator=gen).unbind(0)  # the new token of each sequence
    pos = lens.long() - 1  # the new token is the last of its context
    slots = tables.long().gather(1, (pos // 16)[:, None]).squeeze(1) * 16 + pos % 16
    results = []
    for on in (False, True):
        meta = AttentionMetadata(slots, len(lens), tables, lens, None, (), (), (), **{kernel: on})
        kc, vc = k_cache.clone(), v_cache.clone()
        results.append((paged_attention(q, k, v, kc, vc, meta, 0.125), kc, vc))
    (ref, ref_k, ref_v), (out, out_k, out_v) = results
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
    assert (out - ref).abs().max().item() <= 1e-5

def _has_avx512() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512f" in flags and "avx512dq" in flags


needs_avx512 = pytest.mark.skipif(not (cpu_attention.built() and _has_avx512()),
                                  reason="the CPU has no AVX-512 F and DQ: only the avx2 copy runs here")


@needs_avx512
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256, 40])
@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (16, 1), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn])
def test_the_avx512_copy_gives_the_avx2_copys_bits(head_dim, heads, kv_heads, dtype):
    """Two keys a vector and sixteen value floats a vector, two heads at once, and runs of many rows
    with their query heads in vector lanes: every output float the same bits as the AVX2 copy's, over
    decode rows, runs of prefill rows (odd and even counts of keys in the last chunk, runs longer than
    one gathered chunk's rows), a run from the sequence's first token whose rows end inside the first
    chunk, a run longer than a lanes run (two of them) and a row alone."""
    lens = [1, 2, 33, 34, 35, 36, 37, 38, 39, 40, 41, 5, 300, 301, 302, 7] + list(range(1, 21)) + list(range(60, 79))
    q, k, v, tables, lens_t = _case(heads, kv_heads, head_dim, 16, torch.float32, lens, seed=head_dim + heads)
    tables[3:11] = tables[2]  # rows 2..10: one sequence's consecutive positions (a run of rows)
    tables[12:15] = tables[12]
    tables[16:36] = tables[35]  # a prefill chunk from the start: 20 rows
    tables[36:55] = tables[54]  # 19 rows at positions 59..77
    ks = vs = None
    if dtype in (torch.int8, torch.float8_e4m3fn):
        gen = torch.Generator().manual_seed(7)
        k = (k * 40).clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else k.to(dtype)
        v = (v * 40).clamp(-127, 127).to(torch.int8) if dtype == torch.int8 else v.to(dtype)
        ks = torch.rand(k.shape[:3], generator=gen) * 0.05
        vs = torch.rand(k.shape[:3], generator=gen) * 0.05
    else:
        k, v = k.to(dtype), v.to(dtype)
    outs = {}
    try:
        for copy in ("avx2", "avx512"):
            cpu_attention._ext.set_copy(copy == "avx512")
            assert cpu_attention._ext.copy() == copy
            outs[copy] = cpu_attention.paged_decode_attention(q, k, v, tables, lens_t, head_dim**-0.5, ks, vs)
    finally:
        cpu_attention.select_copy()
    assert torch.equal(outs["avx2"].view(torch.int32), outs["avx512"].view(torch.int32))
    ref = paged_decode_attention_torch(q, *(_dequantized(x, s) for x, s in ((k, ks), (v, vs))), tables, lens_t,
                                       head_dim**-0.5)
    assert (outs["avx512"] - ref).abs().max().item() <= 1e-4


@needs_avx512
@pytest.mark.parametrize("block_size", [8, 16, 32, 4, 6, 1])
@pytest.mark.parametrize("head_dim", [64, 40])
def test_the_lanes_runs_read_a_float32_cache_where_it_lies_with_the_avx2_copys_bits(block_size, head_dim):
    """Runs in vector lanes score and sum a float32 cache's rows in place when a block holds whole
    groups of 8 keys (block sizes 8, 16, 32: chunks across blocks, runs ending inside a group), else
    they copy them first (4, 6, 1): the same bits as the AVX2 copy either way."""
    lens = [33, 34, 35, 36, 37, 38, 39, 40, 41] + list(range(1, 21)) + list(range(60, 79)) + [100]
    q, k, v, tables, lens_t = _case(9, 3, head_dim, block_size, torch.float32, lens, seed=block_size)
    tables[1:9] = tables[0]  # rows 0..8: one sequence's consecutive positions
    tables[9:29] = tables[28]  # a prefill chunk from the start: 20 rows
    tables[29:48] = tables[47]  # 19 rows at positions 59..77
    outs = {}
    try:
        for copy in ("avx2", "avx512"):
            cpu_attention._ext.set_copy(copy == "avx512")
            outs[copy] = cpu_attention.paged_decode_attention(q, k, v, tables, lens_t, head_dim**-0.5)
    finally:
        cpu_attention.select_copy()
    assert torch.equal(outs["avx2"].view(torch.int32), outs["avx512"].view(torch.int32))


def _dequantized(x, scales):
    return x.float() if scales is None else x.float() * scales[..., None]


@pytest.mark.skipif(not cpu_attention.built(), reason="the C kernel is not built for this CPU")
def test_the_copy_follows_splitserve_cpu_attention_copy(monkeypatch):
    try:
        monkeypatch.setenv("SPLITSERVE_CPU_ATTENTION_COPY", "avx2")
        assert cpu_attention.available() and cpu_attention._ext.copy() == "avx2"
        monkeypatch.setenv("SPLITSERVE_CPU_ATTENTION_COPY", "best")
        assert cpu_attention.select_copy() == ("avx512" if _has_avx512() else "avx2")
        monkeypatch.setenv("SPLITSERVE_CPU_ATTENTION_COPY", "avx512")
        if _has_avx512():
            assert cpu_attention.select_copy() == "avx512"
        else:
            with pytest.raises(ValueError, match="SPLITSERVE_CPU_ATTENTION_COPY=avx512: this CPU has no AVX-512"):
                cpu_attention.select_copy()
        monkeypatch.setenv("SPLITSERVE_CPU_ATTENTION_COPY", "avx1024")
        with pytest.raises(ValueError, match="SPLITSERVE_CPU_ATTENTION_COPY"):
            cpu_attention.available()
    finally:
        monkeypatch.delenv("SPLITSERVE_CPU_ATTENTION_COPY")
        cpu_attention.select_copy()
