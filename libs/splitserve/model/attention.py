"""Attention over the paged KV cache: the torch path (CPU and reference) and the dispatch to Triton.

Layout of one layer's cache (owned by `KVCache`, written only here):
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
A token's *slot* is `block_id * block_size + offset`; `slot_mapping` gives the slot of every new token.

A batch is a flat run of tokens `[T]`: the decode sequences come first (exactly one query token each),
then the prefill sequences (one or more query tokens each, possibly after a cached prefix).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitserve.kernels import kv_quant
from splitserve.kernels import cpu_attention


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs about one batch; built by the model runner, passed explicitly."""

    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token
    num_decodes: int  # the first `num_decodes` tokens are decode queries, one per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32 (padded with 0)
    decode_seq_lens: torch.Tensor  # [num_decodes] int32, context length including the new token
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool, CPU path only
    prefill_query_lens: tuple[int, ...]  # query tokens of each prefill sequence
    prefill_seq_lens: tuple[int, ...]  # context length (cached prefix + query) of each
    prefill_block_tables: tuple[torch.Tensor, ...]  # [num_blocks_i] int64 each
    use_triton: bool = False
    # per prefill sequence, its causal mask over the whole context when it has a cached prefix
    # (`prefill_mask`, built once per step, shared by the layers), else None; () builds them per layer
    prefill_masks: tuple[torch.Tensor | None, ...] = ()
    # CPU: decode rows go to the C kernel (`kernels.cpu_attention`), which walks each row's own length
    # through decode_block_tables / decode_seq_lens like the Triton kernel does.
    cpu_kernel: bool = False
    # CPU path: the decode rows split by context length (see `plan_decode_groups`); empty means one
    # group of every row, padded to the longest (decode_block_tables / decode_mask).
    decode_groups: tuple["DecodeGroup", ...] = ()
    # [n] int32, ascending: the rows whose final hidden states are read (ModelRunner.execute: the
    # sampled ones); None (what `prepare` makes): all. The fused CPU step leaves the others' after the
    # last layer's K/V write (LlamaModel.forward).
    output_rows: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows of similar context length, attended together (padded to their own longest)."""

    rows: torch.Tensor | None  # [n] int64 rows of the decode batch, or None for all rows in order
    block_tables: torch.Tensor  # [n, max_blocks] int32
    seq_lens: torch.Tensor  # [n] int32
    mask: torch.Tensor  # [n, 1, 1, max_blocks * block_size] bool


# A group of its own costs about as much as gathering this many (row, block) pairs more: measured
# on a 2-core x86 CPU with the default model (~0.09 ms per row-block over 30 layers, ~4.5 ms of
# per-group ops). Only the order of magnitude matters.
GROUP_COST_ROW_BLOCKS = 48


def plan_decode_groups(num_blocks: list[int], group_cost: int = GROUP_COST_ROW_BLOCKS) -> list[list[int]]:
    """Splits decode rows into groups that minimise the padded gather.

    The torch decode path gathers every row's pages padded to the longest row of its group, so a
    batch mixing 10-block and 60-block contexts spends most of its attention on padding. Sorted by
    length, rows are cut into consecutive runs minimising sum(rows * longest + group_cost) (an exact
    O(n^2) dynamic programme). Returns the row indices of each group, each group sorted by length.
    """
    order = sorted(range(len(num_blocks)), key=num_blocks.__getitem__)
    n = len(order)
    best = [0] + [None] * n  # best[i]: cost of grouping the i shortest rows
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = num_blocks[order[end - 1]]
        for start in range(end):
            cost = best[start] + (end - start) * longest + group_cost
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def decode_groups(tables: list[list[int]], seq_lens: list[int], block_size: int,
                  device: torch.device) -> tuple[DecodeGroup, ...]:
    """The decode batch's `DecodeGroup`s (block tables padded with 0 within each group)."""
    plan = plan_decode_groups([len(t) for t in tables])
    if len(plan) == 1:  # one group: keep the batch's own row order (no permutation needed)
        plan = [list(range(len(tables)))]
    groups = []
    for rows in plan:
        max_blocks = max(len(tables[r]) for r in rows)
        bt = torch.zeros((len(rows), max_blocks), dtype=torch.int32)
        for i, r in enumerate(rows):
            bt[i, : len(tables[r])] = torch.tensor(tables[r], dtype=torch.int32)
        lens = torch.tensor([seq_lens[r] for r in rows], dtype=torch.int32)
        groups.append(DecodeGroup(
            rows=None if len(plan) == 1 else torch.tensor(rows, dtype=torch.long, device=device),
            block_tables=bt.to(device), seq_lens=lens.to(device),
            mask=decode_mask(lens, max_blocks, block_size).to(device),
        ))
    return tuple(groups)


