"""Request preparation, the gateway's first step: a GenerateRequest is checked against the served
model (`ModelInfo`), tokenized (prompt, token ids or chat), and its prompt's block hashes computed,
giving a `PreparedRequest` ready for routing. Refusals are `InvalidRequest`s naming the field.
The output side (detokenization and the stop rules) is gateway/output.py.

The context limit is enforced here, before any work, for both APIs: prompt tokens + max_tokens
beyond max_model_len is refused (sampling.max_tokens, giving both numbers and the limit). An unset
max_tokens means DEFAULT_MAX_TOKENS clipped to the room the prompt leaves, so a default never gets a
request refused. A prompt string so long that it must exceed the context whatever its tokens is
refused without tokenizing it (tokenizing 16 MiB would hold the tokenizer for a minute).
"""
from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from jinja2 import TemplateError

from splitserve.engine.hashing import block_hashes, hash_namespace
from splitserve.gateway.api_fields import MAX_STOP, MAX_STOP_TOKEN_IDS
from splitserve.engine.sequence import check_token_ids
from splitserve.sampling_params import SamplingParams
from splitserve.v1 import common_pb2
from splitserve.wire import sampling_from_proto

CHAT_ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID_CHARS = 256
DEFAULT_MAX_TOKENS = 16  # the proto's documented default for an unset max_tokens


class InvalidRequest(ValueError):
    """A request the gateway rejects (INVALID_ARGUMENT); the message starts with the field's name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message if message.startswith(field) else f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ModelInfo:
    """The served model's identity, adopted from the first worker that answered GetLoad; every
    worker must report the same model_id and block_size (else its block hashes would differ)."""

    model_id: str  # the block-hash namespace's model id, also the served model name
    model_path: str  # what the worker loaded; the gateway loads the tokenizer from it
    block_size: int  # tokens per KV block
    max_model_len: int  # longest prompt + output, in tokens
    vocab_size: int  # token ids must be in [0, vocab_size)

    @classmethod
    def from_load(cls, load) -> "ModelInfo":
        info = cls(load.model_id, load.model_path, int(load.block_size), int(load.max_model_len), int(load.vocab_size))
        if not info.model_id or info.block_size < 1 or info.max_model_len < 2 or info.vocab_size < 1:
            raise ValueError(f"worker {load.worker_id!r} reports an incomplete model identity: {info}")
        return info

    def mismatch(self, load) -> str | None:
        """Why a worker's LoadResponse disagrees with this identity, or None when it agrees."""
        if load.model_id != self.model_id or load.block_size != self.block_size:
            return (f"serves model_id={load.model_id!r} block_size={load.block_size}, the gateway "
                    f"serves model_id={self.model_id!r} block_size={self.block_size}")
        return None


@dataclass(frozen=True)
class PreparedRequest:
    """A validated, tokenized request, ready for routing."""

    request_id: str  # the client's id (generated when empty), echoed in every response
    downstream_id: str  # request_id plus a random suffix: unique per call into the workers
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: common_pb2.SamplingParams  # the wire form passed on to the workers
    cache_salt: str
    block_hashes: list[bytes]  # chained hashes of the prompt's full blocks (32 bytes each)


def prepare_request(request, tokenizer, model: ModelInfo, served_names: Sequence[str] = ()) -> PreparedRequest:
    """Validates and tokenizes a GenerateRequest; raises InvalidRequest naming the field.

    `served_names`: model names accepted in `request.model` besides `model.model_id`."""
    if request.model and request.model not in (model.model_id, *served_names):
        raise InvalidRequest("model", f"model {request.model!r} is not served here; the served model is "
                                      f"{(served_names or [model.model_id])[0]!r}")
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    try:
        params = sampling_from_proto(request.sampling)
    except ValueError as exc:
        raise InvalidRequest("sampling", f"sampling.{exc}") from None
    for name, cap in (("stop", MAX_STOP), ("stop_token_ids", MAX_STOP_TOKEN_IDS)):  # the HTTP API's caps
        if len(getattr(params, name)) > cap:
            raise InvalidRequest(f"sampling.{name}", f"sampling.{name} holds {len(getattr(params, name))} "
                                                    f"entries; at most {cap} are accepted")
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("input", "input: give one of prompt, prompt_token_ids or chat")
    _refuse_surely_too_long(request, kind, tokenizer, model.max_model_len)
    ids = _tokenize(request, kind, tokenizer, model.vocab_size)
    if len(ids) >= model.max_model_len:
        raise InvalidRequest(kind, f"{kind} is {len(ids)} tokens; the context window (max_model_len) is "
                                   f"{model.max_model_len}, which leaves no room for output")
    room = model.max_model_len - len(ids)
    sampling = request.sampling
    if not sampling.HasField("max_tokens"):
        params, sampling = _with_max_tokens(params, sampling, min(DEFAULT_MAX_TOKENS, room))
    elif params.max_tokens > room:
        n = len(ids)
        raise InvalidRequest("sampling.max_tokens", f"sampling.max_tokens is {params.max_tokens} and the prompt is "
                             f"{n} token{'s' if n != 1 else ''}: {params.max_tokens + n} in all, beyond this "
                             f"model's context of {model.max_model_len} tokens (max_model_len); this prompt "
                             f"leaves room for at most {room}")
    hashes = block_hashes(ids, model.block_size, hash_namespace(model.model_id, request.cache_salt or None))
    request_id = request.request_id or uuid.uuid4().hex
    return PreparedRequest(request_id, f"{request_id}~{uuid.uuid4().hex[:8]}", ids, params,
                           sampling, request.cache_salt, hashes)


