"""Continuous (iteration-level) batching with a per-step token budget.

There is no decoding phase nor prefill phase: each step hands every scheduled sequence
`num_new_tokens` of the work between its `num_computed_tokens` and `num_tokens`. A decode is one
token, a prefill chunk is many, a prefix-cache hit or an imported block just starts further on.
Running sequences are served first, oldest first; when their next tokens need a block and none is
free, the newest running sequence is preempted (its blocks freed, recomputed later). Waiting
sequences are admitted, in arrival order, while the budget, `max_num_seqs` and free blocks allow.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from splitserve.config.engine import SchedulerConfig
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.sequence import Sequence, SequenceStatus


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int  # tokens computed for it this step, from seq.num_computed_tokens on


class SchedulerOutput(NamedTuple):
    scheduled: list[ScheduledSeq]  # decodes first (one-token queries, proposals), then prefill chunks
    preempted: list[Sequence]
    num_batched_tokens: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.num_preemptions = 0  # cumulative

    # ------------------------------------------------------------------ queue state
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (stop, length or abort) and frees its blocks at once."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq.seq_id)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunk_cap = self.config.long_prefill_token_threshold or budget
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget, chunk_cap)
            if num_new <= 0:  # nothing left to compute (cannot happen for a live sequence)
                i += 1
                continue
            if seq.draft_token_ids:  # proposals ride along if the budget and free blocks allow
                num_new = self._with_drafts(seq, num_new, min(budget, chunk_cap))
            while not self.block_manager.allocate_slots(seq.seq_id, seq.num_computed_tokens + num_new):
                victim = self.running.pop()  # the newest running sequence
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # `seq` itself was preempted: nothing after it is left in running

        # Admit waiting sequences, but not in a step that had to preempt (blocks are short).
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            prefix = None
            if seq.num_computed_tokens == 0:
                prefix = self.block_manager.find_cached_prefix(seq.block_hashes, seq.num_tokens, record=False,
                                                               token_ids=seq.token_ids)
                start = prefix.num_cached_tokens
            else:  # KV imported into its blocks before admission
                start = seq.num_computed_tokens
            num_new = min(seq.num_tokens - start, budget, chunk_cap)
            if not self.block_manager.allocate_slots(seq.seq_id, start + num_new, prefix):
                break  # admission by free blocks: wait until running sequences release some
            self.waiting.popleft()
            if seq.num_computed_tokens == 0 and prefix is not None:
                self.block_manager.record_prefix_query(seq.num_tokens, start)
                seq.num_computed_tokens = start
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = start
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        # stable: decodes first (one-token queries, and sequences with proposals: decode rows too)
        scheduled.sort(key=lambda s: s.num_new_tokens != 1 and not s.seq.draft_token_ids)
        return SchedulerOutput(scheduled, preempted, self.config.max_num_batched_tokens - budget)

    def _with_drafts(self, seq: Sequence, num_new: int, cap: int) -> int:
        """The step's tokens for a decoding sequence with proposals: its last token plus as many
        proposals as the budget leaves room for and free blocks can hold without preempting anyone
        (else none: speculation never costs another sequence its place)."""
        keep = min(len(seq.draft_token_ids), cap - num_new)
        if keep > 0 and self.block_manager.allocate_slots(seq.seq_id, seq.num_computed_tokens + num_new + keep):
            if keep < len(seq.draft_token_ids):
                seq.draft_token_ids = seq.draft_token_ids[:keep]
                if seq.draft_probs is not None:
                    seq.draft_probs = seq.draft_probs[:keep]
            return num_new + keep
        seq.clear_drafts()
        return num_new

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.seq_id)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