def write_kv_torch(
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64
    k_scales: torch.Tensor | None = None,  # [num_blocks, block_size, kv_heads] float32: an 8-bit cache
    v_scales: torch.Tensor | None = None,
) -> None:
    """Writes each new token's K and V into its slot (the torch reference of the Triton kernel); an
    8-bit cache stores them quantized with their scales (kernels.kv_quant)."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if k_scales is None:
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return
    if k_cache.device.type == "cpu" and cpu_attention.available():  # the same bits, ~10x faster a decode row
        cpu_attention.write_kv_quantized(k, v, k_cache, v_cache, k_scales, v_scales, slot_mapping)
        return
    name = kv_quant.SCALED_BY_STORAGE[k_cache.dtype]
    for x, cache, scales in ((k, k_cache, k_scales), (v, v_cache, v_scales)):
        values, scale = kv_quant.quantize(x, name)
        # through uint8 views: index_copy_ has no float8 kernel
        cache.view(torch.uint8).view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, values.view(torch.uint8))
        scales.view(-1, kv_heads).index_copy_(0, slot_mapping, scale)


def _gather_pages(cache: torch.Tensor, scales: torch.Tensor | None, block_ids: torch.Tensor) -> torch.Tensor:
    """The pages `block_ids` of one layer's K or V [n, block_size, kv_heads, head_dim]: as stored,
    or dequantized to float32 for an 8-bit cache."""
    pages = cache.index_select(0, block_ids)
    if scales is None:
        return pages
    return kv_quant.dequantize(pages, scales.index_select(0, block_ids))


def decode_mask(seq_lens: torch.Tensor, max_blocks: int, block_size: int) -> torch.Tensor:
    """[B, 1, 1, max_blocks * block_size] bool: key position < context length."""
    positions = torch.arange(max_blocks * block_size, device=seq_lens.device)
    return (positions[None, :] < seq_lens[:, None].to(torch.long))[:, None, None, :]


def paged_decode_attention_torch(
    q: torch.Tensor,  # [B, heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    mask: torch.Tensor | None = None,  # [B, 1, 1, max_blocks * block_size] bool, else built here
    k_scales: torch.Tensor | None = None,  # an 8-bit cache's scales (write_kv_torch)
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, heads, head_dim]
    """One query token per sequence against its whole paged context (the torch path).

    The pages are gathered per sequence as [B, S, kv_heads, head_dim] (one `index_select`, no
    transposition) and handed to SDPA as the strided view [B, kv_heads, S, head_dim]: its CPU
    kernel reads strided keys and values and shares each kv head among its query heads
    (`enable_gqa`), so neither a transposed copy nor a GQA expansion is made. Measured against the
    previous block-diagonal batched GEMM (which did `kv_heads` times the FLOPs to avoid the
    transposed copy) at 32 rows of 100-300 tokens: 2.7-2.9 against 4.2-4.8 ms a layer. Computed in
    float32.
    """
    batch, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    seq = block_tables.shape[1] * block_size
    flat = block_tables.reshape(-1).to(torch.long)
    keys = _gather_pages(k_cache, k_scales, flat).view(batch, seq, kv_heads, head_dim).transpose(1, 2).float()
    values = _gather_pages(v_cache, v_scales, flat).view(batch, seq, kv_heads, head_dim).transpose(1, 2).float()
    if mask is None:
        mask = decode_mask(seq_lens, block_tables.shape[1], block_size)
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys, values, attn_mask=mask.view(batch, 1, 1, seq),
                                         scale=scale, enable_gqa=heads != kv_heads)
    return out.squeeze(2).to(q.dtype)


def _grouped_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              groups: tuple[DecodeGroup, ...], scale: float, *scales) -> torch.Tensor:
    """`paged_decode_attention_torch` over each group of rows, results put back in row order
    (`scales`: an 8-bit cache's K and V scales)."""
    if len(groups) == 1 and groups[0].rows is None:
        g = groups[0]
        return paged_decode_attention_torch(q, k_cache, v_cache, g.block_tables, g.seq_lens, scale, g.mask, *scales)
    out = torch.empty_like(q)
    for g in groups:
        part = paged_decode_attention_torch(q.index_select(0, g.rows), k_cache, v_cache, g.block_tables,
                                            g.seq_lens, scale, g.mask, *scales)
        out.index_copy_(0, g.rows, part)
    return out


def prefill_mask(n: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n, seq_len] additive mask of the last n tokens of a seq_len context: 0 where query i (at
    position seq_len - n + i) sees the key, -inf after it. In the query's dtype, so that SDPA adds
    it as it is (a boolean mask is converted on every call)."""
    q_pos = torch.arange(seq_len - n, seq_len, device=device)
    k_pos = torch.arange(seq_len, device=device)
    mask = torch.zeros((n, seq_len), dtype=dtype, device=device)
    return mask.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))


def prefill_attention_torch(
    q: torch.Tensor,  # [n, heads, head_dim] the new query tokens
    k: torch.Tensor,  # [n, kv_heads, head_dim] their keys
    v: torch.Tensor,  # [n, kv_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_blocks] int64
    seq_len: int,  # cached prefix + n
    scale: float,
    mask: torch.Tensor | None = None,  # prefill_mask(n, seq_len, q.dtype, ...), else built here
    k_scales: torch.Tensor | None = None,  # an 8-bit cache's scales (write_kv_torch)
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [n, heads, head_dim]
    """Causal attention of a chunk of new tokens over the cached prefix and themselves."""
    n, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    gqa = heads != kv_heads
    qt = q.transpose(0, 1).unsqueeze(0)  # [1, heads, n, head_dim]
    if seq_len == n:  # no prefix: the new keys are the whole context
        if k_cache.dtype != k.dtype:
            # Attend over K/V at the cache's precision, as every other path does (a prefix hit, a
            # later chunk and decode read them back from the pages): with a bf16 cache and float32
            # arithmetic, attending over the unrounded K/V here made a cold prefill's greedy tokens
            # differ from a cached one's. The round trip is what write_kv_torch stored.
            if k_scales is not None:
                name = kv_quant.SCALED_BY_STORAGE[k_cache.dtype]
                k, v = kv_quant.round_trip(k, name), kv_quant.round_trip(v, name)
            else:
                k, v = k.to(k_cache.dtype).to(k.dtype), v.to(v_cache.dtype).to(v.dtype)
        keys = k.transpose(0, 1).unsqueeze(0)
        values = v.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(qt, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
    else:  # the K/V of this chunk were already written: read the whole context from the pages
        block_size = k_cache.shape[1]
        nblocks = (seq_len + block_size - 1) // block_size
        bt = block_table[:nblocks]
        # index_select, not k_cache[bt]: the same copy at a quarter of the cost on a CPU
        keys = _gather_pages(k_cache, k_scales, bt).view(-1, kv_heads, head_dim)[:seq_len].transpose(0, 1).unsqueeze(0)
        values = _gather_pages(v_cache, v_scales, bt).view(-1, kv_heads, head_dim)[:seq_len].transpose(0, 1).unsqueeze(0)
        keys, values = keys.to(q.dtype), values.to(q.dtype)
        if mask is None:
            mask = prefill_mask(n, seq_len, q.dtype, q.device)
        out = F.scaled_dot_product_attention(qt, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)


def paged_attention(
    q: torch.Tensor,  # [T, heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scales: torch.Tensor | None = None,  # [num_blocks, block_size, kv_heads] float32: an 8-bit cache
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, heads, head_dim]
    """Writes the new K/V into the pages, then attends every query token over its context."""
    scaled = {} if k_scales is None else {"k_scales": k_scales, "v_scales": v_scales}
    if meta.use_triton:
        from splitserve.kernels import triton_attention as kernels

        kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, **scaled)
    else:
        write_kv_torch(k, v, k_cache, v_cache, meta.slot_mapping, k_scales, v_scales)
    outputs = []
    nd = meta.num_decodes
    if nd:
        if meta.use_triton:
            outputs.append(kernels.paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale, **scaled))
        elif meta.cpu_kernel:
            outputs.append(cpu_attention.paged_decode_attention(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale, **scaled))
        elif meta.decode_groups:
            outputs.append(_grouped_decode_attention(q[:nd], k_cache, v_cache, meta.decode_groups, scale,
                                                     k_scales, v_scales))
        else:
            outputs.append(paged_decode_attention_torch(
                q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens, scale,
                meta.decode_mask, k_scales, v_scales))
    start = nd
    masks = meta.prefill_masks or (None,) * len(meta.prefill_query_lens)
    for qlen, slen, bt, mask in zip(meta.prefill_query_lens, meta.prefill_seq_lens, meta.prefill_block_tables, masks):
        end = start + qlen
        outputs.append(prefill_attention_torch(q[start:end], k[start:end], v[start:end], k_cache, v_cache, bt,
                                               slen, scale, mask, k_scales, v_scales))
        start = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
