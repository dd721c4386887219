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