"""The OpenAI-compatible HTTP API, /health and /metrics of `splitserve up` (real processes, real
HTTP and gRPC on loopback, real Redis), driven with the official `openai` client and raw HTTP."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, in a small village,"]
MAX_TOKENS = 12
# Long enough to fill several 16-token blocks: a repeat of it hits the prefix cache.
LONG = ("You are a careful assistant that answers questions about the history of science. " * 6).strip()


def http(method: str, url: str, body=None, headers: dict | None = None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one request; never raises for an HTTP status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, hdrs, text = resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except ValueError:
        return status, hdrs, text


@pytest.fixture(scope="module")
def api(http_stack):
    return openai.OpenAI(base_url=http_stack.http_base, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(api):
    models = api.models.list().data
    assert len(models) == 1
    return models[0].id


@pytest.fixture(scope="module")
def references(llm_f32):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True)
    return {p: out for p, out in zip(PROMPTS, llm_f32.generate(PROMPTS, params))}


def test_completions_equal_the_offline_engine_streamed_or_not(api, model, references, llm_f32):
    for prompt in PROMPTS:
        ref = references[prompt]
        full = api.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert full.choices[0].text == ref.text
        assert full.choices[0].finish_reason == "length"
        assert full.usage.prompt_tokens == len(llm_f32.tokenizer.encode(prompt))
        assert full.usage.completion_tokens == MAX_TOKENS
        assert full.usage.total_tokens == full.usage.prompt_tokens + MAX_TOKENS
        chunks = list(api.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(texts) == ref.text and len(texts) > 1  # streamed in pieces
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
        assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_streamed_equals_non_streamed_and_the_offline_chat(api, model, llm_f32):
    messages = [{"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France?"}]
    ref = llm_f32.chat([messages], SamplingParams(temperature=0, max_tokens=24))[0]
    full = api.chat.completions.create(model=model, messages=messages, max_completion_tokens=24, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == ref.text
    assert full.choices[0].finish_reason == ref.finish_reason
    assert full.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert full.usage.completion_tokens == len(ref.token_ids)
    stream = list(api.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                              stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ref.text
    assert stream[-1].choices[0].finish_reason == ref.finish_reason


def test_completion_logprobs_match_the_offline_engine(api, model, references):
    prompt = PROMPTS[0]
    ref = references[prompt]
    out = api.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=2,
                                 extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == MAX_TOKENS == len(ref.logprobs)
    for got, want, top in zip(lp.token_logprobs, ref.logprobs, lp.top_logprobs):
        assert got == pytest.approx(want.logprob, abs=1e-4)
        assert len(top) <= 2  # two alternatives (fewer when two tokens decode to the same text)
        assert max(top.values()) == pytest.approx(want.top[0][1], abs=1e-4)
    assert "".join(lp.tokens) == ref.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # Streamed, the logprobs arrive with their tokens.
    streamed = [c.choices[0].logprobs for c in api.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=2, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert [x for s in streamed for x in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [x for s in streamed for x in s.text_offset] == lp.text_offset
    # Chat logprobs carry tokens and their bytes.
    chat = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(bytes(c.bytes).decode(errors="replace") == c.token for c in content)


def test_repeated_long_prompt_reports_cached_tokens_and_n_choices(api, model):
    first = api.completions.create(model=model, prompt=LONG, max_tokens=2, temperature=0)
    again = api.completions.create(model=model, prompt=LONG, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 48
    assert again.usage.prompt_tokens_details.cached_tokens >= 48
    assert again.usage.prompt_tokens_details.cached_tokens % 16 == 0
    # n and several prompts: one choice each, in order; usage counts each prompt once.
    out = api.completions.create(model=model, prompt=[PROMPTS[0], PROMPTS[1]], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text and out.usage.completion_tokens == 12
    single = [api.completions.create(model=model, prompt=p, max_tokens=1).usage.prompt_tokens for p in PROMPTS[:2]]
    assert out.usage.prompt_tokens == sum(single)
    echo = api.completions.create(model=model, prompt=PROMPTS[0], max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith(PROMPTS[0]) and echo.choices[0].text != PROMPTS[0]


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(api, model):
    kw = dict(model=model, prompt=PROMPTS[2], max_tokens=10, temperature=0.9, top_p=0.95, seed=1234,
              extra_body={"top_k": 40, "min_p": 0.01, "ignore_eos": True})
    a, b = api.completions.create(**kw), api.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    greedy = api.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy.strip().split()[1]  # a word from the middle of the greedy answer
    cut = api.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == greedy[:greedy.index(stop)]


BAD_INPUTS = [
    # (path, body, status, param)
    ("/completions", {"prompt": "hi"}, 400, "model"),
    ("/completions", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ("/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/completions", {"model": "{model}", "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "hi"}],
                           "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/completions", {"model": "{model}", "prompt": "hi", "temperature": 7.5}, 400, "temperature"),
    ("/completions", {"model": "{model}", "prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("/completions", {"model": "{model}", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/completions", {"model": "{model}", "prompt": "hello " * 9000}, 400, "prompt"),
    ("/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "hello " * 9000}]},
     400, "messages"),
    ("/completions", {"model": "{model}", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/completions", {"model": "{model}", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/completions", {"model": "{model}", "prompt": 42}, 400, "prompt"),
    ("/completions", {"model": "{model}", "prompt": [1, -2, 3]}, 400, "prompt"),
    ("/completions", {"model": "{model}", "prompt": [10**9]}, 400, "prompt"),
    ("/completions", {"model": "{model}", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/completions", {"model": "{model}", "prompt": "hi", "n": 0}, 400, "n"),
    ("/completions", {"model": "{model}", "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/completions", {"model": "{model}", "prompt": "hi", "stop": [1, 2]}, 400, "stop"),
    ("/completions", {"model": "{model}", "prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("/completions", {"model": "{model}", "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/completions", {"model": "{model}", "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/chat/completions", {"model": "{model}", "messages": "hi"}, 400, "messages"),
    ("/chat/completions", {"model": "{model}", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role"),
    ("/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": 7}]}, 400,
     "messages[0].content"),
    ("/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "hi"}],
                           "top_logprobs": 2}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_INPUTS, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_gets_an_openai_error_naming_the_field(http_stack, model, path, body, status, param):
    body = {k: (model if v == "{model}" else v) for k, v in body.items()}
    code, _, reply = http("POST", http_stack.http_base + path, body)
    assert code == status, reply
    error = reply["error"]
    assert error["param"] == param and param.split("[")[0].split(".")[0] in error["message"], error
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    ok, _, _ = http("GET", http_stack.http_base.removesuffix("/v1") + "/health")
    assert ok == 200  # and the server keeps serving


def test_malformed_requests_and_routes(http_stack, model):
    base = http_stack.http_base
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        code, _, reply = http("POST", base + "/completions", raw=raw)
        assert code == 400 and reply["error"]["code"] == "invalid_json", (raw, reply)
    code, _, reply = http("GET", base + "/no/such/route")
    assert code == 404 and "no route" in reply["error"]["message"]
    code, _, reply = http("GET", base + "/completions")
    assert code == 405
    code, headers, reply = http("POST", base + "/completions", {"model": model, "prompt": "Hi", "max_tokens": 2},
                                headers={"x-request-id": "trace-me-42"})
    assert code == 200 and headers.get("x-request-id") == "trace-me-42" and reply["id"] == "cmpl-trace-me-42"
    code, _, reply = http("GET", base + "/models/" + model)
    assert code == 200 and reply["id"] == model
    # The id follows the request into the gateway's, the prefill worker's and the decode worker's logs.
    deadline = time.monotonic() + 10
    loggers: set[str] = set()
    while loggers != {"splitserve.gateway:", "splitserve.prefill:", "splitserve.decode:"} and time.monotonic() < deadline:
        loggers = {w for line in list(http_stack.log) if "request_id=trace-me-42" in line
                   for w in line.split() if w.startswith("splitserve.")}
        time.sleep(0.1)
    assert loggers == {"splitserve.gateway:", "splitserve.prefill:", "splitserve.decode:"}


# (raw body, content type, expected status, param, words in the message): what hostile or careless
# clients send; every one is a 4xx naming what is wrong, or a correct answer, never a 5xx
HOSTILE = [
    (b'{"model": "{m}", "prompt": "a\\ud800b", "max_tokens": 2}', None, 400, "prompt", "surrogate"),
    (b'{"model": "{m}", "messages": [{"role": "user", "content": "\\udfff"}]}', None, 400, "messages[0].content",
     "surrogate"),
    (b'{"model": "\\ud800", "prompt": "x"}', None, 400, "model", "surrogate"),
    (b'{"model": "{m}", "prompt": "x", "\\ud800": 1}', None, 400, None, "field name"),
    (b'{"model": "{m}", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, 400, None, "deeper than"),
    (b'{"model": "{m}", "prompt": "x", "temperature": NaN}', None, 400, "temperature", "nan"),
    (b'{"model": "{m}", "prompt": "x", "top_p": Infinity}', None, 400, "top_p", "inf"),
    (b'{"model": "{m}", "prompt": "x", "temperature": 1e999}', None, 400, "temperature", "inf"),
    (b'{"model": "{m}", "prompt": "x", "max_tokens": 1' + b"0" * 400 + b"}", None, 400, "max_tokens", "context"),
    (b'{"model": "{m}", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", None, 400, None, "digits"),
    (b'{"model": "{m}", "prompt": "x", "seed": 1' + b"0" * 400 + b"}", None, 400, "seed", "seed"),
    (b'{"model": "{m}", "prompt": "x", "top_k": 1099511627776}', None, 400, "top_k", "2147483647"),
    (b'{"model": "{m}", "prompt": [49152]}', None, 400, "prompt", "vocabulary"),
    (b'{"model": "{m}", "prompt": "x", "stop_token_ids": [4294967296]}', None, 400, "stop_token_ids", "integers"),
    (b'{"model": "{m}", "prompt": "x", "stop_token_ids": [' + b"1," * 300 + b'1]}', None, 400, "stop_token_ids",
     "at most 256"),
    (b'{"model": "{m}", "prompt": "x", "max_tokens": 2, "max_tokens": "x"}', None, 400, "max_tokens", "integer"),
    (b'{"model": "{m}", "prompt": "' + b"word " * 1_000_000 + b'"}', None, 400, "prompt", "characters"),
    (b'{"model": "{m}", "messages": [{"role": "user", "content": null}]}', None, 400, "messages[0].content", "null"),
    (b'{"model": "{m}", "messages": [{"role": "tool", "content": "x"}]}', None, 400, "messages[0].role", "tool"),
    (b'{"model": "{m}", "prompt": "x", "best_of": 2, "n": 2}', None, 400, "best_of", "not supported"),
    (b'model=x&prompt=y', "application/x-www-form-urlencoded", 400, None, "Content-Type was"),
    (b'{"model": "{m}", "prompt": "x"}', "application/json; charset=klingon", 400, None, "unknown charset"),
    (b'{"model": "{m}", "prompt": "caf\xe9"}', None, 400, None, "not UTF-8"),
    (b"null", None, 400, None, "JSON object"),
    # served: the bytes say what they are
    (b'{"model": "{m}", "prompt": "caf\xe9", "max_tokens": 1}', "application/json; charset=latin-1", 200, None, ""),
    ('{"model": "{m}", "prompt": "caf\u00e9 \U0001d11e", "max_tokens": 1}'.encode("utf-16"), None, 200, None, ""),
    (b'{"model": "{m}", "prompt": "a\\u0000b \\ud83d\\ude00", "max_tokens": 1}', "text/plain", 200, None, ""),
    (b'{"model": "{m}", "prompt": [7.0, 8], "max_tokens": 1.0, "unknown": {"x": 1}}', None, 200, None, ""),
]


@pytest.mark.parametrize("raw,content_type,status,param,words", HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])
def test_hostile_bodies_get_a_4xx_naming_what_is_wrong_or_a_correct_answer(http_stack, model, raw, content_type,
                                                                        status, param, words):
    raw = raw.replace(b"{m}", model.encode()).replace("{m}".encode("utf-16")[2:], model.encode("utf-16")[2:])
    t0 = time.monotonic()
    code, _, reply = http("POST", http_stack.http_base + "/completions" if b"messages" not in raw else
                          http_stack.http_base + "/chat/completions", raw=raw,
                          headers={"content-type": content_type} if content_type else None)
    assert code == status, reply
    assert time.monotonic() - t0 < 5  # refused before any work (a 5 MB prompt is not tokenized)
    if status == 200:
        assert reply["usage"]["completion_tokens"] == 1
        return
    assert reply["error"]["param"] == param and words in reply["error"]["message"], reply


def _room_request(http_stack, model, max_model_len: int, room: int, **fields):
    """A completions request whose prompt (token ids) leaves `room` tokens of the context."""
    return http("POST", http_stack.http_base + "/completions",
                {"model": model, "prompt": [100] * (max_model_len - room), "temperature": 0, "ignore_eos": True,
                 **fields})


def test_over_long_requests_are_refused_at_once_naming_the_limit_on_both_apis(http_stack, model):
    import grpc

    from splitserve import rpc
    from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    _, _, card = http("GET", http_stack.http_base + "/models/" + model)
    limit = card["max_model_len"]
    t0 = time.monotonic()
    code, _, reply = _room_request(http_stack, model, limit, 1, max_tokens=5)  # the 8,191 + 5 case
    assert code == 400 and reply["error"]["param"] == "max_tokens", reply
    message = reply["error"]["message"]
    assert f"max_tokens is 5 and the prompt is {limit - 1} tokens" in message and f"context of {limit}" in message
    code, _, reply = http("POST", http_stack.http_base + "/completions", {"model": model, "prompt": "Hi",
                                                                          "max_tokens": 100_000})
    assert code == 400 and reply["error"]["param"] == "max_tokens" and f"context is {limit}" in reply["error"]["message"]
    code, _, reply = http("POST", http_stack.http_base + "/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": limit})
    assert code == 400 and reply["error"]["param"] == "max_completion_tokens", reply
    stub = gateway_pb2_grpc.GatewayStub(rpc.channel(http_stack.gateway))
    for ids, max_tokens in (([100] * (limit - 1), 5), ([100], 100_000)):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids=gateway_pb2.TokenIds(ids=ids),
                                                           sampling=common_pb2.SamplingParams(max_tokens=max_tokens)),
                               timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"sampling.max_tokens is {max_tokens}" in err.value.details()
        assert f"context of {limit} tokens" in err.value.details()
    assert time.monotonic() - t0 < 10  # each refused before any work
    # The defaults never refuse: completions' 16 (and gRPC's) is clipped to the room left ...
    code, _, reply = _room_request(http_stack, model, limit, 3)
    assert code == 200 and reply["usage"]["completion_tokens"] == 3 and reply["choices"][0]["finish_reason"] == "length"
    out = list(stub.Generate(gateway_pb2.GenerateRequest(
        prompt_token_ids=gateway_pb2.TokenIds(ids=[100] * (limit - 2)),
        sampling=common_pb2.SamplingParams(temperature=0, ignore_eos=True)), timeout=60))
    assert sum(len(m.token_ids) for m in out) == 2 and out[-1].finish_reason == "length"
    # ... and chat's default is the rest of the context (one " hello" is one token)
    def chat(words: int, **fields):
        return http("POST", http_stack.http_base + "/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "hello" + " hello" * (words - 1)}],
            "temperature": 0, "ignore_eos": True, **fields})
    code, _, reply = chat(10, max_tokens=1)
    assert code == 200
    overhead = reply["usage"]["prompt_tokens"] - 10
    code, _, reply = chat(limit - overhead - 6)
    assert code == 200 and reply["usage"]["prompt_tokens"] == limit - 6, reply
    assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"


def test_a_client_gone_while_sending_its_body_is_no_error(http_stack, model):
    """A body cut short by the client's disconnect ends the request quietly: no 500, no traceback."""
    import socket

    host, port = http_stack.http_base.split("//")[1].split("/")[0].rsplit(":", 1)
    seen = len(http_stack.log)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + json.dumps({"model": model, "prompt": "Hi"}).encode()[:-1])
    code, _, reply = http("POST", http_stack.http_base + "/completions", {"model": model, "prompt": "Hi", "max_tokens": 1})
    assert code == 200 and reply["usage"]["completion_tokens"] == 1
    time.sleep(0.3)
    assert not [line for line in list(http_stack.log)[seen:] if "Traceback" in line or "request failed" in line]


