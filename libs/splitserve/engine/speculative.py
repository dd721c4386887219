"""Speculative decoding: proposals made before a step, verified by it.

Before each step `SpeculativeDecoder.propose` gives some decoding sequences up to k proposed next
tokens (`Sequence.draft_token_ids`). The scheduler computes them with the sequence's last token in
the same step (k + 1 query tokens, beside any other sequence's prefill chunk), the model scores all
k + 1 positions, and `Sampler.verify` keeps the proposals the model agrees with plus one token of the
model's own. Accepted proposals have their K/V computed already; a rejected one's slots hold garbage
past `num_computed_tokens` and are overwritten by the next step (the prefix cache only ever hashes
computed blocks of accepted tokens, and blocks taken for rejected tokens are handed back).

Which sequences propose, and how much, adapts: the step's rows stay within `max_step_rows` (past it
a rejected token is no longer nearly free), the sequences whose proposals were accepted most go
first, a sequence proposes only while its acceptance pays for the rows in this step's batch
(`worth_proposing`, with the cost of a row measured from the engine's own steps, `StepCost`),
a proposal is cut where it is likely to be wrong (on a CPU each verified row costs ~13% of a
one-row step, so rows that will be rejected are not free: an n-gram proposal stops where the two
latest continuations of its n-gram differ, `ngram_proposal`; a draft model's next proposal is one
token past the run that held last time, doubling again after a run that held whole), and a
sequence whose recent proposals were mostly wrong stops
proposing for a while (doubling each time), so a workload that does not repeat pays almost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from splitserve.config.speculative import SpeculativeConfig
from splitserve.engine.sequence import Sequence

MAX_BACKOFF_STEPS = 64
ACCEPTANCE_DECAY = 0.5  # weight of the older history in a sequence's acceptance average
PRIOR_ROW_COST = 0.2  # one more row against a one-row step, until steps measured say otherwise (2-core CPU)
COST_DECAY = 0.99  # weight of the older steps in the step-time fit


class StepCost:
    """A decode step's time fitted online as a + b * rows (exponentially weighted least squares over
    the steps seen), and from it `row_cost`: what one more row adds, against a one-row step. On a
    2-core CPU a row of the default model costs ~0.2 of a step (the weights' unpacking is shared,
    the arithmetic is not); on a GPU nearly nothing."""

    def __init__(self, prior: float = PRIOR_ROW_COST) -> None:
        self.prior = prior
        self.w = self.sr = self.st = self.srr = self.srt = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = COST_DECAY
        self.w, self.sr, self.st = d * self.w + 1, d * self.sr + rows, d * self.st + seconds
        self.srr, self.srt = d * self.srr + rows * rows, d * self.srt + rows * seconds

    def row_cost(self) -> float:
        if self.w < 8:
            return self.prior
        mr, mt = self.sr / self.w, self.st / self.w
        var = self.srr / self.w - mr * mr
        if var < 0.25:  # (nearly) one row count seen: no slope to fit
            return self.prior
        b = (self.srt / self.w - mr * mt) / var
        a = mt - b * mr
        return b / (a + b) if a > 0 and b > 0 else self.prior


def worth_proposing(acceptance: float, rows: int, row_cost: float) -> bool:
    """Whether one more proposed row pays in a step of `rows` output rows so far: the tokens it is
    expected to add (`acceptance`) cost less than the step's tokens cost each. In units of a one-row
    step the step costs 1 + row_cost * (rows - 1) for `rows` tokens and the row costs `row_cost`: at
    0.2 a lone sequence proposes above 20% acceptance, in a step of 4 rows above 50%, of 16 above 80%."""
    return acceptance * (1 + row_cost * (rows - 1)) > row_cost * rows


@dataclass
class SpecStats:
    """Cumulative counters, with vLLM's meanings (the workers export them as metrics)."""

    num_drafts: int = 0  # proposals verified (a sequence's run of proposed tokens in one step)
    num_draft_tokens: int = 0  # tokens proposed
    num_accepted_tokens: int = 0  # proposed tokens the model agreed with
    accepted_per_pos: list[int] = field(default_factory=list)  # [k] accepted at position 0..k-1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


