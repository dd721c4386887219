"""Benchmark workloads: the prompts and how many tokens each request asks for. No network.

- `random`: prompts of random token ids (drawn from the tokenizer's vocabulary, special tokens
  left out), sent as token-id prompts so the server sees exactly these lengths. Prompt and output
  lengths are uniform integers in [floor(len * (1 - r)), ceil(len * (1 + r))] for range ratio r
  (r = 0: exactly len). An optional shared prefix of `prefix_len` tokens goes in front of every
  prompt (the prompt is then prefix_len + its drawn length).
- `prefix-repetition`: `num_prefixes` random prefixes of exactly `prefix_len` tokens; prompt i is
  prefix i % num_prefixes followed by a suffix of its own (its length drawn as above, no two alike).
  num_prefixes = 1: every prompt shares one prefix (prefix-cache hits after the first);
  num_prefixes = num_prompts: every prefix distinct (the cache-miss baseline of the same lengths).
- `sharegpt`: the public ShareGPT JSON (a list of {"conversations": [{"from": "human"|"gpt",
  "value": ...}, ...]}): the first human turn is the prompt (sent as text), the gpt turn after it
  gives the output length in tokens (or a fixed output length). Entries are shuffled (seeded) and
  those too short or too long are skipped.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

DATASETS = ("random", "prefix-repetition", "sharegpt")


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: `prompt` is token ids (sent as such) or text."""

    prompt: list[int] | str
    prompt_len: int  # tokens (exact for token-id prompts; by the benchmark's tokenizer for text)
    output_len: int  # max_tokens asked for


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1])  # the arrivals use [seed, 2]


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """The inclusive [low, high] that lengths are drawn from (never below 1)."""
    if length < 1:
        raise ValueError(f"lengths must be >= 1, got {length}")
    if not (0 <= range_ratio < 1):
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return low, high


def _lengths(rng: np.random.Generator, n: int, length: int, range_ratio: float) -> list[int]:
    low, high = length_bounds(length, range_ratio)
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def candidate_token_ids(vocab_size: int, special_ids: Sequence[int] = ()) -> np.ndarray:
    """The ids random prompts are made of: the vocabulary less the special tokens."""
    ids = np.setdiff1d(np.arange(vocab_size), np.asarray(list(special_ids), dtype=np.int64))
    if ids.size == 0:
        raise ValueError("the tokenizer has no ordinary tokens to build prompts from")
    return ids


def _draw(rng: np.random.Generator, ids: np.ndarray, n: int) -> list[int]:
    return [int(t) for t in ids[rng.integers(0, ids.size, size=n)]]


def _check_n(num_prompts: int) -> None:
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")


def random_requests(num_prompts: int, input_len: int, output_len: int, token_ids: np.ndarray,
                    range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0) -> list[BenchRequest]:
    _check_n(num_prompts)
    if prefix_len < 0:
        raise ValueError(f"--prefix-len must be >= 0, got {prefix_len}")
    rng = _rng(seed)
    in_lens = _lengths(rng, num_prompts, input_len, range_ratio)
    out_lens = _lengths(rng, num_prompts, output_len, range_ratio)
    prefix = _draw(rng, token_ids, prefix_len)
    return [BenchRequest(prefix + _draw(rng, token_ids, n), prefix_len + n, o) for n, o in zip(in_lens, out_lens)]


def prefix_repetition_requests(num_prompts: int, prefix_len: int, suffix_len: int, output_len: int,
                               token_ids: np.ndarray, num_prefixes: int = 1, range_ratio: float = 0.0,
                               seed: int = 0) -> list[BenchRequest]:
    _check_n(num_prompts)
    if prefix_len < 1:
        raise ValueError(f"--prefix-len must be >= 1 for prefix-repetition, got {prefix_len}")
    if num_prefixes < 1:
        raise ValueError(f"--num-prefixes must be >= 1, got {num_prefixes}")
    rng = _rng(seed)
    suffix_lens = _lengths(rng, num_prompts, suffix_len, range_ratio)
    out_lens = _lengths(rng, num_prompts, output_len, range_ratio)
    prefixes = [_draw(rng, token_ids, prefix_len) for _ in range(num_prefixes)]
    seen: set[tuple[int, ...]] = set()
    out = []
    for i, (n, o) in enumerate(zip(suffix_lens, out_lens)):
        for _ in range(1000):  # distinct suffixes (a collision only matters for very short ones)
            suffix = _draw(rng, token_ids, n)
            if tuple(suffix) not in seen:
                break
        else:
            raise ValueError(f"cannot draw {num_prompts} distinct suffixes of about {suffix_len} tokens")
        seen.add(tuple(suffix))
        out.append(BenchRequest(prefixes[i % num_prefixes] + suffix, prefix_len + n, o))
    return out


def sharegpt_pairs(data) -> list[tuple[str, str]]:
    """(first human turn, the gpt answer after it) of every entry that has both."""
    if not isinstance(data, list):
        raise ValueError("a ShareGPT file holds a JSON list of {\"conversations\": [...]} entries")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        for i, turn in enumerate(turns[:-1]):
            if isinstance(turn, dict) and turn.get("from") == "human":
                answer = turns[i + 1]
                if isinstance(answer, dict) and answer.get("from") == "gpt" and isinstance(turn.get("value"), str) \
                        and isinstance(answer.get("value"), str):
                    pairs.append((turn["value"], answer["value"]))
                break
    return pairs


def sharegpt_requests(data, num_prompts: int, encode: Callable[[str], list[int]], output_len: int | None = None,
                      seed: int = 0, min_len: int = 4, max_prompt_len: int = 1024,
                      max_total_len: int = 2048) -> list[BenchRequest]:
    """`num_prompts` requests from parsed ShareGPT `data`. Skipped: prompts or answers under
    `min_len` tokens (the answer only when its length is used), prompts over `max_prompt_len`,
    prompt + output over `max_total_len`."""
    _check_n(num_prompts)
    pairs = sharegpt_pairs(data)
    order = _rng(seed).permutation(len(pairs))
    out: list[BenchRequest] = []
    for k in order:
        prompt, answer = pairs[int(k)]
        prompt_len = len(encode(prompt))
        out_len = output_len if output_len is not None else len(encode(answer))
        if prompt_len < min_len or (output_len is None and out_len < min_len):
            continue
        if prompt_len > max_prompt_len or prompt_len + out_len > max_total_len:
            continue
        out.append(BenchRequest(prompt, prompt_len, out_len))
        if len(out) == num_prompts:
            return out
    raise ValueError(f"the ShareGPT data has only {len(out)} usable entries of the {num_prompts} asked for "
                     f"({len(pairs)} prompt/answer pairs; prompts of {min_len}-{max_prompt_len} tokens, "
                     f"prompt + output <= {max_total_len})")


def load_sharegpt(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--dataset-path: no such file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"--dataset-path {path}: not valid JSON: {exc}") from None
