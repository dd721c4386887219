"""gRPC fuzz run: --messages fuzzed protobufs per service (gateway, prefill, decode, kvstore, and
the health service of every role) against a running stack, through splitserve.bench.grpc_fuzz
(random bytes, truncated and bit-flipped serializations, field mutations at every depth, valid
messages with extreme values). Not part of the test suite (tests/services/test_grpc_fuzz.py runs a
bounded version): 10,000 messages per service take tens of minutes on two cores.

By default it starts `splitserve up --no-restart` (float32, one worker per role), so a worker that
dies stops the stack instead of being restarted unseen; --gateway/--prefill/--decode/--kvstore
fuzz a stack that is already running. It prints, per service: messages, status-code counts, the
INTERNAL/UNKNOWN count (with the first offending messages) and crashes (processes that died or
changed pid), then checks a valid request is still served. Exit status 1 on any INTERNAL/UNKNOWN,
crash or failed final request.

    .venv/bin/python benchmarks/fuzz_grpc.py                         # 10,000 per service
    .venv/bin/python benchmarks/fuzz_grpc.py --messages 300 --seed 3 # a smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # services_fixture.start_stack

from splitserve.bench import grpc_fuzz as gf  # noqa: E402

CHUNK = 1000  # messages per service between two progress tables


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=10_000, help="messages per service")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=4, help="calls in flight at once")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call")
    p.add_argument("--services", default="gateway,prefill,decode,kvstore,health",
                   help="comma-separated services to fuzz (default: all)")
    for role in ("gateway", "prefill", "decode", "kvstore"):
        p.add_argument(f"--{role}", default="", help=f"HOST:PORT of a running {role} (with all four: no up)")
    return p.parse_args(argv)


def _print(reports: dict[str, gf.ServiceReport], seconds: float) -> None:
    print(f"{'service':<8} {'messages':>8} {'INTERNAL/UNKNOWN':>16}  status codes")
    for name, r in reports.items():
        codes = ", ".join(f"{c} {n}" for c, n in r.codes.most_common())
        print(f"{name:<8} {r.messages:>8} {r.num_bad:>16}  {codes}")
        for line in r.bad:
            print(f"    {line}")
    print(f"took {seconds:.0f} s")


def _final_check(info: gf.StackInfo) -> str:
    """"" when a valid request is served through the gateway and each role answers its health check."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from splitserve.client import generate
    from splitserve.rpc import channel

    try:
        reply = generate(info.gateway, prompt="Hello", sampling={"max_tokens": 4, "temperature": 0.0}, timeout_s=60)
        if not reply.token_ids:
            return "the final request got no tokens"
        for address in (info.gateway, info.prefill, info.decode, info.kvstore):
            with channel(address) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if status != health_pb2.HealthCheckResponse.SERVING:
                return f"{address} is not SERVING after the run"
    except Exception as exc:  # a dead role, a refused request: reported, not raised
        return f"the final check failed: {exc!r}"
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    stack = None
    if all((args.gateway, args.prefill, args.decode, args.kvstore)):
        addresses = (args.gateway, args.prefill, args.decode, args.kvstore)
    else:
        from services_fixture import start_stack

        stack = start_stack("--dtype", "float32", "--kv-cache-memory-gb", "0.2", "--prefill-workers", "1",
                            "--decode-workers", "1", "--no-restart")
        addresses = (stack.gateway, stack.roles["prefill-0"], stack.roles["decode-0"], stack.roles["kvstore"])
    try:
        pids = {name: stack.pid(name) for name in stack.roles} if stack else {}
        info = gf.stack_info(*addresses)
        start = time.monotonic()
        wanted = set(args.services.split(","))
        targets = [t for t in gf.targets(info) if t.service in wanted]
        reports: dict[str, gf.ServiceReport] = {}
        for done in range(0, args.messages, CHUNK):  # cumulative figures after each chunk, for long runs
            part = gf.fuzz(targets, min(CHUNK, args.messages - done), seed=args.seed * 100_003 + done,
                           timeout_s=args.timeout_s, max_stream_messages=2, concurrency=args.concurrency)
            for name, r in part.items():
                total = reports.setdefault(name, gf.ServiceReport())
                total.messages += r.messages
                total.codes.update(r.codes)
                total.bad.extend(r.bad[:20 - len(total.bad)])
            _print(reports, time.monotonic() - start)
            sys.stdout.flush()
        crashes = []
        if stack is not None:
            if stack.proc.poll() is not None:
                crashes.append(f"splitserve up exited with {stack.proc.returncode}")
            crashes += [f"{n}: pid {p} -> {stack.pid(n)}" for n, p in pids.items() if stack.pid(n) != p]
        final = _final_check(info)
        print(f"crashes: {len(crashes)}" + "".join(f"\n    {c}" for c in crashes))
        print(f"valid request afterwards: {'served' if not final else final}")
        bad = sum(r.num_bad for r in reports.values())
        return 1 if bad or crashes or final else 0
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