def ngram_proposal(tokens: list[int] | np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the sequence's last n
    tokens, for the largest n in [n_min, n_max] that occurs; [] when none does.

    Where the n-gram occurred more than once, the proposal stops where what followed its two latest
    occurrences differs: the text has shown that it goes on in more than one way from there (a list
    whose items repeat but for a name, a template filled in twice), so the rows past it would most
    likely be rejected; when they differ at once, nothing is proposed. A first repetition (one earlier
    occurrence: copying a span of the prompt) is proposed whole."""
    arr = np.asarray(tokens, dtype=np.int64)
    length = arr.shape[0]
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        pattern = arr[length - n:]
        # windows starting at 0 .. length-n-1: each is followed by at least one token
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            proposal = arr[start: start + k]
            if hits.size >= 2:  # the continuation of the occurrence before (as long: it starts earlier)
                before = arr[int(hits[-2]) + n: int(hits[-2]) + n + proposal.shape[0]]
                differs = np.flatnonzero(proposal != before)
                if differs.size:
                    proposal = proposal[: int(differs[0])]
            return proposal.tolist()
    return []


class SpeculativeDecoder:
    """Makes the proposals of one engine and keeps their statistics."""

    def __init__(self, config: SpeculativeConfig, draft=None) -> None:
        self.config = config
        self.draft = draft  # a DraftModel (method draft_model), else None
        self.stats = SpecStats(accepted_per_pos=[0] * config.num_speculative_tokens)
        self.cost = StepCost()

    def observe_step(self, scheduled, seconds: float) -> None:
        """A step's model time, when every row of it decoded (a prefill chunk's rows cost otherwise)."""
        if all(n == 1 + len(seq.draft_token_ids) for seq, n in scheduled):
            self.cost.observe(sum(n for _, n in scheduled), seconds)

    def propose(self, running: list[Sequence], max_model_len: int, token_budget: int) -> None:
        """Sets `draft_token_ids` of the running sequences that should propose this step."""
        cfg = self.config
        rows = sum(min(s.num_tokens - s.num_computed_tokens, token_budget) for s in running)
        room = min(cfg.max_step_rows, token_budget) - rows
        row_cost = self.cost.row_cost()
        # the step's output rows (a prefill chunk's rows make no token of this step's sequences)
        decode_rows = sum(1 for s in running if s.num_computed_tokens == s.num_tokens - 1)
        wanted: list[tuple[Sequence, int]] = []
        for seq in sorted(running, key=lambda s: -s.spec_acceptance):
            seq.clear_drafts()
            if seq.num_computed_tokens != seq.num_tokens - 1:
                continue  # still prefilling
            if seq.spec_skip:
                seq.spec_skip -= 1
                continue
            # The emitted run (accepted proposals + one token) must fit max_tokens and the context.
            k = min(seq.spec_len or cfg.num_speculative_tokens, seq.params.max_tokens - seq.num_output_tokens - 1,
                    max_model_len - seq.num_tokens - 1, room)
            # a seeded request decides on the prior cost, not on measured step times: what it
            # proposes, and so which draws its tokens take, must not depend on the machine's load
            cost = self.cost.prior if seq.params.seed is not None else row_cost
            if k <= 0 or not worth_proposing(seq.spec_acceptance, decode_rows, cost):
                continue
            wanted.append((seq, k))
            room -= k
            decode_rows += k
        if not wanted:
            return
        if self.draft is not None:
            self.draft.propose(wanted)
            return
        for seq, k in wanted:
            seq.draft_token_ids = ngram_proposal(seq.token_ids, k, cfg.prompt_lookup_min, cfg.prompt_lookup_max)

    def record(self, seq: Sequence, num_proposed: int, num_accepted: int) -> None:
        """One verified proposal: the statistics, and the sequence's back-off."""
        st = self.stats
        st.num_drafts += 1
        st.num_draft_tokens += num_proposed
        st.num_accepted_tokens += num_accepted
        for pos in range(num_accepted):
            st.accepted_per_pos[pos] += 1
        rate = num_accepted / num_proposed
        # The next length (a mismatch every few tokens must stop paying for rows that are rejected)
        k = self.config.num_speculative_tokens
        if self.draft is None:  # n-gram: the lookup itself cuts a proposal where the text has varied
            seq.spec_len = k
        else:  # a draft model's proposal costs draft steps: one past the run that held, doubled after a whole one
            seq.spec_len = min(k, 2 * num_proposed if num_accepted == num_proposed else
                               max(num_accepted + 1, num_proposed // 2))
        seq.spec_acceptance = ACCEPTANCE_DECAY * seq.spec_acceptance + (1 - ACCEPTANCE_DECAY) * rate
        if seq.spec_acceptance < self.config.min_acceptance:
            seq.spec_skip = seq.spec_backoff
            seq.spec_backoff = min(2 * seq.spec_backoff, MAX_BACKOFF_STEPS)
            seq.spec_acceptance = self.config.min_acceptance  # one good proposal lifts it again
        elif rate >= self.config.min_acceptance:
            seq.spec_backoff = 1

    def forget(self, seq: Sequence) -> None:
        """The sequence ended: the draft model frees what it kept for it."""
        if self.draft is not None:
            self.draft.forget(seq.seq_id)
