"""The one implementation of the stop rules and of the token-range check (engine and gateway share
them): exact verdicts on a toy tokenizer whose token i is the character chr(i)."""
from __future__ import annotations

import pytest

from splitserve.engine.detokenizer import IncrementalDetokenizer, StopCheck, apply_stop_rules
from splitserve.engine.sequence import check_token_ids
from splitserve.sampling_params import SamplingParams

EOS = 3


class CharTokenizer:
    """Token id i decodes to chr(i): every token is one whole character."""

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) -> str:
        return "".join(chr(i) for i in ids)


def run(params: SamplingParams, tokens: list[int], max_model_len: int = 100, prompt_len: int = 2,
        detokenize: bool = True) -> list[StopCheck]:
    """Feeds `tokens` one by one until a rule finishes the request; the verdicts in order."""
    detok = IncrementalDetokenizer(CharTokenizer(), [ord("p")] * prompt_len, params) if detokenize else None
    checks = []
    for n, token in enumerate(tokens, start=1):
        checks.append(apply_stop_rules(token, params, {EOS}, detok, n, prompt_len + n, max_model_len))
        if checks[-1].finish_reason:
            break
    return checks


def test_eos_stops_without_its_text_unless_ignored():
    checks = run(SamplingParams(max_tokens=10), [ord("a"), EOS, ord("b")])
    assert checks == [StopCheck("a", None, None), StopCheck("", "stop", None)]
    checks = run(SamplingParams(max_tokens=3, ignore_eos=True), [ord("a"), EOS, ord("b")])
    assert [c.finish_reason for c in checks] == [None, None, "length"]
    assert "".join(c.text for c in checks) == "a\x03b"


def test_stop_token_id_is_the_stop_reason_as_an_int():
    checks = run(SamplingParams(max_tokens=10, stop_token_ids=[ord("x")]), [ord("a"), ord("x")])
    assert checks[-1] == StopCheck("", "stop", ord("x"))


def test_stop_string_cuts_the_text_and_flushes_nothing_after_it():
    checks = run(SamplingParams(max_tokens=10, stop=["cd"]), [ord(c) for c in "abcde"])
    assert [c.finish_reason for c in checks] == [None, None, None, "stop"]
    assert "".join(c.text for c in checks) == "ab" and checks[-1].stop_reason == "cd"


def test_length_by_max_tokens_or_by_the_context_window_flushes_held_text():
    # "c" could start the stop string "cd": held back until the finish flushes it.
    checks = run(SamplingParams(max_tokens=3, stop=["cd"]), [ord(c) for c in "abcz"])
    assert checks[-1] == StopCheck("c", "length", None) and "".join(c.text for c in checks) == "abc"
    checks = run(SamplingParams(max_tokens=50), [ord("a")] * 10, max_model_len=5, prompt_len=2)
    assert len(checks) == 3 and checks[-1].finish_reason == "length"


def test_the_first_rule_wins_eos_over_stop_token_over_length():
    params = SamplingParams(max_tokens=1, stop_token_ids=[EOS])
    assert run(params, [EOS]) == [StopCheck("", "stop", None)]  # EOS before the stop token id
    assert run(SamplingParams(max_tokens=1, stop_token_ids=[ord("x")]), [ord("x")]) == [StopCheck("", "stop", ord("x"))]


def test_without_a_detokenizer_the_caller_gets_no_text_and_no_stop_strings():
    checks = run(SamplingParams(max_tokens=3, stop=["b"]), [ord(c) for c in "abc"], detokenize=False)
    assert checks == [StopCheck("", None, None), StopCheck("", None, None), StopCheck("", "length", None)]


def test_token_range_check_names_the_field_and_the_index():
    check_token_ids("prompt_token_ids", [0, 5, 9], 10)
    for ids, bad in (([1, 10], "[1] = 10"), ([-1], "[0] = -1"), ([True], "[0] = True"), ([2.0], "[0] = 2.0")):
        with pytest.raises(ValueError, match=r"^prompt_token_ids" + bad.replace("[", r"\[").replace("]", r"\]")
                           + r" is outside the vocabulary \[0, 10\)$"):
            check_token_ids("prompt_token_ids", ids, 10)
