"""Speculative decoding without a model: the n-gram lookup, the config's validation, the proposal
back-off, and the rejection sampler's distribution (it must be the target's, whatever the draft)."""
from __future__ import annotations

import json

import pytest
import torch

from splitserve.config.engine import EngineConfig
from splitserve.config.speculative import SpeculativeConfig
from splitserve.engine.sampler import Sampler
from splitserve.engine.speculative import SpeculativeDecoder, StepCost, ngram_proposal, worth_proposing
from splitserve.sampling_params import SamplingParams


# ------------------------------------------------------------------------------ n-gram lookup
def test_ngram_takes_the_longest_suffix_that_occurs_and_its_latest_occurrence():
    tokens = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1, 2, 3] occurs once before, at 0 (followed by 9, 9, 5): proposed whole
    assert ngram_proposal(tokens, 3, 2, 3) == [9, 9, 5]
    # only bigrams: [2, 3] at 1 and at 6, followed by 9 and by 7: the text went on two ways, no proposal
    assert ngram_proposal(tokens, 3, 2, 2) == []
    assert ngram_proposal(tokens, 10, 1, 1) == []  # unigram 3 likewise
    assert ngram_proposal([4, 5, 6, 7], 3, 1, 3) == []  # nothing repeats
    assert ngram_proposal([5], 3, 1, 3) == []
    assert ngram_proposal([5, 5], 3, 1, 3) == [5]
    assert ngram_proposal([5, 5, 5, 5], 3, 1, 1) == [5]  # the latest 5 at 2 (one token after it), the one before agrees


def test_an_ngram_proposal_stops_where_the_two_latest_continuations_differ():
    # an item "a b c x y DAY ." written twice with another day: after "a b c" the two continuations
    # share "x y" and then differ, so only "x y" is proposed
    a, b, c, x, y, mon, tue, dot = 1, 2, 3, 4, 5, 6, 7, 9
    tokens = [a, b, c, x, y, mon, dot, a, b, c, x, y, tue, dot, a, b, c]
    assert ngram_proposal(tokens, 8, 2, 3) == [x, y]
    # the first repetition has one earlier occurrence only: proposed whole, up to k
    assert ngram_proposal(tokens[:10], 8, 2, 3) == [x, y, mon, dot, a, b, c]
    assert ngram_proposal(tokens[:10], 3, 2, 3) == [x, y, mon]


