"""Conversions between the gRPC messages (splitserve.v1) and the engine's Python types."""
from __future__ import annotations

from splitserve.engine.sampler import TokenLogprobs
from splitserve.sampling_params import SamplingParams
from splitserve.v1 import common_pb2

_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "skip_special_tokens")


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """SamplingParams from the wire; unset optional fields keep their defaults.
    Raises ValueError naming the field (mapped to INVALID_ARGUMENT by the servers)."""
    kwargs: dict = {}
    for name in _OPTIONAL:
        if msg.HasField(name):
            value = getattr(msg, name)
            kwargs[name] = float(value) if isinstance(value, float) else value
    if msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    kwargs["ignore_eos"] = msg.ignore_eos
    kwargs["include_stop_str_in_output"] = msg.include_stop_str_in_output
    return SamplingParams(**kwargs)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, min_p=params.min_p, stop=params.stop, stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos, skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def logprob_to_proto(lp: TokenLogprobs) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )

