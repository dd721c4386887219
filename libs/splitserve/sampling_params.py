"""Per-request sampling and stopping parameters, validated once at construction."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

MAX_LOGPROBS = 20  # most alternatives a request may ask for per token
MAX_TEMPERATURE = 100.0  # the bound named in the temperature error message
# torch.Generator.manual_seed accepts exactly this range (negative seeds wrap modulo 2**64).
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def _bad(name: str, value: object, expected: str) -> ValueError:
    return ValueError(f"{name} must be {expected}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request and when to stop.

    Invariants after construction (else ValueError naming the argument and the value):
    `stop` is a list of non-empty strings, `stop_token_ids` a list of non-negative ints,
    `top_k` is 0 (off) or a positive int, float fields are Python floats in their ranges.
    Frozen so that a validated object cannot drift out of range; derive a variant with
    `dataclasses.replace`, which validates again.
    """

    max_tokens: int = 16
    """Most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 means greedy (argmax). In [0, 100]."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass is >= top_p. In (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 (or -1, normalized to 0) turns it off."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's. In [0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    stop: str | list[str] | None = None
    """Strings that end generation; the output is cut before the first one (normalized to list[str])."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation besides EOS (normalized to list[int])."""
    ignore_eos: bool = False
    """Keep generating past the EOS token (until max_tokens or another stop)."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0..20); None: none."""
    skip_special_tokens: bool = True
    """Leave special tokens (e.g. <|im_end|>) out of the output text."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""

    def __post_init__(self) -> None:
        self._set_int("max_tokens", 1, None, "an int >= 1")
        self._set_float("temperature", lambda t: 0.0 <= t <= MAX_TEMPERATURE, "a finite number in [0, 100]")
        self._set_float("top_p", lambda p: 0.0 < p <= 1.0, "a number in (0, 1]")
        self._set_float("min_p", lambda p: 0.0 <= p <= 1.0, "a number in [0, 1]")
        self._set_int("top_k", -1, None, "an int >= 0 (or -1 for off)")
        object.__setattr__(self, "top_k", max(self.top_k, 0))
        if self.seed is not None:
            self._set_int("seed", _SEED_MIN, _SEED_MAX, f"None or an int in [{_SEED_MIN}, {_SEED_MAX}]")
        if self.logprobs is not None:
            self._set_int("logprobs", 0, MAX_LOGPROBS, f"None or an int in [0, {MAX_LOGPROBS}]")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "a bool")
        object.__setattr__(self, "stop", self._normalize_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", self._normalize_stop_token_ids(self.stop_token_ids))

    def _set_int(self, name: str, low: int, high: int | None, expected: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise _bad(name, value, expected)
        object.__setattr__(self, name, int(value))  # numpy ints become Python ints

    def _set_float(self, name: str, in_range, expected: str) -> None:
        value = getattr(self, name)
        if not _is_real(value) or not math.isfinite(value) or not in_range(float(value)):
            raise _bad(name, value, expected)
        object.__setattr__(self, name, float(value))

    @staticmethod
    def _normalize_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise _bad("stop", stop, "None, a string or a list of strings")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise _bad("stop", stop, "a list of non-empty strings")
        return list(stop)

    @staticmethod
    def _normalize_stop_token_ids(ids: object) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise _bad("stop_token_ids", ids, "None or a list of non-negative ints")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise _bad("stop_token_ids", ids, "a list of non-negative ints")
        return [int(t) for t in ids]

    @property
    def greedy(self) -> bool:
        """True when the next token is always the argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1
