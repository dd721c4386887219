"""The speculative-decoding settings: one JSON object, written as vLLM users already write it.

    --speculative-config '{"method": "ngram", "num_speculative_tokens": 4,
                           "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
    --speculative-config '{"method": "draft_model", "model": "/path/draft.gguf", "num_speculative_tokens": 4}'
    LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 4})

The engine config keeps the canonical JSON text (a scalar, so that it travels as one flag through
`splitserve up`, compose and the config round trip); `SpeculativeConfig.parse` turns it into this
validated object once, with errors that name the key.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    """"ngram" (prompt lookup: copy what followed the latest earlier occurrence of the last n tokens)
    or "draft_model" (a smaller model with the same tokenizer proposes, greedily)."""
    num_speculative_tokens: int
    """Most tokens proposed for a sequence per step (1-16); the step verifies them all at once."""
    prompt_lookup_min: int = 2
    """ngram: the shortest suffix of the sequence looked up (tokens)."""
    prompt_lookup_max: int = 4
    """ngram: the longest suffix looked up; the longest that matches wins."""
    model: str | None = None
    """draft_model: its GGUF file or Hugging Face folder (the target's tokenizer and vocabulary)."""
    max_step_rows: int = 16
    """Proposals are made only while the step's decode rows (one per running sequence plus every
    proposed token) stay within this: past it the projections cost more per row and a rejected
    token is no longer nearly free. Measured on a 2-core CPU (benchmarks/spec_decode.py): at 32
    streams, proposals up to 48 rows gave 0.86-0.93x the tokens/s of none; at 16, 0.98-1.05x."""
    min_acceptance: float = 0.3
    """A sequence whose recent proposals were accepted at less than this rate stops proposing for a
    while (doubling each time it fails again), so text that does not repeat costs nothing."""

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"speculative_config.{key} must be {expected}, got {getattr(self, key)!r}")

        if self.method not in METHODS:
            raise bad("method", f"one of {', '.join(METHODS)}")
        for key, low, high in (("num_speculative_tokens", 1, MAX_SPECULATIVE_TOKENS),
                               ("prompt_lookup_min", 1, 64), ("prompt_lookup_max", 1, 64),
                               ("max_step_rows", 1, 1 << 16)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise bad(key, f"an int in [{low}, {high}]")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) is larger than "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        value = self.min_acceptance
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value <= 1):
            raise bad("min_acceptance", "a number in [0, 1]")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise bad("model", "the draft model's path (method draft_model)")
        elif self.model is not None:
            raise ValueError("speculative_config.model is only for method draft_model")

    @classmethod
    def parse(cls, spec: "str | dict | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """From the JSON text (the flag), a dict (`LLM(speculative_config=...)`) or an instance;
        None or "" is None (no speculation). Unknown keys and wrong types name the key."""
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            if not spec.strip():
                return None
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        for key in ("method", "num_speculative_tokens"):
            if key not in spec:
                raise ValueError(f"speculative_config.{key} is required")
        return cls(**spec)

    def to_json(self) -> str:
        """The canonical text the engine config keeps (sorted keys, defaults written out)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def canonical(spec: "str | dict | SpeculativeConfig | None") -> str | None:
    """The validated, canonical JSON text of a speculative config, or None."""
    parsed = SpeculativeConfig.parse(spec)
    return None if parsed is None else parsed.to_json()
