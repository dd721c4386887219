"""Incremental detokenization of generated tokens, stop strings, and the stop rules.

Three layers, one per concern:
- `_DecodeWindow` turns token ids into text deltas with the prefix/read-offset method: it decodes
  only a short window of recent ids, twice (the already-emitted prefix of the window, and the whole
  window), and emits the difference once it no longer ends in U+FFFD (a UTF-8 character whose
  bytes are split over several byte-level tokens).
- `IncrementalDetokenizer` runs stop-string matching over the text that has not been emitted yet,
  holding back any tail that could still become a stop string.
- `apply_stop_rules` decides whether one generated token ends its request. The engine and the
  gateway's output stream both call it, so a request ends on the same token whichever serves it.
"""
from __future__ import annotations

from collections.abc import Container
from typing import NamedTuple

from splitserve.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"  # what decode() yields for incomplete UTF-8 bytes
# Prompt tokens decoded before the first generated one, so that tokenizers whose decode() treats the
# first token specially (a SentencePiece leading space) render the continuation as it reads after
# the prompt. For byte-level BPE (the default model) the deltas are the same with or without it.
_PROMPT_CONTEXT_TOKENS = 5


class _DecodeWindow:
    """Token ids in, text out, at O(window) decode cost per token.

    `_ids` holds the ids from the prefix offset on; `_ids[:_read]` were already turned into text
    (they are decoded again only as context), `_ids[_read:]` not yet. The window's start is always a
    character boundary, so decode(window) == decode(prefix part) + the new text.
    """

    def __init__(self, tokenizer, context_ids: list[int], skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        if self._decode(context_ids).endswith(_REPLACEMENT):  # context ends mid-character: unusable
            context_ids = []
        self._ids = list(context_ids)
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: it rewrites text across token boundaries, which a stream cannot undo.
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever was held back, even a trailing U+FFFD (the bytes will never be completed)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[: self._read])
        full_text = self._decode(self._ids)
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_REPLACEMENT) and not final):
            return ""  # nothing new yet (a skipped special token) or a character still incomplete
        # The new ids become the next window's prefix; everything before them is dropped.
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return full_text[len(prefix_text) :]


class IncrementalDetokenizer:
    """Turns one request's generated tokens into streamed text and detects its stop strings.

    Invariants:
    - "".join(every delta returned by add() and flush()) == `text`, always;
    - without a stop: after flush(), `text` == tokenizer.decode(generated ids,
      skip_special_tokens=params.skip_special_tokens) (for a byte-level BPE tokenizer; others
      render the first token as it reads after the prompt);
    - no delta ever ends inside a UTF-8 character (holds back while decode ends with U+FFFD),
      except what flush() gives for bytes that never formed a character;
    - a stop string is never emitted unless include_stop_str_in_output: text that could be the
      start of one is held back until it is known not to be;
    - once a stop string appears, `text` ends exactly before it (or after it with
      include_stop_str_in_output), `stopped` is True and `stop_reason` is that string. The stop
      that wins is the one whose end comes first in the text, as if the text were scanned one
      character at a time (so it does not depend on how tokens split the text); among those
      ending at the same place, the longest.
    Whether a stop token or EOS itself is passed to add() is the caller's choice.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._window = _DecodeWindow(
            tokenizer, list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]), params.skip_special_tokens
        )
        self._stops = params.stop  # list[str], each non-empty
        self._include_stop = params.include_stop_str_in_output
        self._pending = ""  # decoded but not emitted: always a possible start of a stop string
        self._emitted: list[str] = []  # the deltas returned so far
        self._finished = False  # flush() was called
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The output text so far: exactly the concatenation of the deltas returned."""
        return "".join(self._emitted)

    def add(self, token_id: int) -> str:
        """Appends one generated token; returns the new text it makes safe to show (maybe "").
        After a stop string matched, further tokens are ignored and "" is returned."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add() after flush()")
        if self.stopped:
            return ""
        return self._take(self._window.add(token_id), final=False)

    def flush(self) -> str:
        """Ends the stream (length or EOS): returns everything still held back. Idempotent."""
        if self._finished or self.stopped:
            self._finished = True
            return ""
        delta = self._take(self._window.flush(), final=True)
        self._finished = True
        return delta

    def _take(self, new_text: str, final: bool) -> str:
        if not new_text and not final:
            return ""
        text = self._pending + new_text
        match = self._first_stop(text, searched=len(self._pending))
        if match is not None:
            start, stop = match
            delta = text[: start + len(stop)] if self._include_stop else text[:start]
            self._pending = ""
            self.stopped, self.stop_reason = True, stop
        else:
            hold = 0 if final else self._possible_stop_start(text)
            delta, self._pending = text[: len(text) - hold], text[len(text) - hold :]
        if delta:
            self._emitted.append(delta)
        return delta

    def _first_stop(self, text: str, searched: int) -> tuple[int, str] | None:
        """(start, stop string) of the match ending first in `text`; `text[:searched]` is known to
        hold no complete stop string."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = text.find(stop, max(0, searched - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _possible_stop_start(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class StopCheck(NamedTuple):
    """What one generated token does to its request (see apply_stop_rules)."""

    text: str  # text the token makes safe to show, plus what a finish flushed ("" without a detokenizer)
    finish_reason: str | None  # "stop" | "length"; None while the request goes on
    stop_reason: int | str | None  # the stop token id or the stop string; None for EOS, length or going on


def apply_stop_rules(token: int, params: SamplingParams, eos_token_ids: Container[int],
                     detok: IncrementalDetokenizer | None, num_output_tokens: int, num_tokens: int,
                     max_model_len: int) -> StopCheck:
    """The stop rules for `token`, just appended (the counts include it), first match wins:
    1. EOS (unless params.ignore_eos): "stop"; its text is never part of the output;
    2. a stop token id: "stop", stop_reason the id; its text is not part of the output either;
    3. a stop string completed by the token's text (needs `detok`): "stop", stop_reason the string;
    4. otherwise "length" once num_output_tokens reaches max_tokens or num_tokens max_model_len.
    With `detok` (None: the caller detokenizes), a finish flushes what it held back into `text`."""
    text, reason, stop_reason = "", None, None
    if not params.ignore_eos and token in eos_token_ids:
        reason = "stop"
    elif token in params.stop_token_ids:
        reason, stop_reason = "stop", token
    elif detok is not None:
        text = detok.add(token)
        if detok.stopped:
            reason, stop_reason = "stop", detok.stop_reason
    if reason is None and (num_output_tokens >= params.max_tokens or num_tokens >= max_model_len):
        reason = "length"
    if reason is not None and detok is not None:
        text += detok.flush()
    return StopCheck(text, reason, stop_reason)
