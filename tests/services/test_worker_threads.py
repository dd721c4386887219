"""How a worker runs its torch threads: one OpenMP team (the loop thread's), and a short spin; and
that its startup objects are frozen out of Python's collections.

libgomp counts the threads of every team in a process; once they outnumber the cores it throttles
the spin of waiting threads to 1,000 rounds, and each small op of a step then waits for its
threads to wake. So a worker loads its model on one torch thread and only the loop thread runs
parallel regions; `splitserve up` gives its children a short GOMP_SPINCOUNT instead of the default
(milliseconds of spinning after every step, which starves the other worker) or PASSIVE (no spin).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from splitserve.launch.up import GOMP_SPINCOUNT


def test_worker_runs_torch_threads_on_its_loop_thread_only():
    code = """
import json, torch
from splitserve.sampling_params import SamplingParams
from splitserve.worker import Worker
from splitserve.config.worker import WorkerConfig
w = Worker(WorkerConfig(dtype="float32", torch_threads=2, kv_cache_memory_gb=0.05, metrics_port=-1), "prefill")
out = w.loop.add_request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=2, temperature=0)).get(timeout=120)
loop_threads = w.loop.call(lambda e: torch.get_num_threads()).result(timeout=30)
import gc
print(json.dumps({"main": torch.get_num_threads(), "loop": loop_threads, "tokens": len(out.new_token_ids),
                  "frozen": gc.get_freeze_count(), "walked": len(gc.get_objects())}))
w.loop.stop()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    frozen, walked = result.pop("frozen"), result.pop("walked")
    assert result == {"main": 1, "loop": 2, "tokens": 1}
    # what the worker built at startup (torch, the model, gRPC: ~180K objects) is frozen: a full
    # collection walks only what came after (a few thousand here), not every module and class
    assert frozen > 100_000 and walked < frozen / 10, (frozen, walked)


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def test_up_gives_workers_a_short_openmp_spin(http_stack):
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        expected = os.environ.get("GOMP_SPINCOUNT")  # the caller's own setting is kept
    else:
        expected = str(GOMP_SPINCOUNT)
    for role in ("prefill-0", "decode-0"):
        env = _environ(http_stack.pids[role])
        assert env.get("GOMP_SPINCOUNT") == expected, role
        assert env.get("OMP_WAIT_POLICY") == os.environ.get("OMP_WAIT_POLICY"), role


def test_up_workers_pin_their_team_one_thread_per_core(http_stack):
    """`up` gives each worker one torch thread per core it may use, so --pin-threads auto binds the
    loop thread's team, thread i to the i-th core; every other thread of the worker (gRPC, metrics,
    Redis records) is left to the scheduler on all the cores."""
    from splitserve.config.cpus import available_cpus

    cores = available_cpus()
    for role in ("prefill-0", "decode-0"):
        pid = http_stack.pid(role)
        masks = {int(tid): os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
        pinned = sorted((min(m), tid) for tid, m in masks.items() if len(m) == 1)
        assert len(masks) > 4, masks  # the loop thread, its team, gRPC's threads ...
        assert any(f"engine threads pinned, one per core: thread " in line for line in http_stack.log), role
        if len(cores) > 1:  # (one core: every thread is on it anyway)
            assert [core for core, _ in pinned] == cores, (role, masks)
            assert all(m == set(cores) for tid, m in masks.items() if len(m) > 1), (role, masks)
            loop_thread = pinned[0][1]  # thread 0 of the team, on the first core
            assert any(f"engine threads pinned, one per core: thread {loop_thread} on core {cores[0]}" in line
                       for line in http_stack.log), role
