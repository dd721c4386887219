"""The torch attention path on the CPU: decode rows grouped by context length; prefill masks."""
from __future__ import annotations

import torch


def _cache(num_blocks, block_size, kv_heads, head_dim, dtype, gen):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def test_decode_groups_plan_covers_every_row_once():
    from splitserve.model.attention import plan_decode_groups

    assert plan_decode_groups([5, 5, 5, 5]) == [[0, 1, 2, 3]]  # equal lengths: one group
    assert plan_decode_groups([]) == []
    lengths = [3, 60, 4, 58, 2, 61, 5, 59] * 4  # two clusters: short and long contexts
    plan = plan_decode_groups(lengths, group_cost=48)
    assert sorted(r for g in plan for r in g) == list(range(len(lengths)))
    assert len(plan) == 2 and {lengths[r] < 10 for r in plan[0]} == {True}
    # the plan never pads more than one group would, plus its group costs
    padded = sum(len(g) * max(lengths[r] for r in g) + 48 for g in plan)
    assert padded <= len(lengths) * max(lengths) + 48
    assert plan_decode_groups(lengths, group_cost=10**6) == [sorted(range(len(lengths)), key=lengths.__getitem__)]


def test_grouped_decode_attention_equals_one_padded_batch():
    """Rows attended in length groups (permuted, then put back) equal the single padded batch."""
    from splitserve.model.attention import AttentionMetadata, decode_groups, paged_attention

    gen = torch.Generator().manual_seed(11)
    block_size, heads, kv_heads, head_dim = 16, 6, 2, 32
    lens = [1, 40, 700, 17, 650, 33, 690, 5]  # short and long contexts interleaved
    k_cache, v_cache = _cache(160, block_size, kv_heads, head_dim, torch.float32, gen)
    ids = torch.randperm(160, generator=gen).tolist()
    tables, used = [], 0
    for n in lens:
        nb = -(-n // block_size)
        tables.append(ids[used:used + nb])
        used += nb
    groups = decode_groups(tables, lens, block_size, torch.device("cpu"))
    assert len(groups) >= 2 and all(g.rows is not None for g in groups)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    k = torch.randn(len(lens), kv_heads, head_dim, generator=gen)
    v = torch.randn(len(lens), kv_heads, head_dim, generator=gen)
    pos = torch.tensor(lens) - 1
    slots = torch.tensor([tables[i][p // block_size] * block_size + p % block_size for i, p in enumerate(pos.tolist())])
    padded = torch.zeros(len(lens), max(len(t) for t in tables), dtype=torch.int32)
    for i, t in enumerate(tables):
        padded[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    one = AttentionMetadata(slots, len(lens), padded, seq_lens, None, (), (), ())
    grouped = AttentionMetadata(slots, len(lens), padded, seq_lens, None, (), (), (), decode_groups=groups)
    ref = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), one, head_dim ** -0.5)
    out = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), grouped, head_dim ** -0.5)
    assert (out - ref).abs().max().item() <= 1e-5


def test_prefill_after_a_cached_prefix_with_the_steps_mask_equals_a_boolean_causal_mask():
    """The runner builds one additive mask per prefill sequence a step (shared by the layers); the
    attention over the pages gives the same bits as SDPA with the plain boolean causal mask."""
    import torch.nn.functional as F

    from splitserve.model.attention import prefill_attention_torch, prefill_mask

    gen = torch.Generator().manual_seed(5)
    bs, kv_heads, heads, dim, n, seq_len = 4, 2, 6, 16, 5, 19
    k_cache = torch.randn(8, bs, kv_heads, dim, generator=gen)
    v_cache = torch.randn(8, bs, kv_heads, dim, generator=gen)
    table = torch.tensor([6, 2, 7, 0, 3], dtype=torch.long)
    q = torch.randn(n, heads, dim, generator=gen)
    flat_k = k_cache[table].reshape(-1, kv_heads, dim)[:seq_len]  # the new K/V are already written
    flat_v = v_cache[table].reshape(-1, kv_heads, dim)[:seq_len]
    mask = prefill_mask(n, seq_len, torch.float32, torch.device("cpu"))
    assert mask.shape == (n, seq_len) and mask[0, seq_len - n].item() == 0 and mask[0, seq_len - n + 1] == float("-inf")
    out = prefill_attention_torch(q, flat_k[-n:], flat_v[-n:], k_cache, v_cache, table, seq_len, 0.25, mask)
    assert torch.equal(out, prefill_attention_torch(q, flat_k[-n:], flat_v[-n:], k_cache, v_cache, table, seq_len, 0.25))
    allowed = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - n, seq_len)[:, None]
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], flat_k.transpose(0, 1)[None],
                                         flat_v.transpose(0, 1)[None], attn_mask=allowed, scale=0.25,
                                         enable_gqa=True)[0].transpose(0, 1)
    assert torch.equal(out, ref)


def test_prefill_without_a_prefix_attends_over_kv_at_the_cache_precision():
    """A cold prefill attends over its new K/V as the cache holds them (rounded to bf16), exactly
    what a prefix hit or a later chunk reads back from the pages; with a float32 cache nothing is
    rounded (issue 18: a bf16 cold prefill attended over unrounded K/V and answered differently)."""
    from splitserve.model.attention import paged_attention, AttentionMetadata

    gen = torch.Generator().manual_seed(7)
    bs, kv_heads, heads, dim, n = 4, 2, 6, 16, 7
    q = torch.randn(n, heads, dim, generator=gen)
    k = torch.randn(n, kv_heads, dim, generator=gen)
    v = torch.randn(n, kv_heads, dim, generator=gen)
    table = torch.tensor([3, 0], dtype=torch.long)
    meta = AttentionMetadata(slot_mapping=torch.tensor([3 * bs + i for i in range(bs)] + list(range(n - bs))),
                             num_decodes=0, decode_block_tables=torch.empty(0), decode_seq_lens=torch.empty(0),
                             decode_mask=None, prefill_query_lens=(n,), prefill_seq_lens=(n,),
                             prefill_block_tables=(table,))

    def run(k, v, cache_dtype):
        k_cache, v_cache = torch.zeros(4, bs, kv_heads, dim, dtype=cache_dtype), torch.zeros(4, bs, kv_heads, dim,
                                                                                             dtype=cache_dtype)
        return paged_attention(q, k, v, k_cache, v_cache, meta, 0.25), k_cache, v_cache

    out, k_cache, _ = run(k, v, torch.bfloat16)
    rounded = run(k.bfloat16().float(), v.bfloat16().float(), torch.bfloat16)[0]
    assert torch.equal(out, rounded)  # attends over the rounded K/V...
    assert torch.equal(k_cache[table].reshape(-1, kv_heads, dim)[:n].float(), k.bfloat16().float())  # ...it stored
    f32 = run(k, v, torch.float32)[0]
    assert not torch.equal(f32, rounded)  # float32 cache: the unrounded K/V, no rounding anywhere
    assert torch.equal(f32, run(k, v, torch.float32)[0])