def test_models_show_the_served_name_and_when_the_gateway_started_never_a_path(http_stack, model):
    from splitserve.model.loader import default_model_path

    code, _, listing = http("GET", http_stack.http_base + "/models")
    assert code == 200 and listing["object"] == "list"
    (card,) = listing["data"]
    assert (card["id"], card["object"], card["owned_by"]) == (model, "model", "splitserve")
    assert time.time() - 3600 < card["created"] <= time.time()  # Unix seconds: when the gateway started
    assert card["root"] == default_model_path().name and card["max_model_len"] > 0
    assert str(default_model_path().parent) not in json.dumps(card)
    assert not any(isinstance(v, str) and v.startswith("/") for v in card.values()), card
    code, _, one = http("GET", http_stack.http_base + "/models/" + model)
    assert code == 200 and one == card


def test_health_reports_the_workers(http_stack):
    code, _, reply = http("GET", http_stack.http_base.removesuffix("/v1") + "/health")
    assert code == 200 and reply["status"] == "ok"
    assert reply["prefill"]["healthy"] >= 1 and reply["decode"]["healthy"] >= 1


def test_keep_alive_answers_are_not_held_back_by_nagle(http_stack):
    """A JSON answer goes out as two writes (headers, body). Were Nagle's algorithm on for the
    gateway's connections, the body would wait for the client's delayed ACK: 40 ms a request on
    Linux, whatever the load. 20 requests on one connection must take well under 20 x 40 ms."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(http_stack.http_base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", "/health")
        conn.getresponse().read()  # connected, warm
        t0 = time.monotonic()
        for _ in range(20):
            conn.request("GET", "/health")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
        assert time.monotonic() - t0 < 0.4
    finally:
        conn.close()


def scrape(url: str) -> dict:
    """(metric family name, sample name, frozenset(labels)) -> value, after checking every sample
    carries model_name and role."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.get("role") and "model_name" in s.labels, (url, s)
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


