"""The OpenAI wire format without servers: request parsing, error bodies, logprob shapes, JSON logs,
and the field table (gateway/api_fields.py) the parser and the OpenAPI document share."""
from __future__ import annotations

import json
import logging

import pytest

from splitserve import logs
from splitserve.gateway import openai_api as oa
from splitserve.gateway import openai_responses as answers
from splitserve.gateway.request_body import parse_json
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
    # absent max_tokens stays unset: the gateway applies OpenAI's default 16, clipped to the context
    assert not ids.choices[0].request.sampling.HasField("max_tokens") and not ids.choices[0].fill_context


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
    assert parse_json(b'{"a": 1}') == {"a": 1}
    for raw in (b"{", b"[]", b"null", b"\xff"):
        assert error_of(parse_json, raw).code == "invalid_json"
    assert oa.new_request_id("abc-1") == "abc-1"
    assert len(oa.new_request_id(None)) == 32
    assert error_of(oa.new_request_id, "x" * 300).param == "x-request-id"
    assert error_of(oa.new_request_id, "bad\nid").param == "x-request-id"


class _Tok:
    """Byte-level BPE pieces as GPT-2 tokenizers spell them."""

    pieces = {1: "Ġhello", 2: "Ã©", 3: "âĢ"}

    def convert_ids_to_tokens(self, i):
        return self.pieces[i]


def test_token_text_recovers_raw_bytes_and_logprob_shapes():
    tokens = answers.TokenText(_Tok())
    assert tokens.bytes(1) == b" hello" and tokens.bytes(2) == "é".encode()
    assert tokens.bytes(3) == b"\xe2\x80"  # half of a character: raw bytes kept, text replaced
    assert tokens.text(3) == "\ufffd"
    lps = [common_pb2.TokenLogprob(token_id=1, logprob=-0.5, rank=1, top=[common_pb2.TopLogprob(token_id=1, logprob=-0.5)]),
           common_pb2.TokenLogprob(token_id=2, logprob=-1.0, rank=2, top=[common_pb2.TopLogprob(token_id=1, logprob=-0.2)])]
    comp = answers.completion_logprobs(lps, tokens, 3)
    assert comp == {"tokens": [" hello", "é"], "token_logprobs": [-0.5, -1.0],
                    "top_logprobs": [{" hello": -0.5}, {" hello": pytest.approx(-0.2)}], "text_offset": [3, 9]}
    chat = answers.chat_logprobs(lps, tokens)["content"]
    assert chat[1]["bytes"] == list("é".encode()) and chat[1]["top_logprobs"][0]["token"] == " hello"
    assert answers.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode() and answers.sse("[DONE]") == b"data: [DONE]\n\n"
    # a logprob of -inf (a token ruled out) is sent as a finite floor: strict JSON parsers read it
    ruled_out = [common_pb2.TokenLogprob(token_id=1, logprob=float("-inf"), top=[
        common_pb2.TopLogprob(token_id=2, logprob=float("-inf"))])]
    assert answers.completion_logprobs(ruled_out, tokens, 0)["token_logprobs"] == [answers.LOGPROB_FLOOR]
    assert answers.chat_logprobs(ruled_out, tokens)["content"][0]["top_logprobs"][0]["logprob"] == answers.LOGPROB_FLOOR


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


# ------------------------------------------------------------------ hostile bodies and the field table
def _ok_body(kind: str) -> dict:
    return {"model": "smol", "prompt": "x"} if kind == "completion" else {
        "model": "smol", "messages": [{"role": "user", "content": "x"}]}


def _parse(kind: str, body: dict, max_model_len: int | None = None):
    fn = oa.parse_completion if kind == "completion" else oa.parse_chat
    return fn(body, SERVED, "r", max_model_len)


