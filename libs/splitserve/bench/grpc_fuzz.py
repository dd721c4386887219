"""A protobuf fuzzer for every gRPC service of a running stack.

Each message goes out as raw bytes through a generic channel (no client-side serializer), so what
the server receives is exactly what was generated, malformed or not. Per method, one message is:

    random      random bytes (0..256 of them)
    truncated   a valid message's serialization cut at a random byte
    bitflip     a valid message's serialization with 1..8 bits flipped
    mutated     a valid message with one field (at any depth) set to an edge value: 0, -1, the
                type's extremes, NaN/inf, empty, huge or invalid-UTF-8 strings, huge repeated
                fields, a second oneof member, an unknown field number
    valid       a seed message with extreme but legal values (long stop lists, odd salts, ...)

The contract the servers must keep: never INTERNAL or UNKNOWN, never a dead process, and a valid
request is served afterwards. Cost stays bounded: the seeds ask for a few tokens, and a streaming
call is cancelled after `max_stream_messages` responses (a huge `max_tokens` costs the server only
until that cancel reaches it).

Used by tests/services/test_grpc_fuzz.py (a bounded run) and benchmarks/fuzz_grpc.py (>= 10,000
messages per service).
"""
from __future__ import annotations

import math
import os
import random
import struct
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from google.protobuf import descriptor as _d
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2

from splitserve.rpc import channel
from splitserve.v1 import common_pb2, decode_pb2, gateway_pb2, kvstore_pb2, prefill_pb2

