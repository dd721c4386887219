"""Turns one scheduled step into model inputs, runs the model, and returns the logits to sample."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from splitserve.model.attention import AttentionMetadata, decode_groups, prefill_mask
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.kv_cache import KVCache
from splitserve.engine.scheduler import ScheduledSeq
from splitserve.kernels import cpu_attention
from splitserve.model.llama import LlamaModel


class StepInputs(NamedTuple):
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [N] int64: flat indices of the rows whose logits are sampled
    sampled: list[int]  # indices into the scheduled list of the sequences sampled this step
    rows: list[int]  # [len(sampled)] logits rows of each: 1, or 1 + its proposals (speculation)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, block_manager: BlockManager, use_triton: bool) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.use_triton = use_triton
        self.device = kv_cache.k_caches[0].device
        self.block_size = kv_cache.block_size
        self._kv_pairs = kv_cache.layers  # per layer (K, V) or, 8-bit, (K, V, K scales, V scales)
        self.compute_dtype = model.compute_dtype  # of q in attention: its masks' dtype
        args = model.args
        # CPU decode attention: the C kernel where it is built and handles this cache, else the torch path
        self.cpu_kernel = (not use_triton and self.device.type == "cpu" and cpu_attention.available()
                           and cpu_attention.supports(kv_cache.k_caches[0].dtype, args.num_heads,
                                                      args.num_kv_heads, args.head_dim))
        # A float32 model with the C kernel attends every row of a step, a prefill's too, as a decode
        # row (each up to its own position, the keys in one order whatever the step). Its projections
        # give a row the same bits in any batch (the block kernels), so a token's K/V and logits are
        # then the same bits whether it was prefilled cold, after a cached prefix, in chunks of any
        # size, decoded, verified as a proposal or recomputed after a preemption: greedy output never
        # depends on the cache path, even where the int8 path's rounding of activations would turn a
        # last-bit difference into another token. (bfloat16 GEMMs depend on the batch anyway.)
        self.rows_as_decodes = self.cpu_kernel and model.compute_dtype == torch.float32

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        """Flat inputs of one step; `scheduled` has its decodes (one-token queries, and sequences
        with proposals) first."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefill_q, prefill_len, prefill_tables, prefill_masks = [], [], [], []
        sample_indices: list[int] = []
        sampled: list[int] = []
        rows: list[int] = []
        for idx, (seq, n) in enumerate(scheduled):
            start = seq.num_computed_tokens
            end = start + n
            table = self.block_manager.block_table(seq.seq_id)
            drafts = seq.draft_token_ids  # run after its last token (start), all of them: verified by this step
            input_ids.extend(seq.token_ids[start:end] if not drafts else seq.token_ids[start:] + drafts)
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1 or drafts or self.rows_as_decodes:  # a decode; with proposals (or every row on the
                # CPU kernel), one decode row per position (every row's K/V is written before attention runs)
                decode_tables.append((table, n))
                decode_lens.extend(range(start + 1, end + 1))
            else:
                prefill_q.append(n)
                prefill_len.append(end)
                prefill_tables.append(torch.tensor(table[: (end + bs - 1) // bs], dtype=torch.long, device=self.device))
                # after a cached prefix: one mask for all the layers (none needed without one: causal)
                prefill_masks.append(prefill_mask(n, end, self.compute_dtype, self.device) if start else None)
            if end == seq.num_tokens + len(drafts):  # reaches the last token: its logits are sampled,
                # and with proposals those of every proposal too (each scores the token after it)
                sample_indices.extend(range(len(input_ids) - 1 - len(drafts), len(input_ids)))
                sampled.append(idx)
                rows.append(1 + len(drafts))
        num_decodes = len(decode_lens)
        tables, seq_lens, groups = self._decode_tables(decode_tables, decode_lens)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            num_decodes=num_decodes,
            decode_block_tables=tables,
            decode_seq_lens=seq_lens,
            decode_mask=None,
            prefill_query_lens=tuple(prefill_q),
            prefill_seq_lens=tuple(prefill_len),
            prefill_block_tables=tuple(prefill_tables),
            use_triton=self.use_triton,
            prefill_masks=tuple(prefill_masks),
            cpu_kernel=self.cpu_kernel,
            decode_groups=groups,
        )
        return StepInputs(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            meta,
            torch.tensor(sample_indices, dtype=torch.long, device=self.device),
            sampled,
            rows,
        )

    def _decode_tables(self, decode_tables: list[tuple[list[int], int]], decode_lens: list[int]):
        """The decode rows' block tables (each sequence's table and its number of rows) in the form
        the attention path takes: for a kernel one padded int32 table [rows, max_blocks] and the
        lengths [rows] (the kernel walks each row's own length); for the torch path, groups of rows
        of similar length (it gathers padded pages)."""
        if self.use_triton or self.cpu_kernel:
            max_blocks = max((len(t) for t, _ in decode_tables), default=0)
            tables = torch.zeros((len(decode_lens), max_blocks), dtype=torch.int32)
            row = 0
            for t, n in decode_tables:
                tables[row: row + n, : len(t)] = torch.tensor(t, dtype=torch.int32)
                row += n
            seq_lens = torch.tensor(decode_lens, dtype=torch.int32, device=self.device)
            return tables.to(self.device), seq_lens, ()
        empty = torch.empty(0, dtype=torch.int32)
        per_row = [t for t, n in decode_tables for _ in range(n)]
        groups = decode_groups(per_row, decode_lens, self.block_size, self.device) if per_row else ()
        return empty, empty, groups

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, list[int], list[int]]:
        """Runs one step; returns logits [N, vocab] (float32), which scheduled entries they belong to
        and how many consecutive rows each has (1 + its proposals)."""
        inputs = self.prepare(scheduled)
        meta = inputs.meta
        if len(inputs.sample_indices) < len(inputs.input_ids):  # only the sampled rows' states are read
            # here (a prefix hit's 16 rows sample one): the fused step's last layer computes those alone
            meta = dataclasses.replace(meta, output_rows=inputs.sample_indices.to(torch.int32))
        hidden = self.model(inputs.input_ids, inputs.positions, self._kv_pairs, meta)
        if not inputs.sampled:
            return hidden.new_empty((0, 0), dtype=torch.float32), [], []
        return self.model.compute_logits(hidden[inputs.sample_indices]), inputs.sampled, inputs.rows