def test_speculative_config_is_validated_and_canonical():
    a = EngineConfig.from_kwargs(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    b = EngineConfig(speculative_config='{"num_speculative_tokens": 3, "method": "ngram"}')
    assert a == b and json.loads(a.speculative_config)["prompt_lookup_max"] == 4
    assert a.speculative == SpeculativeConfig("ngram", 3)
    assert EngineConfig(speculative_config="").speculative_config is None
    cases = {
        "{": "not valid JSON",
        "[1]": "must be a JSON object",
        '{"method": "ngram"}': "num_speculative_tokens is required",
        '{"method": "eagle", "num_speculative_tokens": 2}': "speculative_config.method",
        '{"method": "ngram", "num_speculative_tokens": 0}': "num_speculative_tokens must be an int in [1, 16]",
        '{"method": "ngram", "num_speculative_tokens": true}': "num_speculative_tokens",
        '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}': "larger than prompt_lookup_max",
        '{"method": "ngram", "num_speculative_tokens": 2, "typo": 1}': "unknown key(s) typo",
        '{"method": "draft_model", "num_speculative_tokens": 2}': "speculative_config.model",
        '{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}': "only for method draft_model",
        '{"method": "ngram", "num_speculative_tokens": 2, "min_acceptance": NaN}': "min_acceptance",
    }
    for text, needle in cases.items():
        with pytest.raises(ValueError) as err:
            EngineConfig(speculative_config=text)
        assert needle in str(err.value), (text, err.value)


class _Seq:
    """What SpeculativeDecoder reads of a sequence."""

    def __init__(self, tokens, computed, max_tokens=100, prompt=4):
        self.token_ids, self.num_computed_tokens = tokens, computed
        self.params = SamplingParams(max_tokens=max_tokens)
        self.prompt = prompt
        self.draft_token_ids, self.draft_probs = [], None
        self.spec_acceptance, self.spec_skip, self.spec_backoff, self.spec_len = 1.0, 0, 1, 0

    num_tokens = property(lambda self: len(self.token_ids))
    num_output_tokens = property(lambda self: len(self.token_ids) - self.prompt)

    def clear_drafts(self):
        self.draft_token_ids, self.draft_probs = [], None


def test_proposals_respect_max_tokens_the_context_and_the_step_rows():
    spec = SpeculativeDecoder(SpeculativeConfig("ngram", 4, 1, 2, max_step_rows=8))
    rep = [1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2]
    near_end = _Seq(list(rep), len(rep) - 1, max_tokens=len(rep) - 4 + 2)  # 2 tokens left: 1 proposal
    prefilling = _Seq(list(rep), 3)  # 11 rows this step
    spec.propose([near_end], max_model_len=1000, token_budget=512)
    assert near_end.draft_token_ids == [3]
    spec.propose([near_end], max_model_len=len(rep) + 1, token_budget=512)
    assert near_end.draft_token_ids == []  # the context has room for one more token only
    free = _Seq(list(rep), len(rep) - 1)
    spec.propose([free, prefilling], max_model_len=1000, token_budget=512)
    assert free.draft_token_ids == [] and prefilling.draft_token_ids == []  # the step is past 8 rows
    spec.propose([free], max_model_len=1000, token_budget=512)
    assert free.draft_token_ids == [3, 4, 5, 6]


def test_a_sequence_whose_proposals_fail_backs_off_and_recovers():
    spec = SpeculativeDecoder(SpeculativeConfig("ngram", 4, 1, 2, min_acceptance=0.3))
    seq = _Seq([1, 2, 1, 2, 1, 2], 5)
    spec.record(seq, 4, 0)
    assert seq.spec_skip == 0  # one miss: the average is 0.5
    spec.record(seq, 4, 0)
    assert seq.spec_skip == 1 and seq.spec_backoff == 2
    for skipped in (True, False):
        spec.propose([seq], max_model_len=100, token_budget=512)
        assert (seq.draft_token_ids == []) is skipped
    spec.record(seq, 4, 0)
    assert seq.spec_skip == 2 and seq.spec_backoff == 4  # doubles
    spec.record(seq, 4, 4)
    assert seq.spec_backoff == 1
    st = spec.stats
    assert (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens, st.accepted_per_pos) == (4, 16, 4, [1, 1, 1, 1])


# ------------------------------------------------------------------------------ rejection sampling
DRAWS = 3_000


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Thousands of tiny verifications: with a thread pool each op pays a hand-off, and on a busy
    two-core machine that made them 25x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _emitted_distribution(target_logits, proposal_q, params, certain: bool, seed=0):
    """The distribution of the first and second emitted tokens over DRAWS verifications of two
    proposals drawn from q (or the argmax of q, `certain`)."""
    sampler = Sampler(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = target_logits.shape[-1]
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    n_second = 0
    for _ in range(DRAWS):
        if certain:
            proposals, q = [int(proposal_q[0].argmax()), int(proposal_q[1].argmax())], None
        else:
            proposals = [int(torch.multinomial(proposal_q[j], 1, generator=gen)) for j in range(2)]
            q = proposal_q
        v = sampler.verify(target_logits, params, None, proposals, q)
        first[v.token_ids[0]] += 1
        if v.token_ids[0] == proposals[0]:  # position 2 only follows an accepted first proposal
            second[v.token_ids[1]] += 1
            n_second += 1
    return first / DRAWS, second / max(n_second, 1)


def test_the_proposal_length_follows_the_runs_that_hold():
    """n-gram: every proposal may be k long (the lookup cuts it where the text has varied). A draft
    model's: after a partial run one past what held (at least half the last), after a whole run
    double, up to num_speculative_tokens."""
    spec = SpeculativeDecoder(SpeculativeConfig("ngram", 8, 1, 2, min_acceptance=0.0))
    seq = _Seq([1, 2, 3, 4, 5, 6, 7, 8, 9] * 3, 26)
    spec.propose([seq], max_model_len=1000, token_budget=512)
    assert len(seq.draft_token_ids) == 8  # first proposal: the configured k
    lengths = []
    for proposed, accepted in ((8, 1), (4, 0), (2, 2)):
        spec.record(seq, proposed, accepted)
        spec.propose([seq], max_model_len=1000, token_budget=512)
        lengths.append(len(seq.draft_token_ids))
    assert lengths == [8, 8, 8]
    drafted = SpeculativeDecoder(SpeculativeConfig("ngram", 8, 1, 2, min_acceptance=0.0), draft=object())
    lengths = []
    for proposed, accepted in ((8, 1), (4, 0), (2, 2), (4, 4), (8, 8), (8, 6)):
        drafted.record(seq, proposed, accepted)
        lengths.append(seq.spec_len)
    assert lengths == [4, 2, 4, 8, 8, 7]


def test_the_step_cost_fit_finds_a_rows_share_of_a_step():
    cost = StepCost(prior=0.2)
    for _ in range(3):
        cost.observe(1, 0.010)
    assert cost.row_cost() == 0.2  # too few steps, and one row count only: the prior
    for rows in (1, 3, 5, 2, 4) * 10:
        cost.observe(rows, 0.008 + 0.002 * rows)  # a = 8 ms, b = 2 ms: a row is 2/10 of a one-row step
    assert abs(cost.row_cost() - 0.2) < 1e-9
    for rows in (1, 4, 8) * 200:
        cost.observe(rows, 0.010 + 0.0001 * rows)  # a GPU-like step: the fit follows the newer steps
    assert abs(cost.row_cost() - 0.0001 / 0.0101) < 1e-3


def test_proposing_stops_where_the_batch_makes_a_rejected_row_dear():
    assert worth_proposing(0.3, 1, 0.2) and not worth_proposing(0.15, 1, 0.2)
    assert worth_proposing(0.55, 4, 0.2) and not worth_proposing(0.45, 4, 0.2)
    assert not worth_proposing(0.75, 16, 0.2) and worth_proposing(0.85, 16, 0.2)
    assert worth_proposing(0.1, 16, 0.001)  # rows nearly free: propose whatever the acceptance
    spec = SpeculativeDecoder(SpeculativeConfig("ngram", 4, 1, 2, max_step_rows=64))
    rep = [1, 2, 3, 4, 5, 6] * 3
    seqs = [_Seq(list(rep), len(rep) - 1) for _ in range(6)]
    seqs[0].spec_acceptance = 0.9
    for s in seqs[1:]:
        s.spec_acceptance = 0.4
    spec.propose(seqs, max_model_len=1000, token_budget=512)
    assert len(seqs[0].draft_token_ids) == 4  # 0.9 pays in a step of 6 rows (threshold ~0.6)
    assert all(s.draft_token_ids == [] for s in seqs[1:])  # 0.4 does not, in a step of 10
    spec.propose(seqs[1:2], max_model_len=1000, token_budget=512)
    assert len(seqs[1].draft_token_ids) == 4  # alone, 0.4 pays


@pytest.mark.parametrize("certain", [False, True], ids=["draft-distribution", "certain-proposals"])
def test_rejection_sampling_keeps_the_target_distribution(certain):
    """Total variation distance between the emitted tokens' frequencies and the target's p, for a
    proposer far from the target (TV(p, q) > 0.3, so a sampler that kept q's distribution, or the
    proposals, would fail): within 0.05 over 3,000 draws at the first position (the sampling noise
    of 6 categories at this count is about 0.02), 0.08 at the second (fewer draws reach it)."""
    torch.manual_seed(0)
    target = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0],
                           [0.0, 2.5, 0.5, 1.0, -0.5, 0.2],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    q = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.1, 0.05],
                      [0.4, 0.05, 0.3, 0.05, 0.1, 0.1]])
    params = SamplingParams(temperature=0.9)
    p = torch.softmax(target / 0.9, dim=-1)
    proposer = q if not certain else torch.nn.functional.one_hot(q.argmax(dim=-1), 6).float()
    assert min(0.5 * float((p[j] - proposer[j]).abs().sum()) for j in range(2)) > 0.3
    first, second = _emitted_distribution(target, q, params, certain)
    tv_first = 0.5 * float((first - p[0]).abs().sum())
    assert tv_first < 0.05, (first, p[0])
    tv_second = 0.5 * float((second - p[1]).abs().sum())
    assert tv_second < 0.08, (second, p[1])


def test_rejection_sampling_with_top_k_never_emits_a_dropped_token():
    sampler = Sampler(seed=0)
    target = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=1.0, top_k=2)
    seen = set()
    for _ in range(200):
        v = sampler.verify(target, params, None, [3], None)  # always propose a token top-k drops
        seen.add(v.token_ids[0])
        assert v.num_accepted == 0
    assert seen == {0, 1}


def test_seeded_verification_is_reproducible_and_greedy_takes_the_argmax():
    target = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, seed=7)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        runs.append([Sampler().verify(target, params, gen, [1, 2, 3], None).token_ids for _ in range(20)])
    assert runs[0] == runs[1]
    greedy = Sampler().verify(target, SamplingParams(temperature=0), None,
                              [int(target[0].argmax()), int(target[1].argmax()), -1 % 50], None)
    best = target.argmax(dim=-1).tolist()
    expected = best[:3] if best[2] != 49 else best
    assert greedy.token_ids == expected and greedy.num_accepted == len(expected) - 1
