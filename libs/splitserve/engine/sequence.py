"""One request's per-sequence state: its tokens, how many have KV in the cache, and its hashes.

There is no prefill or decode phase: a sequence has `num_tokens` (prompt + output) and
`num_computed_tokens` (tokens whose K/V are in its blocks). Whatever lies between the two is the
work left; a prefix-cache hit, an imported block or a finished chunk only moves the second count.
"""
from __future__ import annotations

import enum
import time
from collections.abc import Container

import torch

from splitserve.engine.hashing import extend_block_hashes
from splitserve.engine.sampler import TokenLogprobs
from splitserve.sampling_params import SamplingParams


_INT_ONLY = {int}


def check_token_ids(field: str, token_ids: list[int], vocab_size: int) -> None:
    """Raises ValueError naming `field` and the index of the first id that is not an int in
    [0, vocab_size): the one range check for ids from a user or a peer (engine and gateway).

    Ids that are all plain ints pass with three scans in C (a 1K-token prompt: ~25 us, against ~270
    us for the loop, which a prefix hit paid three times over in the gateway and the worker); the
    loop runs only to name what is wrong, or for int subclasses, which it also accepts."""
    if not token_ids or (set(map(type, token_ids)) == _INT_ONLY and min(token_ids) >= 0
                         and max(token_ids) < vocab_size):
        return
    for i, t in enumerate(token_ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"{field}[{i}] = {t!r} is outside the vocabulary [0, {vocab_size})")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        seq_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        block_size: int,
        hash_namespace: bytes,
        generator: torch.Generator | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt followed by output
        self.params = params
        self.generator = generator  # the request's own RNG when it gave a seed
        self.block_size = block_size
        self.hash_namespace = hash_namespace
        self.block_hashes: list[bytes] = []  # chained hashes of every full block of token_ids
        extend_block_hashes(self.block_hashes, self.token_ids, block_size, hash_namespace)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.num_preemptions = 0
        self.export_blocks = False  # hand the prompt's KV blocks out when it finishes (prefill role)
        self.export_skip: Container[bytes] = ()  # ... less these (the kvstore holds them)
        self.pin_export = False  # ... left pinned in their pages instead of copied out
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.logprobs: list[TokenLogprobs] = []
        # Speculative decoding (engine/speculative.py): tokens proposed for this step, not part of
        # token_ids until verified; the step computes them after the last token and keeps those the
        # model agrees with. `draft_probs` [k, vocab]: the draft's distributions (None: proposals
        # that were certain, e.g. n-gram lookup). `spec_*`: the proposal back-off of this sequence.
        self.draft_token_ids: list[int] = []
        self.draft_probs: torch.Tensor | None = None
        self.spec_acceptance = 1.0  # moving average of the accepted share of its proposals
        self.spec_skip = 0  # steps left without proposals
        self.spec_backoff = 1  # the next skip's length after another poor run
        self.spec_len = 0  # the next proposal's length limit (0: not yet proposed: the configured k)
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            extend_block_hashes(self.block_hashes, self.token_ids, self.block_size, self.hash_namespace)

    def clear_drafts(self) -> None:
        self.draft_token_ids = []
        self.draft_probs = None

    def reset_for_recompute(self) -> None:
        """After preemption: the blocks are gone; every token (output included) is recomputed."""
        self.num_computed_tokens = 0
        self.num_preemptions += 1
        self.clear_drafts()
        self.status = SequenceStatus.WAITING

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"status={self.status.value})"
        )
