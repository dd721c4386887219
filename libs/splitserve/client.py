"""A small synchronous client of the gateway's Generate call, for the CLI and tests.

    for msg in stream_generate("127.0.0.1:50051", prompt="Hello", sampling={"max_tokens": 8}):
        print(msg.text, end="")
    token_ids, text, final = generate("127.0.0.1:50051", messages=[{"role": "user", "content": "Hi"}])

Errors are the call's grpc.RpcError (code() and details() say what went wrong); ValueError for
arguments that cannot form a request. Leaving the iterator early cancels the call.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import grpc

from splitserve.rpc import channel as open_channel
from splitserve.rpc import channel_credentials
from splitserve.sampling_params import SamplingParams
from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

# Fields of common_pb2.SamplingParams a dict may give (the names of SamplingParams' fields).
_SAMPLING_FIELDS = frozenset(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)


class GenerateResult(NamedTuple):
    token_ids: list[int]  # every generated token id, in order
    text: str  # the whole output text
    final: gateway_pb2.GenerateResponse  # the last message: finish_reason, stop_reason, usage, timings


def sampling_message(sampling) -> common_pb2.SamplingParams:
    """The wire form of `sampling`: a SamplingParams (every field set), a dict of some of its fields
    (only those given and not None are set, unchecked: the gateway validates), a proto, or None."""
    if sampling is None:
        return common_pb2.SamplingParams()
    if isinstance(sampling, common_pb2.SamplingParams):
        return sampling
    if isinstance(sampling, SamplingParams):
        from splitserve.wire import sampling_to_proto  # imports the engine's sampler (torch): only here

        return sampling_to_proto(sampling)
    if not isinstance(sampling, dict):
        raise TypeError(f"sampling must be a SamplingParams, a dict or None, got {type(sampling).__name__}")
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        raise ValueError(f"unknown sampling field(s): {', '.join(sorted(unknown))}")
    values = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    return common_pb2.SamplingParams(**values)


def build_request(prompt: str | None = None, token_ids: Sequence[int] | None = None,
                  messages: Sequence[dict] | None = None, sampling=None, request_id: str = "",
                  cache_salt: str = "", model: str = "") -> gateway_pb2.GenerateRequest:
    """A GenerateRequest from exactly one of prompt / token_ids / messages ({"role", "content"} dicts).
    `sampling`: a SamplingParams, a dict of some of its fields, a proto, or None (defaults)."""
    given = [name for name, value in (("prompt", prompt), ("token_ids", token_ids), ("messages", messages))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, token_ids or messages (got {', '.join(given) or 'none'})")
    req = gateway_pb2.GenerateRequest(request_id=request_id, sampling=sampling_message(sampling),
                                      cache_salt=cache_salt, model=model)
    if prompt is not None:
        req.prompt = prompt
    elif token_ids is not None:
        req.prompt_token_ids.ids.extend(int(t) for t in token_ids)
        req.prompt_token_ids.SetInParent()  # an empty list is still "token ids given" (the gateway rejects it)
    else:
        req.chat.messages.extend(gateway_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
        req.chat.SetInParent()
    return req


def stream_generate(target: str, prompt: str | None = None, token_ids: Sequence[int] | None = None,
                    messages: Sequence[dict] | None = None, sampling=None, *, timeout_s: float | None = 600.0,
                    request_id: str = "", cache_salt: str = "", model: str = "",
                    channel: grpc.Channel | None = None, api_key: str = "",
                    tls: bool = False, tls_ca_file: str = "") -> Iterator[gateway_pb2.GenerateResponse]:
    """Streams the GenerateResponses of one request to the gateway at `target` (HOST:PORT).

    `timeout_s` is the whole call's deadline (None: none). `channel`: reuse an open channel
    (it is left open); otherwise one is opened and closed for this call. `api_key`: sent as
    `authorization: Bearer KEY` metadata (gateways started with --api-key require it). `tls` (or a
    `tls_ca_file` to trust instead of the system roots): talk TLS to a gateway started with a
    certificate."""
    req = build_request(prompt, token_ids, messages, sampling, request_id, cache_salt, model)
    own = channel is None
    credentials = channel_credentials(tls_ca_file) if tls or tls_ca_file else None
    ch = open_channel(target, credentials=credentials) if own else channel
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    call = gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=timeout_s, metadata=metadata)
    try:
        yield from call
    finally:
        call.cancel()  # no-op once the call has ended; stops the request when the caller left early
        if own:
            ch.close()


def generate(target: str, prompt: str | None = None, token_ids: Sequence[int] | None = None,
             messages: Sequence[dict] | None = None, sampling=None, **kwargs) -> GenerateResult:
    """Runs one request to the end; returns (token_ids, text, final message). kwargs as stream_generate."""
    ids: list[int] = []
    text: list[str] = []
    final = None
    for msg in stream_generate(target, prompt, token_ids, messages, sampling, **kwargs):
        ids.extend(msg.token_ids)
        text.append(msg.text)
        final = msg
    if final is None or not final.finish_reason:
        raise RuntimeError("the gateway ended the stream without a finish reason")
    return GenerateResult(ids, "".join(text), final)

