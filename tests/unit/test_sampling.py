"""Sampler and SamplingParams: exact expectations on CPU (seeded draws are deterministic)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from splitserve.engine.sampler import Sampler, SamplerOutput, TokenLogprobs, _apply_top_k_top_p
from splitserve.sampling_params import SamplingParams

VOCAB = 64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits_from_probs(probs: list[float], batch: int = 1) -> torch.Tensor:  # [batch, len(probs)]
    return torch.tensor(probs, dtype=torch.float64).log().float().expand(batch, -1).contiguous()


def _draw_many(probs: list[float], params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """[n] int64: n independent draws, batched, from a seeded shared generator."""
    out = Sampler(seed=seed)(_logits_from_probs(probs, n), [params] * n, [None] * n)
    return torch.tensor(out.token_ids)


# ---------------------------------------------------------------- SamplingParams


def test_params_defaults_and_normalization():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, 0, 0.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.seed is None and p.logprobs is None
    assert not p.greedy
    p = SamplingParams(stop="###", stop_token_ids=(5, 7), top_k=-1, temperature=1)
    assert p.stop == ["###"] and p.stop_token_ids == [5, 7] and p.top_k == 0
    assert isinstance(p.temperature, float)
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=20).logprobs == 20
    assert SamplingParams(top_p=1e-9, min_p=1.0, temperature=100).top_p == 1e-9


def test_params_frozen_and_replace_revalidates():
    p = SamplingParams(max_tokens=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 5  # type: ignore[misc]
    assert dataclasses.replace(p, stop="x").stop == ["x"]
    with pytest.raises(ValueError, match="max_tokens"):
        dataclasses.replace(p, max_tokens=0)


@pytest.mark.parametrize(
    "name, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 1.5),
        ("max_tokens", "16"),
        ("max_tokens", True),
        ("max_tokens", None),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", 100.5),
        ("temperature", "1.0"),
        ("temperature", None),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -0.5),
        ("top_p", math.nan),
        ("top_p", "0.9"),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_k", "5"),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("min_p", math.nan),
        ("seed", 1.0),
        ("seed", "42"),
        ("seed", 2**64),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", 1.0),
        ("logprobs", True),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [3]),
        ("stop", 3),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", 5),
        ("stop_token_ids", [1.0]),
        ("ignore_eos", 1),
        ("skip_special_tokens", "yes"),
        ("include_stop_str_in_output", None),
    ],
)
def test_params_validation_names_argument(name, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})
    assert name in str(info.value) and repr(value) in str(info.value)


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_fast_path():
    logits = torch.randn(6, VOCAB, generator=_gen(1))
    out = Sampler()(logits, [SamplingParams(temperature=0)] * 6, [None] * 6)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs == [None] * 6


def test_greedy_ties_take_lowest_id_and_bf16_input():
    logits = torch.zeros(2, 8)
    logits[0, [3, 5]] = 2.0
    logits[1, [6, 7]] = 1.0
    out = Sampler()(logits.bfloat16(), [SamplingParams(temperature=0)] * 2, [None] * 2)
    assert out.token_ids == [3, 6]


def test_top_k_1_equals_greedy_in_mixed_batch():
    logits = torch.randn(4, VOCAB, generator=_gen(2))
    params = [
        SamplingParams(top_k=1),
        SamplingParams(temperature=0),
        SamplingParams(top_k=1, temperature=2.0, seed=3),
        SamplingParams(temperature=0.0, logprobs=2),
    ]
    for step in range(5):
        out = Sampler()(logits, params, [None, None, _gen(step), None])
        assert out.token_ids == logits.argmax(-1).tolist()


# ---------------------------------------------------------------- seeded reproducibility


def _seeded_run(batch_params: list[SamplingParams], row: int, steps: int = 20) -> list[int]:
    """Tokens of batch row `row` over `steps` steps; every row with a seed gets its own generator,
    created once; logits are fixed per step (by step number and position in the batch, so the
    other rows' logits differ between compositions while row `row` always sees the same)."""
    sampler = Sampler()
    gens = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in batch_params]
    tokens = []
    for step in range(steps):
        logits = torch.randn(len(batch_params), VOCAB, generator=_gen(1000 + step * 37 + len(batch_params)))
        logits[row] = torch.randn(VOCAB, generator=_gen(step))  # the row under test: same every run
        tokens.append(sampler(logits, batch_params, gens).token_ids[row])
    return tokens


