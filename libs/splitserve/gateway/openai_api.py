"""The OpenAI-compatible HTTP API's requests: strict parsing of a JSON body (read by
gateway/request_body.py) into `splitserve.v1.GenerateRequest`s (the answers are
gateway/openai_responses.py).

Parsing never guesses: a field of the wrong JSON type, out of range, or one this server cannot
honour (e.g. `presence_penalty` != 0, `suffix`, tools) is an `ApiError` (HTTP 400) whose `param`
names the field, in OpenAI's error body. Every bound comes from gateway/api_fields.py, the table the
OpenAPI document is built from. Unknown fields are accepted and ignored, as vLLM does (clients send
vendor fields); each unknown name is logged once.

Conventions shared with vLLM where OpenAI is silent: `top_k`, `min_p`, `ignore_eos`,
`stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output` and `cache_salt` are accepted
as extra body fields; with `n` > 1 and a `seed`, choice i uses seed + i (distinct but reproducible).
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from splitserve.gateway.api_fields import FIELDS, MAX_PROMPTS, MAX_STOP, MAX_STOP_TOKEN_IDS, UINT32_MAX, ApiField
from splitserve.gateway.errors import ApiError, bad
from splitserve.gateway.prepare import CHAT_ROLES, DEFAULT_MAX_TOKENS, MAX_REQUEST_ID_CHARS
from splitserve.gateway.request_body import json_type
from splitserve.sampling_params import SamplingParams
from splitserve.v1 import common_pb2, gateway_pb2
from splitserve.wire import sampling_to_proto

log = logging.getLogger("splitserve.gateway.http")
_MAX_UNKNOWN_NAMES = 256  # unknown field names remembered (each logged once); past that none is logged
_FLOAT32_TINY = 2.0**-149  # the smallest positive float32


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: false is not 0, 1.0 is 1."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


class _UnknownFields:
    """Logs each unknown field name once per process (bounded: a client inventing names cannot
    grow it without end)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def note(self, kind: str, body: dict) -> None:
        known = FIELDS[kind]
        for name in body:
            if name in known or name in self._seen:
                continue
            with self._lock:
                if len(self._seen) >= _MAX_UNKNOWN_NAMES or name in self._seen:
                    continue
                self._seen.add(name)
            log.warning("ignored an unknown request field (logged once per name): endpoint=%s field=%s",
                        kind, ascii(name[:64]))


UNKNOWN_FIELDS = _UnknownFields()