def test_metrics_of_every_role_count_a_known_workload(http_stack, api, model):
    urls = http_stack.metrics
    assert {"gateway", "kvstore", "prefill-0", "decode-0"} <= set(urls)
    before = {name: scrape(url) for name, url in urls.items()}
    # Distinct prompts of several full blocks each: every one moves KV blocks through the kvstore.
    prompts = [f"Question {i}: name a color you like, then explain in a few words why it is your "
               f"favourite one among all the colors you know." for i in range(3)]
    usages = []
    for i, p in enumerate(prompts):
        out = api.completions.create(model=model, prompt=p, max_tokens=4 + i, temperature=0,
                                     extra_body={"ignore_eos": True}, stream=i == 1,
                                     **({"stream_options": {"include_usage": True}} if i == 1 else {}))
        usages.append(list(out)[-1].usage if i == 1 else out.usage)
    after = {name: scrape(url) for name, url in urls.items()}

    def delta(role, name, **labels):
        return total(after[role], name, **labels) - total(before[role], name, **labels)

    n = len(prompts)
    prompt_tokens = sum(u.prompt_tokens for u in usages)
    completion_tokens = sum(u.completion_tokens for u in usages)
    assert completion_tokens == 4 + 5 + 6
    assert delta("gateway", "splitserve_prompt_tokens_total") == prompt_tokens
    assert delta("gateway", "splitserve_generation_tokens_total") == completion_tokens
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert delta("gateway", f"splitserve_{hist}_count") == n, hist
    assert delta("gateway", "splitserve_inter_token_latency_seconds_count") == completion_tokens - n
    assert delta("gateway", "splitserve_request_success_total", finished_reason="length") == n
    assert delta("gateway", "splitserve_routing_decisions_total", target="prefill") == n
    assert delta("prefill-0", "splitserve_prompt_tokens_total") == prompt_tokens
    assert delta("prefill-0", "splitserve_generation_tokens_total") == n
    assert delta("decode-0", "splitserve_generation_tokens_total") == completion_tokens - n
    assert delta("prefill-0", "splitserve_kv_transfer_bytes_total", direction="put") > 0
    assert delta("decode-0", "splitserve_kv_transfer_bytes_total", direction="get") > 0
    assert delta("kvstore", "splitserve_kv_transfer_bytes_total", direction="put") == \
        delta("prefill-0", "splitserve_kv_transfer_bytes_total", direction="put")
    for role in ("gateway", "prefill-0", "decode-0"):
        assert {dict(ls)["role"] for (_, ls) in after[role]} == {role.split("-")[0]}
        assert {dict(ls)["model_name"] for (_, ls) in after[role]} == {model}


