"""gateway/prepare.py without a model: the context limit refused before any work, the default
max_tokens clipped to the room left, and prompts whose length alone proves them too long."""
from __future__ import annotations

import pytest

from splitserve.gateway.prepare import InvalidRequest, ModelInfo, fill_context, prepare_request
from splitserve.v1 import common_pb2, gateway_pb2

MODEL = ModelInfo("m", "/m.gguf", block_size=4, max_model_len=20, vocab_size=300)


class _Backend:
    normalizer = None


class CharTokenizer:
    """One token per character (so an n-character prompt is n tokens); counts its calls. Its
    vocabulary's longest entry is 3 characters."""

    backend_tokenizer = _Backend()

    def get_vocab(self):
        return {"a": 0, "ab": 1, "abc": 2}

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return [ord(c) % 300 for c in text]

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        self.calls += 1
        return [1] + [ord(c) % 300 for m in messages for c in m["content"]] + [2]


def _request(prompt: str, **sampling) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt=prompt, sampling=common_pb2.SamplingParams(**sampling))


def test_prompt_plus_max_tokens_beyond_the_context_is_refused_naming_both_numbers_and_the_limit():
    tok = CharTokenizer()
    assert prepare_request(_request("x" * 12, max_tokens=8), tok, MODEL).params.max_tokens == 8  # 20: fits
    with pytest.raises(InvalidRequest) as err:
        prepare_request(_request("x" * 12, max_tokens=9), tok, MODEL)
    assert err.value.field == "sampling.max_tokens"
    message = str(err.value)
    assert message.startswith("sampling.max_tokens is 9") and "12 tokens" in message and "21 in all" in message
    assert "context of 20 tokens" in message and "at most 8" in message
    with pytest.raises(InvalidRequest) as err:
        prepare_request(_request("x" * 3, max_tokens=100_000), tok, MODEL)
    assert "100003 in all" in str(err.value)


def test_an_unset_max_tokens_is_16_clipped_to_the_room_left_never_a_refusal():
    tok = CharTokenizer()
    short = prepare_request(_request("xy"), tok, MODEL)
    assert short.params.max_tokens == 16 and short.sampling.max_tokens == 16
    long = prepare_request(_request("x" * 19), tok, MODEL)  # one token of room
    assert long.params.max_tokens == 1 and long.sampling.max_tokens == 1
    with pytest.raises(InvalidRequest, match="no room for output"):
        prepare_request(_request("x" * 20), tok, MODEL)
    filled = fill_context(short, MODEL.max_model_len)  # the HTTP chat default: the rest of the context
    assert filled.params.max_tokens == 18 and filled.sampling.max_tokens == 18 and short.params.max_tokens == 16


def test_a_prompt_too_long_by_its_characters_alone_is_refused_without_tokenizing():
    tok = CharTokenizer()
    with pytest.raises(InvalidRequest, match="60 characters, so at least 20 tokens") as err:
        prepare_request(_request("x" * 60), tok, MODEL)  # 60 chars / at most 3 per token >= 20
    assert err.value.field == "prompt" and tok.calls == 0
    chat = gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatMessages(messages=[
        gateway_pb2.ChatMessage(role="user", content="x" * 40), gateway_pb2.ChatMessage(role="user", content="y" * 20)]))
    with pytest.raises(InvalidRequest, match="at least 20 tokens") as err:
        prepare_request(chat, tok, MODEL)
    assert err.value.field == "chat" and tok.calls == 0
    with pytest.raises(InvalidRequest, match="59 tokens"):  # shorter: tokenized, then refused by its count
        prepare_request(_request("x" * 59), tok, MODEL)
    assert tok.calls == 1


def test_grpc_requests_meet_the_http_apis_caps_on_stop_lists_and_message_counts():
    from splitserve.gateway.api_fields import MAX_STOP, MAX_STOP_TOKEN_IDS

    tok = CharTokenizer()
    prepare_request(_request("x", stop=["a"] * MAX_STOP, stop_token_ids=[1] * MAX_STOP_TOKEN_IDS), tok, MODEL)
    for field, value in (("stop", ["a"] * (MAX_STOP + 1)), ("stop_token_ids", [1] * (MAX_STOP_TOKEN_IDS + 1))):
        with pytest.raises(InvalidRequest, match="at most") as err:
            prepare_request(_request("x", **{field: value}), tok, MODEL)
        assert err.value.field == f"sampling.{field}"
    many = gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatMessages(messages=[
        gateway_pb2.ChatMessage(role="user", content="")] * 20))
    tok = CharTokenizer()
    with pytest.raises(InvalidRequest, match="20 messages") as err:
        prepare_request(many, tok, MODEL)
    assert err.value.field == "chat" and tok.calls == 0
