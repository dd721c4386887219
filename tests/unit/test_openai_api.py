"""The OpenAI wire format without servers: request parsing, error bodies, logprob shapes, JSON logs."""
from __future__ import annotations

import json
import logging

import pytest

from splitserve import logs
from splitserve.gateway import openai_api as oa
from splitserve.v1 import common_pb2

SERVED = ["smol"]


def error_of(fn, *args) -> oa.ApiError:
    with pytest.raises(oa.ApiError) as err:
        fn(*args)
    return err.value


def test_completion_request_maps_every_field():
    parsed = oa.parse_completion({
        "model": "smol", "prompt": ["a b", "c"], "n": 2, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "top_k": 20, "min_p": 0.05, "seed": 11, "stop": "\n", "logprobs": 3, "ignore_eos": True,
        "cache_salt": "tenant", "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
        "unknown_vendor_field": {"ignored": True},
    }, SERVED, "rid")
    assert (parsed.kind, parsed.stream, parsed.include_usage, parsed.logprobs) == ("completion", True, True, 3)
    assert [c.index for c in parsed.choices] == [0, 1, 2, 3]
    assert [c.prompt_index for c in parsed.choices] == [0, 0, 1, 1]
    assert [c.request.request_id for c in parsed.choices] == ["rid-0", "rid-1", "rid-2", "rid-3"]
    first = parsed.choices[0].request
    assert first.prompt == "a b" and first.cache_salt == "tenant" and first.model == "smol"
    sp = first.sampling
    assert (sp.max_tokens, sp.top_k, sp.seed, list(sp.stop), sp.logprobs, sp.ignore_eos) == (7, 20, 11, ["\n"], 3, True)
    assert sp.temperature == pytest.approx(0.5) and sp.top_p == pytest.approx(0.9) and sp.min_p == pytest.approx(0.05)
    # n > 1 with a seed: distinct, reproducible seeds per choice.
    assert [c.request.sampling.seed for c in parsed.choices] == [11, 12, 11, 12]
    ids = oa.parse_completion({"model": "smol", "prompt": [[1, 2], [3]]}, SERVED, "x")
    assert [list(c.request.prompt_token_ids.ids) for c in ids.choices] == [[1, 2], [3]]
    assert ids.choices[0].request.sampling.max_tokens == 16  # OpenAI's default


