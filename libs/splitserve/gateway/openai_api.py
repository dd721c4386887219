"""The OpenAI-compatible HTTP API's wire format: strict parsing of request bodies into
`splitserve.v1.GenerateRequest`s, and the response objects and stream chunks.

Parsing never guesses: a field of the wrong JSON type, out of range, or one this server cannot
honour (e.g. `presence_penalty` != 0, `suffix`, tools) is an `ApiError` (HTTP 400) whose `param`
names the field, in OpenAI's error body. Unknown fields are ignored (clients send vendor fields).

Conventions shared with vLLM where OpenAI is silent: `top_k`, `min_p`, `ignore_eos`,
`stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output` and `cache_salt` are accepted
as extra body fields; with `n` > 1 and a `seed`, choice i uses seed + i (distinct but reproducible).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from splitserve.gateway.prepare import CHAT_ROLES, MAX_REQUEST_ID_CHARS
from splitserve.sampling_params import MAX_LOGPROBS, SamplingParams
from splitserve.v1 import common_pb2, gateway_pb2
from splitserve.wire import sampling_to_proto

MAX_N = 16  # choices per request (each is a full request through the workers)
MAX_PROMPTS = 64  # prompts in one completions call
MAX_STOP = 16  # stop strings

# HTTP status -> OpenAI error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error", 504: "server_error"}


class ApiError(Exception):
    """An error answer: HTTP status, message, the request field at fault (`param`) and a short code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message if message.startswith(param) else f"{param}: {message}", param, code)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or ApiError 400."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}", None, "invalid_json")
    return body


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