def fill_context(req: PreparedRequest, max_model_len: int) -> PreparedRequest:
    """`req` generating up to the end of the context (the HTTP chat API's default, as vLLM's)."""
    params, sampling = _with_max_tokens(req.params, req.sampling, max_model_len - len(req.prompt_token_ids))
    return dataclasses.replace(req, params=params, sampling=sampling)


def _with_max_tokens(params: SamplingParams, sampling: common_pb2.SamplingParams,
                     max_tokens: int) -> tuple[SamplingParams, common_pb2.SamplingParams]:
    wire = common_pb2.SamplingParams()
    wire.CopyFrom(sampling)
    wire.max_tokens = max_tokens
    return dataclasses.replace(params, max_tokens=max_tokens), wire


@lru_cache(maxsize=4)
def _max_chars_per_token(tokenizer) -> int | None:
    """Most characters one token can stand for (the longest vocabulary entry), or None when the
    tokenizer normalizes its input (a normalizer may drop characters: no such bound holds then)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    return max((len(piece) for piece in tokenizer.get_vocab()), default=None)


def _refuse_surely_too_long(request, kind: str, tokenizer, max_model_len: int) -> None:
    """InvalidRequest for a prompt whose characters alone prove it longer than the context: every
    token stands for at most L characters, so a text of C characters is at least C / L tokens."""
    if kind == "prompt":
        chars = len(request.prompt)
    elif kind == "chat":
        if len(request.chat.messages) >= max_model_len:  # the template marks every message with tokens
            raise InvalidRequest("chat", f"chat holds {len(request.chat.messages)} messages, more than the context "
                                         f"window (max_model_len) of {max_model_len} tokens")
        chars = sum(len(m.content) for m in request.chat.messages)
    else:
        return
    per_token = _max_chars_per_token(tokenizer) if chars >= max_model_len else None
    if per_token and chars >= max_model_len * per_token:
        at_least = -(-chars // per_token)
        raise InvalidRequest(kind, f"{kind} is {chars} characters, so at least {at_least} tokens; the context "
                                   f"window (max_model_len) is {max_model_len}, which leaves no room for output")


def _tokenize(request, kind: str, tokenizer, vocab_size: int) -> list[int]:
    if kind == "prompt":
        if not request.prompt:
            raise InvalidRequest("prompt", "prompt is empty")
        ids = tokenizer.encode(request.prompt)
    elif kind == "prompt_token_ids":
        ids = list(request.prompt_token_ids.ids)  # ints already (uint32 on the wire)
        if not ids:
            raise InvalidRequest("prompt_token_ids", "prompt_token_ids is empty")
        try:
            check_token_ids("prompt_token_ids", ids, vocab_size)
        except ValueError as exc:
            raise InvalidRequest("prompt_token_ids", str(exc)) from None
    else:
        messages = list(request.chat.messages)
        if not messages:
            raise InvalidRequest("chat", "chat.messages is empty")
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest("chat", f"chat.messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, "
                                             f"got {m.role!r}")
        try:
            ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages])
        except (ValueError, TemplateError) as exc:  # the template itself may refuse a conversation
            raise InvalidRequest("chat", f"chat: {exc}") from None
    if not ids:
        raise InvalidRequest(kind, f"{kind} tokenizes to no tokens")
    return ids