@pytest.mark.parametrize("raw,param,words", [
    (b'{"model": "smol", "prompt": "a\\ud800b"}', "prompt", "surrogate"),
    (b'{"model": "smol", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content", "surrogate"),
    (b'{"model": "\\ud800", "prompt": "x"}', "model", "surrogate"),
    (b'{"stop": ["a", "\\ud83d"]}', "stop[1]", "surrogate"),
    (b'{"x": {"\\ud800": 1}}', "x", "field name"),
    (b'{"\\ud800": 1}', None, "field name"),
    (b"[" * 100_000 + b"]" * 100_000, None, "deeper than"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, None, "deeper than"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, None, "deeper than"),
    (b'{"p": ' + b"[" * 31 + b"1, 2" + b"]" * 31 + b"}", None, "deeper than"),  # numbers a level too deep
    (b'{"prompt": [1, 2, [3, "\\ud800"]]}', "prompt[2][1]", "surrogate"),  # a string among numbers
    (b'{"max_tokens": 1' + b"0" * 5000 + b"}", None, "digits"),
    (b"", None, "not valid JSON"),
    (b"\xff\xfe\x00", None, "not UTF-8"),
    (b'{"prompt": "caf\xe9"}', None, "not UTF-8"),
])
def test_hostile_json_is_a_400_naming_what_is_wrong(raw, param, words):
    err = error_of(parse_json, raw)
    assert err.status == 400 and err.param == param and words in err.message, err.message


def test_json_nesting_up_to_the_limit_is_accepted():
    assert parse_json(b'{"p": ' + b"[" * 30 + b"1, 2" + b"]" * 30 + b"}")  # numbers at level 32
    assert parse_json(b'{"p": ' + b"[" * 30 + b"[]" + b"]" * 30 + b"}")  # an empty list at level 32


def test_json_encodings_and_declared_charsets():
    body = {"model": "smol", "prompt": "café 𝄞"}
    text = json.dumps(body, ensure_ascii=False)
    for raw in (text.encode(), text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-32"),
                b"\xef\xbb\xbf" + text.encode()):
        assert parse_json(raw) == body
    assert parse_json(json.dumps({"p": "café"}, ensure_ascii=False).encode("latin-1"),
                         "application/json; charset=ISO-8859-1") == {"p": "café"}
    assert parse_json(text.encode(), "text/plain") == body  # any content type is read as JSON
    assert "unknown charset" in error_of(parse_json, b"{}", "application/json; charset=klingon").message
    assert "not a text encoding" in error_of(parse_json, b"{}", "application/json; charset=base64").message
    assert "Content-Type was 'application/x-www-form-urlencoded'" in error_of(
        parse_json, b"model=x&prompt=y", "application/x-www-form-urlencoded").message
    # the JSON literals NaN and Infinity parse, and are then refused by the field's range
    assert error_of(_parse, "completion", {**_ok_body("completion"), "temperature": float("nan")}).param == "temperature"
    assert error_of(_parse, "completion", {**_ok_body("completion"), "top_p": 10**400}).param == "top_p"


def test_the_parser_reads_exactly_the_fields_of_the_table():
    """Every field the table declares is read by the parser and no other: the OpenAPI document
    (built from the table) and the parser agree on the field list."""
    from splitserve.gateway.api_fields import FIELDS

    class Recording(dict):
        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

    for kind in ("completion", "chat"):
        for extra in ({}, {"stream": True, "stream_options": {}}):
            body = Recording({**_ok_body(kind), **extra})
            body.read = set()
            _parse(kind, body)
            assert body.read == set(FIELDS[kind]), (kind, body.read ^ set(FIELDS[kind]))


def _bounded_fields():
    from splitserve.gateway.api_fields import FIELDS

    return [(kind, spec) for kind in ("completion", "chat") for spec in FIELDS[kind].values()
            if spec.kind in ("integer", "number")]


@pytest.mark.parametrize("kind,spec", _bounded_fields(), ids=lambda v: getattr(v, "name", v))
def test_every_numeric_limit_of_the_table_is_the_parsers(kind, spec):
    """At each bound accepted, past it refused naming the field (max_tokens: by the model's context)."""
    high = spec.high_on(100)
    step = 1 if spec.kind == "integer" else 1e-6

    def body(v):
        b = {**_ok_body(kind), spec.name: v}
        if spec.name == "top_logprobs":
            b["logprobs"] = True
        return b
    low_ok = spec.low + step if spec.low_open else spec.low
    for v in (low_ok, high):
        _parse(kind, body(v), 100)
    for v in (spec.low if spec.low_open else spec.low - step, high + step):
        err = error_of(_parse, kind, body(v), 100)
        assert err.param == spec.name and spec.name in err.message
    if spec.context_bound:
        msg = error_of(_parse, kind, body(100), 100).message
        assert "context is 100 tokens" in msg and "at most 99" in msg and msg.startswith(spec.name)


def test_fields_accepted_only_in_some_forms_and_caps_on_lists():
    from splitserve.gateway.api_fields import FIELDS, MAX_STOP_TOKEN_IDS

    for kind in ("completion", "chat"):
        for spec in FIELDS[kind].values():
            if spec.kind != "custom" or "enum" not in spec.schema:
                continue
            for good in spec.schema["enum"] + [None]:
                _parse(kind, {**_ok_body(kind), spec.name: good})
            for wrong in (0.5, "x", [1], {"a": 1}, True):
                err = error_of(_parse, kind, {**_ok_body(kind), spec.name: wrong})
                assert err.param == spec.name and err.code == "unsupported_parameter", (spec.name, wrong)
    ids = list(range(MAX_STOP_TOKEN_IDS))
    _parse("completion", {**_ok_body("completion"), "stop_token_ids": ids})
    err = error_of(_parse, "completion", {**_ok_body("completion"), "stop_token_ids": ids + [1]})
    assert err.param == "stop_token_ids" and str(MAX_STOP_TOKEN_IDS) in err.message
    for key, value in (("stop_token_ids", [2**32]), ("top_k", 2**31), ("prompt", [2**32])):
        assert error_of(_parse, "completion", {**_ok_body("completion"), key: value}).param == key


def test_chat_without_max_tokens_fills_the_context_and_unknown_fields_are_logged_once(caplog):
    parsed = _parse("chat", {**_ok_body("chat"), "vendor_x": 1, "vendor_y": 2})
    assert parsed.choices[0].fill_context and not parsed.choices[0].request.sampling.HasField("max_tokens")
    assert not _parse("chat", {**_ok_body("chat"), "max_completion_tokens": 3}).choices[0].fill_context
    caplog.clear()
    with caplog.at_level(logging.WARNING, "splitserve.gateway.http"):
        for _ in range(3):
            _parse("completion", {**_ok_body("completion"), "vendor_z": 1, "vendor_y": 1})
    logged = [r.getMessage() for r in caplog.records if "unknown request field" in r.getMessage()]
    assert len(logged) == 1 and "vendor_z" in logged[0]  # vendor_y was logged by the chat call already


def test_json_integers_written_as_numbers_and_values_below_float32():
    """What JSON Schema calls valid is served: 5.0 is an integer (token ids too), and a top_p
    above 0 stays above 0 on the float32 wire."""
    parsed = _parse("completion", {**_ok_body("completion"), "prompt": [46746.0, 7], "stop_token_ids": [71.0],
                                   "max_tokens": 2.0, "top_p": 5e-324})
    req = parsed.choices[0].request
    assert list(req.prompt_token_ids.ids) == [46746, 7] and list(req.sampling.stop_token_ids) == [71]
    assert req.sampling.max_tokens == 2 and req.sampling.top_p > 0
    for wrong in ([1.5], [float("inf")], [True]):
        assert error_of(_parse, "completion", {**_ok_body("completion"), "prompt": wrong}).param == "prompt"
        assert error_of(_parse, "completion", {**_ok_body("completion"), "stop_token_ids": wrong}).param == \
            "stop_token_ids"


def test_what_the_document_calls_valid_for_stop_is_accepted():
    """stop: [] (no stop strings) is served, so the schema allows an empty array (a fuzz finding)."""
    from splitserve.gateway.api_fields import FIELDS

    assert not _parse("completion", {**_ok_body("completion"), "stop": []}).choices[0].request.sampling.stop
    assert {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 16} in \
        FIELDS["completion"]["stop"].schema["anyOf"]
