"""The OpenAI-compatible HTTP API's answers: usage, logprob objects and server-sent events.

Every number in an answer is finite JSON: a logprob that is -inf (a token the model rules out) is
sent as LOGPROB_FLOOR, as vLLM does, so strict JSON parsers read every chunk.
"""
from __future__ import annotations

import json
import math
from functools import lru_cache

LOGPROB_FLOOR = -9999.0  # what a non-finite logprob is sent as


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def stop_reason(value: str | None):
    """vLLM's stop_reason: the stop string, or the stop token id as an integer; None for EOS/length."""
    if not value:
        return None
    return int(value) if value.isdigit() else value


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


class TokenText:
    """Token id -> its text and raw bytes, for logprobs (byte-level BPE tokens map back to bytes)."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    @lru_cache(maxsize=65536)
    def bytes(self, token_id: int) -> bytes:
        piece = self._tok.convert_ids_to_tokens(int(token_id))
        table = _byte_decoder()
        if isinstance(piece, str) and piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self._tok.decode([int(token_id)], skip_special_tokens=False).encode()

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable stand-ins for all 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def completion_logprobs(lps: list, tokens: TokenText, offset0: int) -> dict:
    """The completions `logprobs` object for a run of TokenLogprob."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = offset0
    for lp in lps:
        text = tokens.text(lp.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(finite(lp.logprob))
        out["top_logprobs"].append({tokens.text(t.token_id): finite(t.logprob) for t in lp.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(lps: list, tokens: TokenText) -> dict:
    return {"content": [
        {"token": tokens.text(lp.token_id), "logprob": finite(lp.logprob), "bytes": list(tokens.bytes(lp.token_id)),
         "top_logprobs": [{"token": tokens.text(t.token_id), "logprob": finite(t.logprob),
                           "bytes": list(tokens.bytes(t.token_id))} for t in lp.top]}
        for lp in lps]}


def sse(obj: dict | str) -> bytes:
    """One server-sent event."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()