class _Fields:
    """Typed, range-checked reads of one body's fields, bounds from api_fields; every error names the field."""

    def __init__(self, body: dict, kind: str, max_model_len: int | None) -> None:
        self.body = body
        self.kind = kind
        self.max_model_len = max_model_len

    def spec(self, name: str) -> ApiField:
        return FIELDS[self.kind][name]

    def bool(self, name: str) -> bool:
        v = self.body.get(name)
        if v is None:
            return self.spec(name).default
        if not isinstance(v, bool):
            raise bad(name, f"{name} must be a boolean, got {json_type(v)}", "invalid_type")
        return v

    def int(self, name: str) -> int | None:
        spec, v = self.spec(name), self.body.get(name)
        if v is None:
            return spec.default
        if isinstance(v, float) and v.is_integer():  # 16.0 from loosely typed clients
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(name, f"{name} must be an integer, got {json_type(v)}", "invalid_type")
        high = spec.high_on(self.max_model_len)
        if v < spec.low or v > high:
            if spec.context_bound and self.max_model_len is not None and v > high:
                raise bad(name, f"{name} is {_short(v)}; this model's context is {self.max_model_len} tokens "
                                f"for the prompt and the output together, so at most {high} tokens can be "
                                "generated (fewer, by the prompt's length)")
            raise bad(name, f"{name} must be in [{spec.low}, {high}], got {_short(v)}")
        return v

    def number(self, name: str) -> float:
        spec, v = self.spec(name), self.body.get(name)
        if v is None:
            return spec.default
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise bad(name, f"{name} must be a number, got {json_type(v)}", "invalid_type")
        try:
            v = float(v)
        except OverflowError:  # an integer beyond any float
            v = math.inf
        if not math.isfinite(v) or v > spec.high or v < spec.low or (spec.low_open and v == spec.low):
            span = f"{'(' if spec.low_open else '['}{spec.low:g}, {spec.high:g}]"
            raise bad(name, f"{name} must be in {span}, got {v:g}")
        if spec.low_open and v - spec.low < _FLOAT32_TINY:
            # the wire carries float32: a value this close to an open bound would round onto it
            v = spec.low + _FLOAT32_TINY
        return v

    def string(self, name: str) -> str:
        spec, v = self.spec(name), self.body.get(name)
        if v is None:
            return spec.default
        if not isinstance(v, str):
            raise bad(name, f"{name} must be a string, got {json_type(v)}", "invalid_type")
        if len(v) > spec.max_len:
            raise bad(name, f"{name} is longer than {spec.max_len} characters")
        return v

    def only(self, name: str) -> None:
        """ApiError unless the field is absent, null, or one of the values its spec accepts."""
        v = self.body.get(name)
        accepted = self.spec(name).schema["enum"]
        if v is None or any(_json_equal(v, a) for a in accepted):
            return
        shown = " or ".join(_short(a) for a in accepted if a not in ([], {}, ""))
        what = f" other than {shown}" if shown else ""
        raise bad(name, f"{name}{what} is not supported by this server", "unsupported_parameter")


@dataclass
class Choice:
    """One generation to run: the request for the gateway and where its answer goes."""

    index: int  # the choice's index in the response
    prompt_index: int  # which prompt (completions with several prompts)
    request: gateway_pb2.GenerateRequest
    echo_text: str = ""  # completions echo: prepended to the text
    # chat without max_tokens: generate up to the context's end (the wire's unset max_tokens means 16)
    fill_context: bool = False


@dataclass
class ParsedRequest:
    """A parsed completions or chat body: the choices to run and how to shape the answer."""

    kind: str  # "completion" | "chat"
    model: str
    choices: list[Choice]
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token (None: no logprobs)
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return ("cmpl-" if self.kind == "completion" else "chatcmpl-") + self.request_id


def _stops(f: _Fields) -> tuple[list[str], list[int]]:
    stop = f.body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", "stop must be a non-empty string or an array of non-empty strings", "invalid_type")
    if stop is not None and len(stop) > MAX_STOP:
        raise bad("stop", f"stop holds {len(stop)} strings; at most {MAX_STOP} are accepted")
    ids = f.body.get("stop_token_ids")
    if ids is not None and (not _is_ids(ids) or not all(0 <= t <= UINT32_MAX for t in ids)):
        raise bad("stop_token_ids", f"stop_token_ids must be an array of integers in [0, {UINT32_MAX}]",
                  "invalid_type")
    if ids is not None and len(ids) > MAX_STOP_TOKEN_IDS:
        raise bad("stop_token_ids", f"stop_token_ids holds {len(ids)} ids; at most {MAX_STOP_TOKEN_IDS} are accepted")
    return stop or [], [int(t) for t in ids or ()]