def test_no_worker_means_503_and_an_unready_health(tmp_path):
    """A gateway whose workers never answer: /health and the API say 503, naming why, at once."""
    import asyncio

    from splitserve.launch.up import free_port
    from splitserve.services.gateway.server import serve
    from splitserve.config.gateway import GatewayConfig

    dead = f"127.0.0.1:{free_port()}"

    async def scenario():
        handle = await serve(GatewayConfig(port=0, http_port=0, prefill=dead, decode=dead, load_timeout_s=0.2),
                             wait_ready=False)
        try:
            base = handle.http.base_url
            health = await asyncio.to_thread(http, "GET", base + "/health")
            completion = await asyncio.to_thread(http, "POST", base + "/v1/completions",
                                                 {"model": "any", "prompt": "hi"})
            models = await asyncio.to_thread(http, "GET", base + "/v1/models")
            return health, completion, models
        finally:
            await handle.stop(grace_s=0)

    (hc, _, health), (cc, _, completion), (mc, _, models) = asyncio.run(scenario())
    assert hc == 503 and health["status"] == "unavailable" and health["prefill"]["healthy"] == 0
    assert cc == 503 and completion["error"]["type"] == "server_error"
    assert "waiting for a prefill and a decode worker" in completion["error"]["message"]
    assert mc == 200 and models["data"] == []


def test_client_hanging_up_mid_stream_frees_the_workers(http_stack, model):
    """An HTTP client that goes away mid-stream cancels the request downstream: the decode worker's
    KV usage returns to what it was before."""
    import http.client
    from urllib.parse import urlparse

    def decode_usage():
        return http_stack.decode_load().kv_cache_usage

    idle = decode_usage()
    url = urlparse(http_stack.http_base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": model, "prompt": LONG, "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}),
        {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < 3:  # a few tokens in: the request is decoding now
        line = resp.fp.readline()
        seen += line.startswith(b"data: {")
    assert decode_usage() > idle
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 15
    while decode_usage() != idle and time.monotonic() < deadline:
        time.sleep(0.1)
    assert decode_usage() == idle