F = _d.FieldDescriptor
BAD = ("INTERNAL", "UNKNOWN")  # status codes no message may produce
KINDS = ("random", "truncated", "bitflip", "mutated", "valid")
_INT_EDGES = {
    F.TYPE_INT32: (0, -1, 1, 2**31 - 1, -2**31), F.TYPE_SINT32: (0, -1, 2**31 - 1, -2**31),
    F.TYPE_SFIXED32: (0, -1, 2**31 - 1, -2**31), F.TYPE_INT64: (0, -1, 2**63 - 1, -2**63),
    F.TYPE_SINT64: (0, -1, 2**63 - 1, -2**63), F.TYPE_SFIXED64: (0, -1, 2**63 - 1, -2**63),
    F.TYPE_UINT32: (0, 1, 2**31, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 1, 2**63 - 1, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
    F.TYPE_ENUM: (0, 1, 99, -1, 2**31 - 1),
}
_FLOAT_EDGES = (0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45, 1e300)
_STRINGS = ("", "\x00", "a" * 100_000, "\U0001F600" * 1000, "../../etc/passwd", "127.0.0.1:1", "[::1]:0",
            "localhost:99999", " ", "\u202e\ufeff", "%s%n{}")
_BYTES = (b"", b"\x00", b"\xff" * 64, os.urandom(32), b"\x00" * (1 << 20))
_HUGE_REPEATED = 100_000  # elements in a "huge" repeated field


@dataclass(frozen=True)
class Target:
    """One method to fuzz at one address; `seeds` make valid requests of its input type."""

    service: str  # "prefill", "kvstore", ... (the report's row)
    address: str
    method: _d.MethodDescriptor
    seeds: tuple[Callable[[random.Random], object], ...]
    stream_limit: int = 0  # responses read before we cancel a stream; 0: the run's max_stream_messages

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


@dataclass
class ServiceReport:
    """What one service's messages got back."""

    messages: int = 0
    codes: Counter = field(default_factory=Counter)  # status code name -> count ("OK" incl. cancelled by us)
    bad: list[str] = field(default_factory=list)  # "path kind: CODE details" of each INTERNAL/UNKNOWN (first 20)

    @property
    def num_bad(self) -> int:
        return sum(self.codes[c] for c in BAD)


# ------------------------------------------------------------------------------- raw wire bits
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


def _unknown_field(rng: random.Random) -> bytes:
    number = rng.choice((15, 99, 1000, 536_870_911))
    kind = rng.randrange(3)
    if kind == 0:
        return _key(number, 0) + _varint(rng.choice((0, 2**64 - 1)))
    if kind == 1:
        return _key(number, 1) + struct.pack("<d", math.nan)
    return _len_field(number, rng.randbytes(rng.randrange(64)))


# ----------------------------------------------------------------------------- field mutation
def _edge_scalar(fd: F, rng: random.Random):
    if fd.type in _INT_EDGES:
        return rng.choice(_INT_EDGES[fd.type])
    if fd.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return rng.choice(_FLOAT_EDGES)
    if fd.type == F.TYPE_BOOL:
        return rng.random() < 0.5
    if fd.type == F.TYPE_STRING:
        return rng.choice(_STRINGS)
    return rng.choice(_BYTES)


def _fields(msg, prefix=()) -> list[tuple[tuple, F]]:
    """(path of (message, field) pairs, field) for every field at any depth of set submessages."""
    out = []
    for fd in msg.DESCRIPTOR.fields:
        out.append((prefix + ((msg, fd),), fd))
        if fd.type == F.TYPE_MESSAGE and not fd.is_repeated and msg.HasField(fd.name):
            out.extend(_fields(getattr(msg, fd.name), prefix + ((msg, fd),)))
        elif fd.type == F.TYPE_MESSAGE and fd.is_repeated:
            for item in list(getattr(msg, fd.name))[:2]:
                out.extend(_fields(item, prefix + ((msg, fd),)))
    return out


def _set_edge(msg, fd: F, rng: random.Random) -> None:
    """Sets `fd` of `msg` to an edge value (in place); bytes-level edges are left to _wire_edge."""
    if fd.is_repeated:
        target = getattr(msg, fd.name)
        if fd.type == F.TYPE_MESSAGE:
            for _ in range(rng.choice((0, 1, 1000))):
                target.add()
            return
        del target[:]
        n = rng.choice((0, 1, 1000, _HUGE_REPEATED))
        value = _edge_scalar(fd, rng)
        target.extend([value] * (min(n, 50) if fd.type in (F.TYPE_STRING, F.TYPE_BYTES) else n))
    elif fd.type == F.TYPE_MESSAGE:
        if rng.random() < 0.5:
            msg.ClearField(fd.name)
        else:
            getattr(msg, fd.name).SetInParent()
    else:
        setattr(msg, fd.name, _edge_scalar(fd, rng))


def _wire_edge(path: tuple, rng: random.Random) -> bytes:
    """The serialization of the path's root with, at the path's field, a value no setter makes:
    invalid UTF-8 in a string, a wrong wire type, or a length that overruns (merged on the wire:
    proto3 takes the last scalar, appends repeated elements, merges submessages)."""
    (msg, fd), rest = path[-1], path[:-1]
    choice = rng.randrange(3)
    if choice == 0:
        extra = _len_field(fd.number, rng.choice((b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"a\x80")))
    elif choice == 1:
        extra = _key(fd.number, 0 if fd.type in (F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_MESSAGE) else 2) + b"\x05"
    else:
        extra = _key(fd.number, 2) + _varint(2**31)  # a length past the end
    for parent, parent_fd in reversed(rest):
        extra = _len_field(parent_fd.number, extra)
        msg = parent
    return msg.SerializeToString() + extra


def _mutate(seed, rng: random.Random) -> bytes:
    msg = type(seed)()
    msg.CopyFrom(seed)
    fields = _fields(msg)
    roll = rng.random()
    if not fields or roll < 0.1:
        return msg.SerializeToString() + _unknown_field(rng)
    path, fd = rng.choice(fields)
    if roll < 0.3:
        return _wire_edge(path, rng)
    _set_edge(path[-1][0], fd, rng)
    return msg.SerializeToString()


def make_message(seed, kind: str, rng: random.Random) -> bytes:
    """One fuzzed request of `kind` (see the module docstring) derived from a valid `seed`."""
    if kind == "random":
        return rng.randbytes(rng.randrange(257))
    raw = seed.SerializeToString()
    if kind == "truncated":
        return raw[:rng.randrange(len(raw))] if raw else b"\x0a"
    if kind == "bitflip":
        data = bytearray(raw or b"\x00")
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == "mutated":
        return _mutate(seed, rng)
    return raw


# ---------------------------------------------------------------------------------- sending
def send(ch: grpc.Channel, target: Target, payload: bytes, timeout_s: float, max_stream_messages: int,
         rng: random.Random) -> tuple[str, str]:
    """Sends one raw request; (status code name, details). A stream we cancel ourselves is "OK"."""
    m = target.method
    try:
        if m.client_streaming:
            parts = [payload] + [make_message(target.seeds[0](rng), rng.choice(KINDS), rng)
                                 for _ in range(rng.randrange(3))]
            call = (ch.stream_stream if m.server_streaming else ch.stream_unary)(target.path)
            result = call(iter(parts), timeout=timeout_s)
        else:
            call = (ch.unary_stream if m.server_streaming else ch.unary_unary)(target.path)
            result = call(payload, timeout=timeout_s)
        if m.server_streaming:
            limit = target.stream_limit or max_stream_messages
            for i, _ in enumerate(result):
                if i + 1 >= limit:
                    result.cancel()
                    break
        return "OK", ""
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.CANCELLED and m.server_streaming:
            return "OK", ""
        return code.name, (exc.details() or "")[:300]


def fuzz(targets: list[Target], per_service: int | dict[str, int], seed: int = 0, timeout_s: float = 10.0,
         max_stream_messages: int = 3, concurrency: int = 4) -> dict[str, ServiceReport]:
    """Sends `per_service` messages (a count, or one per service name) to each service, spread over
    its methods, the kinds in turn; the reports by service name."""
    by_service: dict[str, list[Target]] = {}
    for t in targets:
        by_service.setdefault(t.service, []).append(t)
    reports = {name: ServiceReport() for name in by_service}
    channels = {addr: channel(addr) for addr in {t.address for t in targets}}
    jobs = []
    for name, ts in by_service.items():
        count = per_service if isinstance(per_service, int) else per_service.get(name, 0)
        for i in range(count):
            jobs.append((name, ts[i % len(ts)], KINDS[(i // len(ts)) % len(KINDS)], seed * 1_000_003 + len(jobs)))

    def run(job):
        name, target, kind, job_seed = job
        rng = random.Random(job_seed)
        payload = make_message(rng.choice(target.seeds)(rng), kind, rng)
        code, details = send(channels[target.address], target, payload, timeout_s, max_stream_messages, rng)
        return name, target, kind, code, details

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            for name, target, kind, code, details in pool.map(run, jobs):
                report = reports[name]
                report.messages += 1
                report.codes[code] += 1
                if code in BAD and len(report.bad) < 20:
                    report.bad.append(f"{target.path} {kind}: {code} {details}")
    finally:
        for ch in channels.values():
            ch.close()
    return reports


# ------------------------------------------------------------------------------------ seeds
@dataclass(frozen=True)
class StackInfo:
    """What the seeds need to know about the stack: addresses and the model's vocabulary."""

    gateway: str
    prefill: str
    decode: str
    kvstore: str
    vocab_size: int


def _sampling(rng: random.Random) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams(max_tokens=rng.randint(1, 4), temperature=rng.choice((0.0, 0.7)))
    if rng.random() < 0.3:
        s.seed, s.logprobs, s.top_k, s.top_p = rng.randrange(2**63), rng.randint(0, 20), rng.randint(-1, 50), 0.5
    if rng.random() < 0.2:
        s.stop.extend(["\n", "the", "\U0001F600"])
        s.stop_token_ids.extend([0, 1, 2])
    return s


def _prompt(info: StackInfo, rng: random.Random) -> list[int]:
    return [rng.randrange(info.vocab_size) for _ in range(rng.randint(1, 40))]


def _block_seed(rng: random.Random) -> kvstore_pb2.BlockChunk:
    from splitserve.transfer.block import LAYOUT_VERSION, BlockHeader, payload_checksum

    payload = rng.randbytes(256)
    header = BlockHeader(block_hash=rng.randbytes(16), model_id="fuzz", num_layers=1, num_kv_heads=1, head_dim=2,
                         block_size=16, dtype="float32", layout_version=LAYOUT_VERSION,
                         checksum=payload_checksum(payload), payload_size=len(payload))
    return kvstore_pb2.BlockChunk(block_hash=header.block_hash, header=header.to_bytes(), data=payload, last=True,
                                  lease_id="fuzz-lease", lease_ttl_s=1.0)


def _seeds(info: StackInfo) -> dict[str, tuple[Callable, ...]]:
    """Valid request makers by input message full name."""
    def generate(rng):
        req = gateway_pb2.GenerateRequest(sampling=_sampling(rng), cache_salt=rng.choice(("", "t1")))
        pick = rng.randrange(3)
        if pick == 0:
            req.prompt = rng.choice(("Hello", "The capital of France is", "\U0001F600 x"))
        elif pick == 1:
            req.prompt_token_ids.ids.extend(_prompt(info, rng))
        else:
            req.chat.messages.add(role="user", content="Hi there")
        return req

    def decode(rng):
        prompt = _prompt(info, rng)
        return decode_pb2.DecodeRequest(request_id=f"fuzz-{rng.randrange(10**9)}", prompt_token_ids=prompt,
                                        output_token_ids=[rng.randrange(info.vocab_size)], sampling=_sampling(rng),
                                        kvstore_address=rng.choice(("", info.kvstore)),
                                        block_hashes=[rng.randbytes(16)])

    hashes = lambda rng: [rng.randbytes(16) for _ in range(rng.randint(0, 4))]  # noqa: E731
    return {
        "splitserve.v1.GenerateRequest": (generate,),
        "splitserve.v1.PrefillRequest": (lambda rng: prefill_pb2.PrefillRequest(
            request_id=f"fuzz-{rng.randrange(10**9)}", prompt_token_ids=_prompt(info, rng), sampling=_sampling(rng)),),
        "splitserve.v1.DecodeRequest": (decode,),
        "splitserve.v1.LoadRequest": (lambda rng: prefill_pb2.LoadRequest(),),
        "splitserve.v1.BlockChunk": (_block_seed,),
        "splitserve.v1.GetRequest": (lambda rng: kvstore_pb2.GetRequest(block_hashes=hashes(rng),
                                                                         release_lease_id="fuzz-lease"),),
        "splitserve.v1.ContainsRequest": (lambda rng: kvstore_pb2.ContainsRequest(block_hashes=hashes(rng)),),
        "splitserve.v1.ReleaseRequest": (lambda rng: kvstore_pb2.ReleaseRequest(lease_id="fuzz-lease"),),
        "splitserve.v1.StatsRequest": (lambda rng: kvstore_pb2.StatsRequest(),),
        "splitserve.v1.InfoRequest": (lambda rng: kvstore_pb2.InfoRequest(),),
        "splitserve.v1.ReserveSlotsRequest": (lambda rng: kvstore_pb2.ReserveSlotsRequest(
            payload_size=rng.choice((256, 4096)), num_slots=rng.randint(1, 4)),),
        "splitserve.v1.CommitSlotsRequest": (lambda rng: kvstore_pb2.CommitSlotsRequest(
            reservation_id="r-1", blocks=[kvstore_pb2.SlotBlock(block_hash=rng.randbytes(16),
                                                                header=_block_seed(rng).header, slot=0)],
            lease_id="fuzz-lease", lease_ttl_s=1.0),),
        "grpc.health.v1.HealthCheckRequest": (lambda rng: health_pb2.HealthCheckRequest(
            service=rng.choice(("", "splitserve.v1.Prefill", "splitserve.v1.Decode", "splitserve.v1.KVStore",
                                "splitserve.v1.Gateway", "nope"))),),
        "grpc.health.v1.HealthListRequest": (lambda rng: health_pb2.HealthListRequest(),),
    }


def targets(info: StackInfo) -> list[Target]:
    """Every method of the gateway, prefill, decode and kvstore services and of the health service
    (each role's), at the stack's addresses."""
    seeds = _seeds(info)
    services = [("gateway", info.gateway, gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]),
                ("prefill", info.prefill, prefill_pb2.DESCRIPTOR.services_by_name["Prefill"]),
                ("decode", info.decode, decode_pb2.DESCRIPTOR.services_by_name["Decode"]),
                ("kvstore", info.kvstore, kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"])]
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    out = []
    for name, address, service in services:
        for method in service.methods:
            out.append(Target(name, address, method, seeds[method.input_type.full_name]))
    for address in (info.gateway, info.prefill, info.decode, info.kvstore):
        for method in health.methods:  # Check, List, and Watch (a stream we cancel after its first answer)
            out.append(Target("health", address, method, seeds[method.input_type.full_name],
                              stream_limit=1 if method.server_streaming else 0))
    return out


def parse_check(method: _d.MethodDescriptor, raw: bytes):
    """`raw` parsed as the method's input type (tests use it to tell valid fuzz output from invalid)."""
    return message_factory.GetMessageClass(method.input_type).FromString(raw)


def stack_info(gateway: str, prefill: str, decode: str, kvstore: str) -> StackInfo:
    """The stack's vocabulary size, from the prefill worker's load report."""
    from splitserve.v1 import prefill_pb2_grpc

    with channel(prefill) as ch:
        load = prefill_pb2_grpc.PrefillStub(ch).GetLoad(prefill_pb2.LoadRequest(), timeout=10)
    return StackInfo(gateway, prefill, decode, kvstore, load.vocab_size)