class _Fields:
    """Typed, range-checked reads of one body's fields; every error names the field."""

    def __init__(self, body: dict) -> None:
        self.body = body

    def get(self, name: str, default=None):
        v = self.body.get(name)
        return default if v is None else v

    def bool(self, name: str, default: bool = False) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise bad(name, f"{name} must be a boolean, got {_json_type(v)}", "invalid_type")
        return v

    def int(self, name: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():  # 16.0 from loosely typed clients
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(name, f"{name} must be an integer, got {_json_type(v)}", "invalid_type")
        if (low is not None and v < low) or (high is not None and v > high):
            span = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise bad(name, f"{name} must be {span}, got {v}")
        return v

    def number(self, name: str, default: float | None, low: float, high: float,
               low_open: bool = False) -> float | None:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise bad(name, f"{name} must be a number, got {_json_type(v)}", "invalid_type")
        v = float(v)
        if not math.isfinite(v) or v > high or v < low or (low_open and v == low):
            raise bad(name, f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {v:g}")
        return v

    def string(self, name: str, default: str = "", max_len: int | None = None) -> str:
        v = self.get(name, default)
        if not isinstance(v, str):
            raise bad(name, f"{name} must be a string, got {_json_type(v)}", "invalid_type")
        if max_len is not None and len(v) > max_len:
            raise bad(name, f"{name} is longer than {max_len} characters")
        return v

    def unsupported(self, name: str, allowed: tuple = (), why: str = "") -> None:
        """ApiError unless the field is absent, null, empty, or one of `allowed`."""
        v = self.body.get(name)
        if v is None or v == [] or v == {} or v in allowed:
            return
        raise bad(name, f"{name} is not supported by this server{why}", "unsupported_parameter")


@dataclass
class Choice:
    """One generation to run: the request for the gateway and where its answer goes."""

    index: int  # the choice's index in the response
    prompt_index: int  # which prompt (completions with several prompts)
    request: gateway_pb2.GenerateRequest
    echo_text: str = ""  # completions echo: prepended to the text


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


def _sampling(f: _Fields, max_tokens_names: tuple[str, ...], logprobs: int | None) -> common_pb2.SamplingParams:
    """The wire SamplingParams from the body's fields, checked here and again by SamplingParams."""
    max_tokens = None
    for name in max_tokens_names:  # chat: max_completion_tokens wins over the deprecated max_tokens
        value = f.int(name, None, 1)
        if value is not None and max_tokens is None:
            max_tokens = value
    stop = f.body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "stop must be a non-empty string or an array of non-empty strings", "invalid_type")
        if len(stop) > MAX_STOP:
            raise bad("stop", f"stop holds {len(stop)} strings; at most {MAX_STOP} are accepted")
    stop_ids = f.body.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids)):
        raise bad("stop_token_ids", "stop_token_ids must be an array of non-negative integers", "invalid_type")
    top_k = f.int("top_k", 0, -1)
    kwargs = dict(
        max_tokens=16 if max_tokens is None else max_tokens,
        temperature=f.number("temperature", 1.0, 0.0, 2.0),
        top_p=f.number("top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(top_k, 0), min_p=f.number("min_p", 0.0, 0.0, 1.0),
        seed=f.int("seed", None, -(2**63), 2**63 - 1), stop=stop or [], stop_token_ids=stop_ids or [],
        ignore_eos=f.bool("ignore_eos"), logprobs=logprobs,
        skip_special_tokens=f.bool("skip_special_tokens", True),
        include_stop_str_in_output=f.bool("include_stop_str_in_output"),
    )
    try:
        return sampling_to_proto(SamplingParams(**kwargs))
    except ValueError as e:  # the message starts with the field's name
        name = str(e).split(" ", 1)[0]
        raise bad(name, str(e)) from None


def _common(f: _Fields, served: list[str]) -> tuple[str, bool, bool, int]:
    model = f.body.get("model")
    if model is None:
        raise bad("model", "model is required: name the served model (GET /v1/models lists it)", "missing_required_parameter")
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {_json_type(model)}", "invalid_type")
    if model not in served:
        raise ApiError(404, f"The model '{model[:200]}' does not exist; this server serves "
                            f"{', '.join(repr(s) for s in served[:1])}", "model", "model_not_found")
    stream = f.bool("stream")
    options = f.body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"stream_options must be an object, got {_json_type(options)}", "invalid_type")
        if not stream:
            raise bad("stream_options", "stream_options is only allowed when stream is true")
        include_usage = options.get("include_usage", False)
        if include_usage is None:
            include_usage = False
        if not isinstance(include_usage, bool):
            raise bad("stream_options.include_usage", "stream_options.include_usage must be a boolean, got "
                      f"{_json_type(include_usage)}", "invalid_type")
    n = f.int("n", 1, 1, MAX_N)
    best_of = f.int("best_of", None, 1)
    if best_of is not None and best_of != n:
        raise bad("best_of", "best_of must equal n (or be left out): candidates are not ranked by this server",
                  "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        value = f.number(name, 0.0, -2.0, 2.0)
        if value:
            raise bad(name, f"{name} other than 0 is not supported by this server", "unsupported_parameter")
    rp = f.number("repetition_penalty", 1.0, 0.0, 10.0)
    if rp != 1.0:
        raise bad("repetition_penalty", "repetition_penalty other than 1 is not supported by this server",
                  "unsupported_parameter")
    f.unsupported("logit_bias")
    f.string("user", "", 1024)  # accepted for compatibility, not used
    return model, stream, include_usage, n


def _seed_for(sampling: common_pb2.SamplingParams, i: int) -> common_pb2.SamplingParams:
    if i == 0 or not sampling.HasField("seed"):
        return sampling
    copy = common_pb2.SamplingParams()
    copy.CopyFrom(sampling)
    copy.seed = (sampling.seed + i + 2**63) % 2**64 - 2**63
    return copy


def parse_completion(body: dict, served: list[str], request_id: str) -> ParsedRequest:
    f = _Fields(body)
    model, stream, include_usage, n = _common(f, served)
    logprobs = f.int("logprobs", None, 0, MAX_LOGPROBS)
    echo = f.bool("echo")
    if echo and logprobs is not None:
        raise bad("echo", "echo together with logprobs is not supported (this server returns no prompt "
                          "logprobs); drop one of them", "unsupported_parameter")
    f.unsupported("suffix", why=" (no fill-in-the-middle)")
    prompt = body.get("prompt")
    prompts = _prompts(prompt)
    sampling = _sampling(f, ("max_tokens",), logprobs)
    cache_salt = f.string("cache_salt", "", 256)
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


def _prompts(prompt: Any) -> list:
    """completions `prompt`: a string, an array of strings, an array of token ids, or an array of
    arrays of token ids."""
    if prompt is None:
        raise bad("prompt", "prompt is required", "missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
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
            for t in p:
                if t < 0 or t >= 2**32:
                    raise bad("prompt", f"prompt token id {t} is outside the vocabulary")
    return prompts


def parse_chat(body: dict, served: list[str], request_id: str) -> ParsedRequest:
    f = _Fields(body)
    model, stream, include_usage, n = _common(f, served)
    want = f.bool("logprobs")
    top = f.int("top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs", "top_logprobs needs logprobs set to true")
    logprobs = (top or 0) if want else None
    for name in ("tools", "functions"):
        f.unsupported(name, why=" (no tool calling)")
    f.unsupported("tool_choice", allowed=("none",))
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("response_format", "response_format other than {\"type\": \"text\"} is not supported",
                  "unsupported_parameter")
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "messages is required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty array of {role, content} objects", "invalid_type")
    chat = gateway_pb2.ChatMessages()
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object, got {_json_type(m)}", "invalid_type")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for system instructions
            role = "system"
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of system, user, assistant (or developer), "
                                       f"got {json.dumps(role)[:40]}")
        chat.messages.add(role=role, content=_content(m.get("content"), f"{where}.content"))
    sampling = _sampling(f, ("max_completion_tokens", "max_tokens"), logprobs)
    cache_salt = f.string("cache_salt", "", 256)
    choices = []
    for i in range(n):
        req = gateway_pb2.GenerateRequest(request_id=f"{request_id}-{i}" if n > 1 else request_id,
                                          sampling=_seed_for(sampling, i), cache_salt=cache_salt, model=model)
        req.chat.CopyFrom(chat)
        choices.append(Choice(i, 0, req))
    return ParsedRequest("chat", model, choices, stream, include_usage, logprobs, request_id)


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
    raise bad(where, f"{where} must be a string or an array of text parts, got {_json_type(content)}", "invalid_type")


def new_request_id(header: str | None) -> str:
    """The request's id: the client's x-request-id when it is usable, else a fresh one."""
    if header:
        if len(header) > MAX_REQUEST_ID_CHARS or not header.isprintable():
            raise ApiError(400, f"x-request-id must be at most {MAX_REQUEST_ID_CHARS} printable characters",
                           "x-request-id", "invalid_value")
        return header
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------------- responses
def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenText:
    """Token id -> its text and raw bytes, for logprobs (byte-level BPE tokens map back to bytes)."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    @lru_cache(maxsize=65536)
    def bytes(self, token_id: int) -> bytes:
        hf = self._tok.hf
        piece = hf.convert_ids_to_tokens(int(token_id))
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
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append({tokens.text(t.token_id): t.logprob for t in lp.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(lps: list, tokens: TokenText) -> dict:
    return {"content": [
        {"token": tokens.text(lp.token_id), "logprob": lp.logprob, "bytes": list(tokens.bytes(lp.token_id)),
         "top_logprobs": [{"token": tokens.text(t.token_id), "logprob": t.logprob,
                           "bytes": list(tokens.bytes(t.token_id))} for t in lp.top]}
        for lp in lps]}


def sse(obj: dict | str) -> bytes:
    """One server-sent event."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()