def _sampling(f: _Fields, max_tokens_names: tuple[str, ...],
              logprobs: int | None) -> tuple[common_pb2.SamplingParams, bool]:
    """The wire SamplingParams from the body's fields (checked here and again by SamplingParams),
    and whether max_tokens was given. An absent max_tokens stays unset on the wire: the gateway
    then applies its default, clipped to the room the prompt leaves (gateway/prepare.py)."""
    max_tokens = None
    for name in max_tokens_names:  # chat: max_completion_tokens wins over the deprecated max_tokens
        value = f.int(name)
        if value is not None and max_tokens is None:
            max_tokens = value
    stop, stop_ids = _stops(f)
    kwargs = dict(
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=f.number("temperature"), top_p=f.number("top_p"), top_k=max(f.int("top_k"), 0),
        min_p=f.number("min_p"), seed=f.int("seed"), stop=stop, stop_token_ids=stop_ids,
        ignore_eos=f.bool("ignore_eos"), logprobs=logprobs, skip_special_tokens=f.bool("skip_special_tokens"),
        include_stop_str_in_output=f.bool("include_stop_str_in_output"),
    )
    try:
        msg = sampling_to_proto(SamplingParams(**kwargs))
    except ValueError as e:  # the message starts with the field's name
        name = str(e).split(" ", 1)[0]
        raise bad(name, str(e)) from None
    if max_tokens is None:
        msg.ClearField("max_tokens")
    return msg, max_tokens is not None


def _common(f: _Fields, served: list[str]) -> tuple[str, bool, bool, int]:
    model = f.body.get("model")
    if model is None:
        raise bad("model", "model is required: name the served model (GET /v1/models lists it)",
                  "missing_required_parameter")
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {json_type(model)}", "invalid_type")
    if model not in served:
        raise ApiError(404, f"The model '{model[:200]}' does not exist; this server serves "
                            f"{', '.join(repr(s) for s in served[:1])}", "model", "model_not_found")
    stream = f.bool("stream")
    options = f.body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"stream_options must be an object, got {json_type(options)}", "invalid_type")
        if not stream:
            raise bad("stream_options", "stream_options is only allowed when stream is true")
        include_usage = options.get("include_usage", False)
        if include_usage is None:
            include_usage = False
        if not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage", "stream_options.include_usage must be a boolean, got "
                      f"{json_type(include_usage)}", "invalid_type")
    n = f.int("n")
    for name in ("best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"):
        f.only(name)
    f.string("user")  # accepted for compatibility, not used
    return model, stream, include_usage, n


def _seed_for(sampling: common_pb2.SamplingParams, i: int) -> common_pb2.SamplingParams:
    if i == 0 or not sampling.HasField("seed"):
        return sampling
    copy = common_pb2.SamplingParams()
    copy.CopyFrom(sampling)
    copy.seed = (sampling.seed + i + 2**63) % 2**64 - 2**63
    return copy


def parse_completion(body: dict, served: list[str], request_id: str,
                     max_model_len: int | None = None) -> ParsedRequest:
    """`max_model_len`: the served model's context, when known, bounds max_tokens here already."""
    UNKNOWN_FIELDS.note("completion", body)
    f = _Fields(body, "completion", max_model_len)
    model, stream, include_usage, n = _common(f, served)
    logprobs = f.int("logprobs")
    echo = f.bool("echo")
    if echo and logprobs is not None:
        raise bad("echo", "echo together with logprobs is not supported (this server returns no prompt "
                          "logprobs); drop one of them", "unsupported_parameter")
    f.only("suffix")
    prompts = _prompts(body.get("prompt"))
    sampling, _ = _sampling(f, ("max_tokens",), logprobs)
    cache_salt = f.string("cache_salt")
    choices = []
    for pi, p in enumerate(prompts):
        for i in range(n):
            req = gateway_pb2.GenerateRequest(
                request_id=f"{request_id}-{pi * n + i}" if len(prompts) * n > 1 else request_id,
                sampling=_seed_for(sampling, i), cache_salt=cache_salt, model=model)
            if isinstance(p, str):
                req.prompt = p
            else:
                req.prompt_token_ids.ids.extend(p)
            choices.append(Choice(pi * n + i, pi, req, echo_text=p if echo and isinstance(p, str) else ""))
    return ParsedRequest("completion", model, choices, stream, include_usage, logprobs, request_id)


def _is_id(t: Any) -> bool:
    """A JSON integer: 5 or 5.0 (JSON Schema counts a number with no fraction as an integer)."""
    return (isinstance(t, int) and not isinstance(t, bool)) or (isinstance(t, float) and t.is_integer())