def test_same_seed_same_tokens_whatever_the_batch():
    target = SamplingParams(temperature=1.3, top_k=40, top_p=0.95, seed=1234)
    other = SamplingParams(temperature=0.8)
    alone = _seeded_run([target], 0)
    compositions = [
        ([target, other, other, other, other], 0),  # in a batch of 5 with unseeded random rows
        ([other, other, other, target, other], 3),  # at another index
        ([SamplingParams(seed=7), target, SamplingParams(seed=8, top_p=0.5), other], 1),  # other seeded rows
        ([SamplingParams(temperature=0), target, SamplingParams(min_p=0.3, logprobs=5)], 1),  # greedy, min-p
    ]
    for batch, row in compositions:
        assert _seeded_run(batch, row) == alone
    assert len(set(alone)) > 5  # really random: not one token repeated
    assert _seeded_run([dataclasses.replace(target, seed=4321)], 0) != alone


def test_unseeded_sampler_seed_reproducible():
    logits = torch.randn(8, VOCAB, generator=_gen(5))
    params, gens = [SamplingParams()] * 8, [None] * 8
    assert Sampler(seed=9)(logits, params, gens).token_ids == Sampler(seed=9)(logits, params, gens).token_ids


# ---------------------------------------------------------------- filters


def test_top_k_never_samples_outside_top_k():
    logits = torch.randn(1, VOCAB, generator=_gen(3))
    top5 = set(logits[0].topk(5).indices.tolist())
    n = 4000
    drawn = _draw_many(torch.softmax(logits[0], -1).tolist(), SamplingParams(top_k=5, temperature=2.0), n)
    assert set(drawn.tolist()) == top5  # all of them show up, nothing else


@pytest.mark.parametrize(
    "probs, top_p, allowed",
    [
        ([0.5, 0.3, 0.15, 0.05], 0.8, {0, 1}),
        ([0.5, 0.3, 0.15, 0.05], 0.81, {0, 1, 2}),
        ([0.5, 0.3, 0.15, 0.05], 0.5, {0}),
        ([0.5, 0.3, 0.15, 0.05], 0.96, {0, 1, 2, 3}),
        # Float32 cumulative sums that land an ulp below top_p (0.29999995, 0.79999995, 0.59999996):
        ([0.3, 0.25, 0.25, 0.2], 0.3, {0}),
        ([0.25, 0.3, 0.2, 0.25], 0.8, {0, 1, 3}),
        ([0.15, 0.3, 0.25, 0.3], 0.6, {1, 3}),
    ],
)
def test_top_p_keeps_smallest_set_reaching_mass(probs, top_p, allowed):
    drawn = _draw_many(probs, SamplingParams(top_p=top_p), 4000)
    assert set(drawn.tolist()) == allowed


def test_filters_off_leave_logits_bit_identical():
    # A row with top_k and top_p off must not change when another row makes the batch sort
    # (else its seeded tokens would depend on the batch): e.g. a float mass just under 1.0.
    logits = torch.randn(2, 5000, generator=_gen(8)) * 8
    logits[0, :10] = 30.0  # the tail's probabilities are ~1e-9 each
    out = _apply_top_k_top_p(logits, [SamplingParams(), SamplingParams(top_k=3)])
    assert torch.equal(out[0], logits[0])
    assert torch.isfinite(out[1]).sum().item() == 3


def test_top_p_tiny_keeps_top_token_and_renormalizes():
    drawn = _draw_many([0.1, 0.6, 0.3], SamplingParams(top_p=1e-6), 500)
    assert set(drawn.tolist()) == {1}
    # top_p=0.9 on [0.6, 0.3, 0.1]: token 2 is dropped, the rest renormalized to [2/3, 1/3].
    drawn = _draw_many([0.1, 0.6, 0.3], SamplingParams(top_p=0.9), 20000, seed=1)
    assert abs((drawn == 1).float().mean().item() - 2 / 3) < 0.015 and not (drawn == 0).any()


