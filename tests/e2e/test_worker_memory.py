"""Issue 19: a worker of the default model holds at most 400 MiB at its peak besides its KV pool,
and no serving process imports HF transformers (its import alone held ~60 MiB a process).

Read on the session's stack (float32, a 0.1 GiB pool a worker) after it served a request: the peak
(VmHWM) of the prefill and the decode worker from /proc, less the pool, which torch.zeros writes
and so is resident in full (num_total_blocks x bytes a block, from the worker's GetLoad and the
model's shape).

Measured on the 2-core VM (torch 2.13 CPU build), one completion and one chat served: the peak
less the pool was 416-418 MiB a worker while the tokenizer came from transformers, 385-386 MiB
since (~20 MiB transformers' import, ~15 MiB heap freed by parsing tokenizer.json and now
returned by malloc_trim); what is left is mostly torch and the model's blocks (docs/performance.md).
"""
from __future__ import annotations

import json
import urllib.request

from splitserve.engine import memory
from splitserve.model.gguf_file import GGUFFile
from splitserve.model.loader import default_model_path, read_gguf_args

TARGET_MIB = 400  # the bound on a worker's peak RSS less its KV pool
# `regex` is a hard dependency of transformers, mapped as soon as it is imported; no serving code of
# splitserve imports it (transformers is pure Python: this is what its import leaves in the maps)
TRANSFORMERS_MARK = "/regex/_regex"


def _status_mib(pid: int) -> dict[str, float]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


def _pool_mib(load) -> float:
    path = default_model_path()
    args = read_gguf_args(GGUFFile(path), path)
    per_block = memory.kv_block_bytes(args.num_layers, args.num_kv_heads, args.head_dim, load.block_size, "float32")
    return load.num_total_blocks * per_block / 2**20


def test_workers_peak_rss_less_their_kv_pool_is_within_the_target(http_stack):
    assert http_stack.default_dtype or "--dtype" in " ".join(http_stack.proc.args)  # float32 either way
    body = {"model": "", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    with urllib.request.urlopen(f"{http_stack.http_base}/models", timeout=60) as resp:
        body["model"] = json.loads(resp.read())["data"][0]["id"]
    req = urllib.request.Request(f"{http_stack.http_base}/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:  # both workers have served before the reading
        assert json.loads(resp.read())["usage"]["completion_tokens"] == 4
    report = {}
    for name, load in (("prefill-0", http_stack.prefill_load()), ("decode-0", http_stack.decode_load())):
        pid = http_stack.pid(name)
        status, pool = _status_mib(pid), _pool_mib(load)
        report[name] = {**status, "pool": round(pool, 1), "peak_less_pool": round(status["VmHWM"] - pool, 1)}
    print(report)
    for name, numbers in report.items():
        assert 50 < numbers["pool"] <= 0.1 * 1024, report  # the stack's --kv-cache-memory-gb 0.1
        assert numbers["peak_less_pool"] <= TARGET_MIB, report


def test_no_serving_process_has_imported_transformers(http_stack):
    """Every process `up` started (workers, gateway, kvstore; Redis trivially)."""
    pids = http_stack.child_pids()
    workers = {http_stack.pid("prefill-0"), http_stack.pid("decode-0")}
    assert len(pids) >= 4 and workers <= set(pids), pids
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            mapped = f.read()
        assert "/torch/" in mapped or pid not in workers, pid  # the maps were read: a worker maps torch
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().replace(b"\0", b" ").decode(errors="replace")
        assert TRANSFORMERS_MARK not in mapped, f"pid {pid} ({argv}) has imported transformers"
