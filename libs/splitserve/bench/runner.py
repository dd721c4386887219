"""Sends a workload to an OpenAI-compatible server and records every request (asyncio + httpx).

Each request is `POST {base_url}/completions` with stream=true, stream_options.include_usage=true,
max_tokens = its output length, ignore_eos (a vendor field vLLM and splitserve accept) and the
temperature asked for. Request i waits for its arrival time, then for a slot when
`max_concurrency` is set, then is sent.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import urlsplit

try:  # httpx2 is the maintained continuation of httpx (same API); either will do
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from splitserve.bench.datasets import BenchRequest
from splitserve.bench.metrics import RequestRecord

ERROR_CHARS = 500


def normalize_base_url(url: str) -> str:
    """`http://host:port` -> `http://host:port/v1`; a URL with a path is kept as given (less a trailing /)."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r} (expected e.g. http://127.0.0.1:8000/v1)")
    return url if parts.path else url + "/v1"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


@dataclass
class ServerInfo:
    model: str
    root: str | None
    max_model_len: int | None
    listed: list[str]  # the model ids GET /models lists


async def fetch_server_info(base_url: str, api_key: str | None = None, model: str | None = None,
                            timeout_s: float = 30.0) -> ServerInfo:
    """The model to ask for (`model`, else the first of GET /models) and what the server says about it."""
    async with httpx.AsyncClient(timeout=timeout_s, headers=_headers(api_key)) as client:
        try:
            resp = await client.get(f"{base_url}/models")
        except httpx.HTTPError as exc:
            raise RuntimeError(f"cannot reach {base_url}/models: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise RuntimeError(f"GET {base_url}/models answered {resp.status_code}: {_error_text(resp.text)}")
    try:
        cards = resp.json().get("data") or []
    except (ValueError, AttributeError):
        raise RuntimeError(f"GET {base_url}/models did not answer a JSON model list") from None
    card = next((c for c in cards if isinstance(c, dict) and (model is None or c.get("id") == model)), None)
    if card is None and model is None:
        raise RuntimeError(f"{base_url}/models lists no model (is the server ready?)")
    listed = [str(c.get("id")) for c in cards if isinstance(c, dict)]
    card = card or {}
    return ServerInfo(model or card["id"], card.get("root"), card.get("max_model_len"), listed)


def _error_text(body: str) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:ERROR_CHARS]
        if isinstance(err, str):
            return err[:ERROR_CHARS]
    except (ValueError, AttributeError):
        pass
    return body.strip()[:ERROR_CHARS]


def request_body(req: BenchRequest, model: str, temperature: float = 0.0, ignore_eos: bool = True) -> dict:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_one(client, url: str, body: dict, record: RequestRecord, t0: float) -> None:
    """Streams one completion into `record` (times relative to `t0`); never raises for server or
    network failures: they are recorded as the request's error."""
    now = lambda: time.perf_counter() - t0  # noqa: E731
    record.send_time = now()
    done = False
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {resp.status_code}: {_error_text(text)}"
                record.end_time = now()
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                stamp = now()
                try:
                    event = json.loads(data)
                except ValueError:
                    record.error = f"malformed stream event: {data[:200]!r}"
                    break
                if not isinstance(event, dict):
                    continue
                if event.get("error") is not None:
                    err = event["error"]
                    record.error = "stream error: " + (str(err.get("message", err)) if isinstance(err, dict) else str(err))[:ERROR_CHARS]
                    break
                usage = event.get("usage")
                if isinstance(usage, dict):
                    record.prompt_tokens = usage.get("prompt_tokens")
                    record.completion_tokens = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details")
                    if isinstance(details, dict) and details.get("cached_tokens") is not None:
                        record.cached_tokens = details["cached_tokens"]
                for choice in event.get("choices") or []:
                    text = choice.get("text") or ""
                    if text or choice.get("finish_reason"):
                        record.chunk_times.append(stamp)
                        record.generated_text += text
                    if choice.get("finish_reason"):
                        record.finish_reason = choice["finish_reason"]
                    break  # one choice per request (n = 1)
        record.end_time = now()
        if not record.error and not done:
            record.error = "the response stream ended without [DONE]"
    except Exception as exc:  # network errors, protocol errors, a broken stream: the request failed
        record.end_time = now()
        record.error = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS] or type(exc).__name__
    record.success = not record.error


def _raise_open_files_limit(wanted: int) -> None:
    """Lifts the soft limit on open files towards `wanted` (up to the hard limit), so thousands of
    concurrent requests do not fail with 'too many open files'."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):  # not on this platform, or not allowed: keep the limit
        pass


async def run(base_url: str, model: str, requests: Sequence[BenchRequest], arrivals: Sequence[float], *,
              max_concurrency: int | None = None, api_key: str | None = None, temperature: float = 0.0,
              ignore_eos: bool = True, num_warmups: int = 0, progress: bool = True,
              timeout_s: float = 600.0) -> tuple[list[RequestRecord], float]:
    """Runs the workload; returns a record per request (in workload order) and the duration in
    seconds (from the start to the end of the last request). `num_warmups` requests (the first
    prompts of the workload, sent one at a time) go first and are not recorded."""
    if len(arrivals) != len(requests):
        raise ValueError("one arrival time per request")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    url = f"{base_url}/completions"
    connections = max_concurrency or max(len(requests), 1)
    _raise_open_files_limit(connections + 64)  # one socket per request in flight
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(timeout_s, connect=30.0, pool=None)
    records = [RequestRecord(i, r.prompt_len, r.output_len) for i, r in enumerate(requests)]
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=_headers(api_key)) as client:
        for i in range(num_warmups):
            warm = RequestRecord(-1, 0, 0)
            req = requests[i % len(requests)]
            await send_one(client, url, request_body(req, model, temperature, ignore_eos), warm, time.perf_counter())
            if not warm.success:
                raise RuntimeError(f"warm-up request failed: {warm.error}")

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="requests", unit="req", dynamic_ncols=True)
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            delay = float(arrivals[i]) - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            records[i].scheduled_time = float(arrivals[i])
            body = request_body(requests[i], model, temperature, ignore_eos)
            if semaphore is None:
                await send_one(client, url, body, records[i], t0)
            else:
                async with semaphore:
                    await send_one(client, url, body, records[i], t0)
            if bar is not None:
                bar.update(1)

        try:
            await asyncio.gather(*(one(i) for i in range(len(requests))))
        finally:
            if bar is not None:
                bar.close()
    ends = [r.end_time for r in records if r.end_time is not None]
    duration = max(ends) if ends else 0.0
    return records, duration if math.isfinite(duration) else 0.0
