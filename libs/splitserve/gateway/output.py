"""One request's output as the client sees it: generated token ids in, client deltas out.

The stop decision is `splitserve.engine.detokenizer.apply_stop_rules`, the engine's own, so a
request served through the gateway ends exactly where it would end in one process:
- EOS (unless ignore_eos) or a stop token id: finish "stop"; the id is in token_ids, its text is
  not in the output; stop_reason is the stop token id as a decimal string ("" for EOS);
- a stop string: finish "stop", the text is cut before it (after it with include_stop_str_in_output),
  stop_reason is the string, the token that completed it is the last one sent;
- otherwise "length" once the output holds max_tokens tokens or prompt + output fills max_model_len.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from splitserve.engine.detokenizer import IncrementalDetokenizer, apply_stop_rules
from splitserve.sampling_params import SamplingParams


class Delta(NamedTuple):
    """What one batch of tokens adds to the client's stream."""

    token_ids: list[int]  # tokens kept (those after the finishing one are dropped)
    text: str  # new text, whole UTF-8 characters (may be "" while held back)
    logprobs: list  # common_pb2.TokenLogprob per kept token, or [] when not asked for


class OutputStream:
    """One request's generated tokens in, client deltas out; owns the stop decision.

    Invariant: once `finish_reason` is set, add() keeps nothing more; `token_ids` are exactly the
    ids sent to the client and `text` the concatenation of the texts sent.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams, max_model_len: int) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
        self._eos = tokenizer.eos_token_ids
        self._params = params
        self._num_prompt_tokens = len(prompt_token_ids)
        self._max_model_len = max_model_len
        self.token_ids: list[int] = []
        self.finish_reason = ""  # "" until finished: "stop" | "length"
        self.stop_reason = ""  # the stop string, or a stop token id in decimal; "" for EOS and length

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    @property
    def text(self) -> str:
        return self._detok.text

    def add(self, token_ids: Sequence[int], logprobs: Sequence = ()) -> Delta:
        """Appends tokens from a worker (in order) and runs the stop rules after each."""
        kept_ids, text, kept_lps = [], [], []
        with_lps = len(logprobs) == len(token_ids)
        for i, token in enumerate(token_ids):
            if self.finished:
                break
            token = int(token)
            self.token_ids.append(token)
            kept_ids.append(token)
            if with_lps:
                kept_lps.append(logprobs[i])
            n_out = len(self.token_ids)
            check = apply_stop_rules(token, self._params, self._eos, self._detok, n_out,
                                     self._num_prompt_tokens + n_out, self._max_model_len)
            if check.finish_reason:
                self.finish_reason = check.finish_reason
                self.stop_reason = "" if check.stop_reason is None else str(check.stop_reason)
            text.append(check.text)
        return Delta(kept_ids, "".join(text), kept_lps)

    def close(self, worker_reason: str, stop_token_id: int | None = None) -> str:
        """The worker ended the stream with `worker_reason` before our checks did (e.g. its own
        context limit); adopts that reason and returns the text still held back."""
        if self.finished:
            return ""
        if worker_reason not in ("stop", "length"):
            raise ValueError(f"unknown finish reason from a worker: {worker_reason!r}")
        self.finish_reason = worker_reason
        if worker_reason == "stop" and stop_token_id is not None and stop_token_id in self._params.stop_token_ids:
            self.stop_reason = str(stop_token_id)
        return self._detok.flush()
