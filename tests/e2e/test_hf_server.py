"""`splitserve hf-serve` end to end: a real server process (float32), real HTTP.

A burst of two requests is one static batch (headers and the batch log line say so) and each gets
exactly its max_tokens; greedy text equals splitserve's engine for the same token ids (the engine
agrees with HF transformers: tests/test_model_vs_hf.py), also for rows left-padded in a batch; bad
requests are 400s naming the field and the server serves on; `splitserve bench` runs against it.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time

import pytest

from splitserve import SamplingParams
from splitserve.bench.runner import httpx

START_TIMEOUT_S = 240.0  # loading the GGUF into transformers is slow on a busy 2-core machine


class Server:
    def __init__(self, *flags: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "splitserve.launch.cli", "hf-serve", "--port", "0", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("hf-serve did not start:\n" + "\n".join(self.log[-30:]))
            time.sleep(0.1)
        self.model = httpx.get(f"{self.url}/models").json()["data"][0]["id"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line.rstrip())
            m = re.search(r"hf-serve listening: url=(\S+)", line)
            if m:
                self.url = m.group(1)

    def batch_lines(self, batch_id: str, timeout_s: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in self.log if f"batch: id={batch_id} " in line]
            if found:
                return found
            time.sleep(0.05)
        return []

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def _server_process():
    # a long batch wait so that the two requests of the burst test surely share a batch
    s = Server("--dtype", "float32", "--batch-wait-ms", "300")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(_server_process, llm_exact):
    """The server, ready; it loads while this process loads the engine (the reference)."""
    _server_process.wait_ready()
    return _server_process


async def _stream(client, server: Server, prompt, max_tokens: int) -> dict:
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    out = {"text": "", "text_chunks": 0, "finish": None, "usage": None, "done": False}
    async with client.stream("POST", f"{server.url}/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        out["batch"] = (resp.headers["x-batch-id"], int(resp.headers["x-batch-size"]))
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                out["usage"] = event["usage"]
            for choice in event["choices"]:
                out["text"] += choice["text"]
                out["text_chunks"] += 1
                out["finish"] = choice["finish_reason"] or out["finish"]
    return out


def _burst(server: Server, prompts: list[list[int]], lengths: list[int]) -> list[dict]:
    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(_stream(client, server, p, n) for p, n in zip(prompts, lengths)))
    return asyncio.run(run())


def _greedy(llm, prompt: list[int], n: int):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]


def test_burst_is_one_batch_with_exact_lengths_and_engine_greedy(server, llm_exact):
    tok = llm_exact.tokenizer
    prompts = [tok.encode("La tour Eiffel est un monument de Paris qui"), tok.encode("1, 2, 3, 5, 8, 13,")]
    assert len(prompts[0]) != len(prompts[1])  # the shorter row is left-padded
    a, b = _burst(server, prompts, [3, 6])
    assert a["batch"] == b["batch"] and a["batch"][1] == 2
    for r, n, prompt in ((a, 3, prompts[0]), (b, 6, prompts[1])):
        assert r["done"] and r["finish"] == "length"
        assert r["usage"]["completion_tokens"] == n and r["usage"]["prompt_tokens"] == len(prompt)
        assert 1 <= r["text_chunks"] <= n  # streamed token by token (a chunk may wait for a whole character)
        assert r["text"] == _greedy(llm_exact, prompt, n).text
    lines = server.batch_lines(a["batch"][0])
    assert len(lines) == 1, server.log[-10:]
    assert f"size=2 padded_prompt_len={max(map(len, prompts))} steps=6 useful_tokens=9 computed_tokens=12" in lines[0]


def test_single_greedy_matches_engine(server, llm_exact):
    prompt = llm_exact.tokenizer.encode("def quicksort(arr):\n    \"\"\"Sort a list.\"\"\"\n")
    (r,) = _burst(server, [prompt], [16])
    ref = _greedy(llm_exact, prompt, 16)
    assert r["text"] == ref.text and r["usage"]["completion_tokens"] == len(ref.token_ids) == 16
    # not streamed: one JSON body, same answer; text prompts are tokenized like the engine does
    body = {"model": server.model, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}
    resp = httpx.post(f"{server.url}/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    ref = llm_exact.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5))[0]
    assert choice["text"] == ref.text and choice["finish_reason"] == ref.finish_reason


@pytest.mark.parametrize("patch,param", [
    ({"prompt": None}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"prompt": [0] * 9000}, "prompt"),
    ({"max_tokens": 8190}, "max_tokens"),
    ({"prompt": [[1, 2], [3, 4]]}, "prompt"),
    ({"prompt": [1, 10**6]}, "prompt"),
    ({"temperature": "hot"}, "temperature"),
])
def test_bad_requests_are_400_naming_the_field(server, patch, param):
    body = {"model": server.model, "prompt": [1, 2, 3, 4], "max_tokens": 4} | patch
    body = {k: v for k, v in body.items() if v is not None}
    resp = httpx.post(f"{server.url}/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    ok = httpx.post(f"{server.url}/completions", json={"model": server.model, "prompt": [1, 2], "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


def test_splitserve_bench_against_it(server):
    cmd = [sys.executable, "-m", "splitserve.launch.cli", "bench", "--base-url", server.url, "--num-prompts", "3",
           "--input-len", "8", "--output-len", "4", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"requests completed\s+3\b", done.stdout), done.stdout
    assert re.search(r"requests failed\s+0\b", done.stdout), done.stdout