def test_chat_request_content_parts_roles_and_token_limits():
    parsed = oa.parse_chat({
        "model": "smol", "messages": [{"role": "developer", "content": "be brief"},
                                      {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                                   {"type": "text", "text": "there"}]}],
        "max_tokens": 9, "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 2,
        "response_format": {"type": "text"}, "tool_choice": "none",
    }, SERVED, "r")
    req = parsed.choices[0].request
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "be brief"), ("user", "hi there")]
    assert req.sampling.max_tokens == 5 and parsed.logprobs == 2
    assert oa.parse_chat({"model": "smol", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
                         SERVED, "r").logprobs == 0


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x"}, 400, "model"),
    ({"model": 3, "prompt": "x"}, 400, "model"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": "smol"}, 400, "prompt"),
    ({"model": "smol", "prompt": ""}, 400, "prompt"),
    ({"model": "smol", "prompt": []}, 400, "prompt"),
    ({"model": "smol", "prompt": ["a", ""]}, 400, "prompt"),
    ({"model": "smol", "prompt": [True]}, 400, "prompt"),
    ({"model": "smol", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "smol", "prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"model": "smol", "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ({"model": "smol", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": "smol", "prompt": "x", "temperature": float("nan")}, 400, "temperature"),
    ({"model": "smol", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "smol", "prompt": "x", "top_k": -2}, 400, "top_k"),
    ({"model": "smol", "prompt": "x", "min_p": -0.1}, 400, "min_p"),
    ({"model": "smol", "prompt": "x", "seed": "7"}, 400, "seed"),
    ({"model": "smol", "prompt": "x", "n": 17}, 400, "n"),
    ({"model": "smol", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"model": "smol", "prompt": "x", "stop": ""}, 400, "stop"),
    ({"model": "smol", "prompt": "x", "stop": ["a"] * 17}, 400, "stop"),
    ({"model": "smol", "prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ({"model": "smol", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "smol", "prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"model": "smol", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"model": "smol", "prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"model": "smol", "prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"model": "smol", "prompt": "x", "stream": 1}, 400, "stream"),
    ({"model": "smol", "prompt": "x", "stream": True, "stream_options": []}, 400, "stream_options"),
    ({"model": "smol", "prompt": "x", "stream": True, "stream_options": {"include_usage": "y"}}, 400,
     "stream_options.include_usage"),
    ({"model": "smol", "prompt": "x", "cache_salt": 5}, 400, "cache_salt"),
])
def test_completion_errors_name_the_field(body, status, param):
    err = error_of(oa.parse_completion, body, SERVED, "r")
    assert (err.status, err.param) == (status, param)
    assert param.split(".")[0] in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body,param", [
    ({"model": "smol"}, "messages"),
    ({"model": "smol", "messages": []}, "messages"),
    ({"model": "smol", "messages": ["hi"]}, "messages[0]"),
    ({"model": "smol", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"model": "smol", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "smol", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, "logprobs"),
    ({"model": "smol", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1},
     "max_completion_tokens"),
])
def test_chat_errors_name_the_field(body, param):
    err = error_of(oa.parse_chat, body, SERVED, "r")
    assert (err.status, err.param) == (400, param) and param in err.message


def test_json_body_and_request_id():
    assert oa.parse_json(b'{"a": 1}') == {"a": 1}
    for raw in (b"{", b"[]", b"null", b"\xff"):
        assert error_of(oa.parse_json, raw).code == "invalid_json"
    assert oa.new_request_id("abc-1") == "abc-1"
    assert len(oa.new_request_id(None)) == 32
    assert error_of(oa.new_request_id, "x" * 300).param == "x-request-id"
    assert error_of(oa.new_request_id, "bad\nid").param == "x-request-id"


class _FakeHF:
    """Byte-level BPE pieces as GPT-2 tokenizers spell them."""

    pieces = {1: "Ġhello", 2: "Ã©", 3: "âĢ"}

    def convert_ids_to_tokens(self, i):
        return self.pieces[i]


class _Tok:
    hf = _FakeHF()


def test_token_text_recovers_raw_bytes_and_logprob_shapes():
    tokens = oa.TokenText(_Tok())
    assert tokens.bytes(1) == b" hello" and tokens.bytes(2) == "é".encode()
    assert tokens.bytes(3) == b"\xe2\x80"  # half of a character: raw bytes kept, text replaced
    assert tokens.text(3) == "\ufffd"
    lps = [common_pb2.TokenLogprob(token_id=1, logprob=-0.5, rank=1, top=[common_pb2.TopLogprob(token_id=1, logprob=-0.5)]),
           common_pb2.TokenLogprob(token_id=2, logprob=-1.0, rank=2, top=[common_pb2.TopLogprob(token_id=1, logprob=-0.2)])]
    comp = oa.completion_logprobs(lps, tokens, 3)
    assert comp == {"tokens": [" hello", "é"], "token_logprobs": [-0.5, -1.0],
                    "top_logprobs": [{" hello": -0.5}, {" hello": pytest.approx(-0.2)}], "text_offset": [3, 9]}
    chat = oa.chat_logprobs(lps, tokens)["content"]
    assert chat[1]["bytes"] == list("é".encode()) and chat[1]["top_logprobs"][0]["token"] == " hello"
    assert oa.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode() and oa.sse("[DONE]") == b"data: [DONE]\n\n"


def test_json_logs_carry_the_key_value_pairs(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)  # pytest's own handlers live there too
    logs.configure(logging.INFO, "json")
    try:
        logging.getLogger("splitserve.test").info("request done: request_id=%s prompt_tokens=%d", "r-1", 5)
        line = capsys.readouterr().err.strip().splitlines()[-1]
        record = json.loads(line)
        assert record["request_id"] == "r-1" and record["prompt_tokens"] == "5" and record["level"] == "INFO"
        assert record["message"] == "request done: request_id=r-1 prompt_tokens=5"
        with pytest.raises(ValueError, match="log format"):
            logs.configure(logging.INFO, "xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