def test_top_k_then_top_p():
    # top_k=3 keeps [0.4, 0.3, 0.2] -> renormalized [4/9, 3/9, 2/9]; top_p=0.7 then keeps 0 and 1.
    drawn = _draw_many([0.4, 0.3, 0.2, 0.1], SamplingParams(top_k=3, top_p=0.7), 4000)
    assert set(drawn.tolist()) == {0, 1}


def test_min_p_cut():
    # threshold 0.25 * 0.5 = 0.125: 0.15 stays, 0.05 goes.
    drawn = _draw_many([0.5, 0.3, 0.15, 0.05], SamplingParams(min_p=0.25), 4000)
    assert set(drawn.tolist()) == {0, 1, 2}
    drawn = _draw_many([0.5, 0.3, 0.15, 0.05], SamplingParams(min_p=0.7), 1000)
    assert set(drawn.tolist()) == {0}


def test_min_p_applies_after_temperature():
    # temperature 0.5 squares the probabilities: [0.25, 0.09, 0.0225, 0.0025] / sum, so with
    # min_p=0.25 the threshold is 0.0625 of the max share and token 2 (0.09 of 0.25) is cut.
    drawn = _draw_many([0.5, 0.3, 0.15, 0.05], SamplingParams(temperature=0.5, min_p=0.25), 4000)
    assert set(drawn.tolist()) == {0, 1}


# ---------------------------------------------------------------- distribution


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_unseeded_frequencies_match_softmax(temperature):
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    expected = torch.softmax(logits / temperature, -1)
    n = 20000
    drawn = _draw_many(torch.softmax(logits, -1).tolist(), SamplingParams(temperature=temperature), n)
    freq = torch.bincount(drawn, minlength=5).double() / n
    assert (freq - expected).abs().max().item() < 0.012  # ~3.5 standard deviations at p=0.5


def test_seeded_frequencies_match_softmax():
    logits = torch.tensor([[0.5, -1.0, 1.5, 0.0]])
    expected = torch.softmax(logits[0], -1)
    # 20000 rows drawing in turn from one generator: the per-row (seeded) path, in one call.
    n, gen = 20000, torch.Generator().manual_seed(11)
    drawn = torch.tensor(Sampler()(logits.expand(n, -1), [SamplingParams(seed=11)] * n, [gen] * n).token_ids)
    freq = torch.bincount(drawn, minlength=4).double() / n
    assert (freq - expected).abs().max().item() < 0.012


# ---------------------------------------------------------------- logprobs


def test_logprobs_match_log_softmax_of_raw_logits():
    logits = torch.randn(4, VOCAB, generator=_gen(6)) * 3
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=5),  # filters do not change logprobs
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(seed=1, top_p=0.3, logprobs=20),
    ]
    out = Sampler(seed=0)(logits.half(), params, [None, None, None, _gen(1)])
    reference = torch.log_softmax(logits.half().float(), -1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert isinstance(lp, TokenLogprobs) and lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - reference[i, lp.token_id].item()) <= 1e-6
        assert lp.rank == 1 + int((reference[i] > reference[i, lp.token_id]).sum())
        n = params[i].logprobs
        assert len(lp.top) == n
        expected_top = reference[i].topk(n).indices.tolist() if n else []
        assert [t for t, _ in lp.top] == expected_top
        for token, value in lp.top:
            assert abs(value - reference[i, token].item()) <= 1e-6
    assert out.logprobs[1].rank == 1  # greedy: the sampled token is the most likely
    assert out.logprobs[0].rank <= 3  # top_k=3 never samples beyond rank 3


def test_rank_counts_strictly_larger():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    out = Sampler()(logits, [SamplingParams(temperature=0, logprobs=1)], [None])
    assert out.token_ids == [1] and out.logprobs[0].rank == 1  # tied with token 2: rank 1 both
    out = Sampler()(logits, [SamplingParams(top_p=1e-3, top_k=0, temperature=1e-3, logprobs=0)], [None])
    assert out.logprobs[0].rank == 1


def test_batch_size_mismatch_raises():
    with pytest.raises(ValueError, match="len\\(params\\)"):
        Sampler()(torch.zeros(2, 4), [SamplingParams()], [None, None])
