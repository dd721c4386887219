"""`splitserve up --autoscale`: a decode worker added under load serves, and is drained when idle.

One stack with decode bounds [1, 2], an ITL target of 1 ms (any CPU stream is over it: the load
signal), an 8 s latency window (a slow moment between tokens is no idleness), a 5 s stabilisation
window and a 1 s cooldown; prefill held at one worker. A ramp of concurrent greedy streams makes
the autoscaler start decode-1, which registers in Redis, is discovered by the gateway and runs some
of the streams; once the load stops, decode-1 is drained after the window (SIGTERM, exit 0) and
removed, not restarted. Every request ends with all its tokens and no error; the decisions are in
up's log and in its /metrics.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest
from services_fixture import start_stack, wait_for
from splitserve.client import stream_generate
from splitserve.rpc import channel
from splitserve.v1 import decode_pb2_grpc, prefill_pb2

TOKENS = 24  # per request
STREAMS = 4  # concurrent clients during the ramp


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = start_stack("--kv-cache-memory-gb", "0.1", "--decode-workers", "1", "--autoscale",
                    "--autoscale-decode-max-workers", "2", "--autoscale-prefill-max-workers", "1",
                    "--autoscale-decode-itl-p50-target-s", "0.001", "--autoscale-latency-window-s", "8",
                    "--autoscale-stabilization-s", "5", "--autoscale-cooldown-s", "1", "--autoscale-interval-s", "0.5",
                    "--autoscale-prefill-ttft-p50-target-s", "600", "--autoscale-prefill-ttft-p99-target-s", "600",
                    "--decode-drain-timeout-s", "10", "--decode-registration-ttl-s", "2")
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop()
        path = tmp_path_factory.mktemp("autoscale") / "stack.log"
        path.write_text("\n".join(s.log) + "\n")
        print(f"splitserve up log: {path}")
    assert s.proc.returncode == 0, "\n".join(s.log[-40:])


def lines(stack, pattern: str) -> list[str]:
    return [line for line in list(stack.log) if re.search(pattern, line)]


def decode_health(stack) -> dict:
    with urllib.request.urlopen(stack.http_base.removesuffix("/v1") + "/health", timeout=10) as resp:
        return json.loads(resp.read())["decode"]


def decode_load(address: str) -> prefill_pb2.LoadResponse:
    with channel(address) as ch:
        return decode_pb2_grpc.DecodeStub(ch).GetLoad(prefill_pb2.LoadRequest(), timeout=5)


def decisions(stack) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(stack.metrics["autoscaler"], timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(r'splitserve_autoscaler_decisions_total\{(.*)\} ([0-9.]+)', text)
    return {tuple(re.search(f'{k}="(\\w+)"', labels).group(1) for k in ("role", "action")): float(n)
            for labels, n in found}


class Load:
    """`clients` clients, each streaming greedy requests one after another until stop()."""

    def __init__(self, stack, clients: int, name: str) -> None:
        self.stack = stack
        self.name = name
        self.done: list[int] = []  # tokens of each finished request
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                got = [len(m.token_ids) for m in stream_generate(
                    self.stack.gateway, prompt=f"{self.name} {i}, request {n}: name a colour and a fruit.",
                    timeout_s=300,
                    sampling={"max_tokens": TOKENS, "temperature": 0.0, "ignore_eos": True})]
                self.done.append(sum(got))
            except Exception as e:  # noqa: BLE001 - any failure is what the test looks for
                self.errors.append(f"client {i} request {n}: {e!r}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(300)


@pytest.mark.timeout(600)
def test_a_ramp_adds_a_decode_worker_that_serves_and_idleness_drains_it(stack):
    ramp = Load(stack, STREAMS, "Ramp")
    loads = [ramp]
    try:
        wait_for(lambda: lines(stack, r"started decode-1 pid="), 60, "the autoscaler to start decode-1")
        # while decode-1 loads its model, one client keeps the ITL signal up (no drain when it is
        # ready) and leaves the cores to the load
        loads.append(Load(stack, 1, "Trickle"))
        ramp.stop()
        up = lines(stack, r"autoscale decision: role=decode action=up")
        assert len(up) == 1 and "workers=1->2 reason=itl_p50_s" in up[0], up
        assert "itl_p50_s=" in up[0] and "(up>0.001 idle<0.0005)" in up[0] and "bounds=[1,2]" in up[0], up[0]
        address = lines(stack, r"started decode-1 pid=")[0].rsplit(" on ", 1)[1].strip()
        # its model load, then the gateway's discovery: no restart of anything
        wait_for(lambda: decode_health(stack) == {"healthy": 2, "draining": 0, "total": 2}, 400,
                 "the gateway to route to decode-1", interval_s=0.5)
        loads.append(Load(stack, STREAMS, "Burst"))  # spread over both decode workers
        wait_for(lambda: decode_load(address).max_batch_size >= 1, 120, "decode-1 to run a request")
    finally:
        for load in loads:
            load.stop()
    assert decode_load(address).max_batch_size >= 1
    assert [e for load in loads for e in load.errors] == []
    done = [n for load in loads for n in load.done]
    assert len(done) >= STREAMS and set(done) == {TOKENS}
    # idle: the ITL leaves the 8 s window, then 5 s of calm; decode-1 (the newest) drains and is removed
    wait_for(lambda: lines(stack, r"decode-1 drained by the autoscaler and removed"), 60, "decode-1 drained")
    down = lines(stack, r"autoscale decision: role=decode action=down")
    assert len(down) == 1 and "workers=2->1" in down[0] and "idle for" in down[0], down
    assert "(exit code 0)" in lines(stack, r"decode-1 drained by the autoscaler and removed")[0]
    wait_for(lambda: decode_health(stack)["total"] == 1, 10, "the gateway to drop decode-1")
    time.sleep(3)  # longer than the first restart delay: a crash would have been restarted by now
    assert not lines(stack, r"decode-1 (restarted|exited)"), lines(stack, r"decode-1")
    assert decode_load(stack.roles["decode-0"]).num_running == 0
    got = decisions(stack)
    assert got[("decode", "up")] == 1 and got[("decode", "down")] == 1, got
    assert ("prefill", "up") not in got and ("prefill", "down") not in got, got
