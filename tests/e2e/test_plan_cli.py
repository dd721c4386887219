"""`splitserve plan` through the real command line (a new process each): the seed's example as JSON
and as a table, --help with its defaults, and one-line errors that name the bad MODEL or flag."""
from __future__ import annotations

import json
import re
import subprocess
import sys

CLI = [sys.executable, "-m", "splitserve.launch.cli", "plan"]
SEED = ["llama-3-70b", "--batch-size", "32", "--context-len", "4096", "--device-memory-gb", "80"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_seed_example_as_json_and_as_a_table():
    awq = _run(*SEED, "--quantization", "AWQ", "--json")
    assert awq.returncode == 0, awq.stderr
    plan = json.loads(awq.stdout)
    for key in ("weights_bytes", "kv_bytes_per_token", "kv_bytes", "total_bytes", "devices_needed", "max_batch_size",
                "model", "quantization", "kv_cache_dtype", "batch_size", "context_len", "device_memory_gb",
                "tensor_parallel_size"):
        assert key in plan, key
    assert (plan["model"], plan["quantization"], plan["batch_size"], plan["context_len"]) == ("llama-3-70b", "awq", 32, 4096)
    assert plan["devices_needed"] == 1 and plan["weights_bytes"] < 38 << 30
    fp16 = _run(*SEED, "--quantization", "none")
    assert fp16.returncode == 0, fp16.stderr
    assert re.search(r"^devices needed +3 by memory; tensor parallel size 4$", fp16.stdout, re.MULTILINE), fp16.stdout
    assert re.search(r"^total +172\.57 GiB per device, .*: does NOT fit$", fp16.stdout, re.MULTILINE), fp16.stdout


def test_help_shows_the_defaults():
    out = _run("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for shown in ("--quantization", "Q4_K_M", "--kv-cache-dtype", "(default: auto)", "--batch-size",
                  "(default: 1)", "(default: 80.0)", "--tensor-parallel-size", "--json", "llama-3-70b"):
        assert shown in text, shown


def test_errors_are_one_line_naming_the_model_or_flag(tmp_path):
    for args, named in ((["llama-9-900b"], "MODEL 'llama-9-900b'"),
                        ([str(tmp_path)], f"{tmp_path}: no config.json"),
                        (["llama-3-8b", "--quantization", "Q9_X"], "argument --quantization: 'Q9_X' is not one of"),
                        (["llama-3-8b", "--batch-size", "0"], "argument --batch-size: must be > 0"),
                        (["llama-3-8b", "--tensor-parallel-size", "5"], "--tensor-parallel-size 5 does not split")):
        result = _run(*args)
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("usage:")
                 and not line.startswith(" ")]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1 and "error:" in lines[0] and named in lines[0], result.stderr