_INT_ONLY = frozenset((int,))


def _is_ids(p: Any) -> bool:
    # all plain ints (the common case, thousands of them): one scan in C, not a call per id
    return isinstance(p, list) and (_INT_ONLY.issuperset(map(type, p)) or all(map(_is_id, p)))


def _prompts(prompt: Any) -> list:
    """completions `prompt`: a string, an array of strings, an array of token ids, or an array of
    arrays of token ids."""
    if prompt is None:
        raise bad("prompt", "prompt is required", "missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or all(map(_is_ids, prompt))):
        prompts = list(prompt)
    else:
        raise bad("prompt", "prompt must be a string, an array of strings, an array of token ids or an array of "
                            "arrays of token ids (none empty)", "invalid_type")
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request")
    for i, p in enumerate(prompts):
        if not p:
            raise bad("prompt", f"prompt[{i}] is empty" if len(prompts) > 1 else "prompt is empty")
        if isinstance(p, list):
            if min(p) < 0 or max(p) > UINT32_MAX:
                t = next(t for t in p if t < 0 or t > UINT32_MAX)
                raise bad("prompt", f"prompt token id {_short(t)} is outside the vocabulary")
            prompts[i] = list(p) if _INT_ONLY.issuperset(map(type, p)) else [int(t) for t in p]
    return prompts


def parse_chat(body: dict, served: list[str], request_id: str, max_model_len: int | None = None) -> ParsedRequest:
    """`max_model_len`: the served model's context, when known, bounds max_tokens here already."""
    UNKNOWN_FIELDS.note("chat", body)
    f = _Fields(body, "chat", max_model_len)
    model, stream, include_usage, n = _common(f, served)
    want = f.bool("logprobs")
    top = f.int("top_logprobs")
    if top is not None and not want:
        raise bad("top_logprobs", "top_logprobs needs logprobs set to true")
    logprobs = (top or 0) if want else None
    for name in ("tools", "functions", "tool_choice", "response_format"):
        f.only(name)
    chat = _messages(body.get("messages"))
    sampling, given = _sampling(f, ("max_completion_tokens", "max_tokens"), logprobs)
    cache_salt = f.string("cache_salt")
    choices = []
    for i in range(n):
        req = gateway_pb2.GenerateRequest(request_id=f"{request_id}-{i}" if n > 1 else request_id,
                                          sampling=_seed_for(sampling, i), cache_salt=cache_salt, model=model)
        req.chat.CopyFrom(chat)
        choices.append(Choice(i, 0, req, fill_context=not given))
    return ParsedRequest("chat", model, choices, stream, include_usage, logprobs, request_id)


def _messages(messages: Any) -> gateway_pb2.ChatMessages:
    if messages is None:
        raise bad("messages", "messages is required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty array of {role, content} objects", "invalid_type")
    chat = gateway_pb2.ChatMessages()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object, got {json_type(m)}", "invalid_type")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for system instructions
            role = "system"
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of system, user, assistant (or developer), "
                                       f"got {_short(role)}")
        chat.messages.add(role=role, content=_content(m.get("content"), f"{where}.content"))
    return chat


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}[{j}]", f"{where}[{j}] must be a {{\"type\": \"text\", \"text\": ...}} part "
                                           "(this model reads text only)", "invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(where, f"{where} must be a string or an array of text parts, got {json_type(content)}", "invalid_type")


def new_request_id(header: str | None) -> str:
    """The request's id: the client's x-request-id when it is usable, else a fresh one."""
    if header:
        if len(header) > MAX_REQUEST_ID_CHARS or not header.isprintable():
            raise ApiError(400, f"x-request-id must be at most {MAX_REQUEST_ID_CHARS} printable characters",
                           "x-request-id", "invalid_value")
        return header
    return uuid.uuid4().hex
