"""What one benchmark run measured, and the arithmetic over it. No I/O.

Times are seconds from the start of the run (`time.perf_counter()` at the runner's start).

Per request:
- TTFT: send to the first streamed chunk that carries a token (a choice with text, or with a
  finish reason: the chunk that reports the last token, even when its text is empty).
- ITL: the gaps between consecutive such chunks. A chunk that carries k > 1 tokens (the server
  sent them together) counts as one gap, not k: the client waited that long and then got all k at
  once. This is what `vllm bench serve` does; it makes mean ITL larger than TPOT when a server
  coalesces tokens into chunks, while TPOT, from the usage token count, stays per token.
- E2EL: send to the end of the response stream (`data: [DONE]`).
- TPOT: (E2EL - TTFT) / (completion tokens - 1), for requests with at least 2 completion tokens.
- Prompt and completion tokens: from the `usage` the server sends last; without one, the prompt
  length asked for and the number of token chunks.

The summary counts only successful requests; duration is from the start of the run to the end of
the last request. Percentiles interpolate linearly (numpy's default). Latencies are reported in ms.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (90, 99)  # besides the median
SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    index: int
    prompt_len: int  # asked for
    output_len: int  # asked for (max_tokens)
    scheduled_time: float = 0.0  # when its arrival time came
    send_time: float = 0.0  # when it was sent (later than scheduled while --max-concurrency holds it back)
    chunk_times: list[float] = field(default_factory=list)  # each chunk carrying a token, as it arrived
    end_time: float | None = None  # end of the response stream
    prompt_tokens: int | None = None  # from the usage
    completion_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server says
    success: bool = False
    error: str = ""
    finish_reason: str | None = None
    generated_text: str = ""

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.send_time if self.chunk_times else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def e2el(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.send_time

    @property
    def input_tokens(self) -> int:
        return self.prompt_tokens if self.prompt_tokens is not None else self.prompt_len

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if n < 2 or self.ttft is None or self.e2el is None:
            return None
        return (self.e2el - self.ttft) / (n - 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(ttft=self.ttft, tpot=self.tpot, e2el=self.e2el, itl=self.itl)
        return d


def latency_stats(values_s, percentiles=PERCENTILES) -> dict[str, float | None]:
    """mean, median, std and the percentiles of `values_s` (seconds), in milliseconds; None when empty."""
    keys = ["mean", "median", "std"] + [f"p{p}" for p in percentiles]
    if len(values_s) == 0:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=float) * 1000.0
    out = {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std())}
    out.update({f"p{p}": float(np.percentile(ms, p)) for p in percentiles})
    return out


def parse_goodput(items) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 0.2, "tpot": 0.05} (SLOs given in ms, kept in seconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = str(item).partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput: {item!r} is not METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {item!r}: {value!r} is not a number of milliseconds") from None
        if not (ms > 0) or np.isinf(ms):
            raise ValueError(f"--goodput: {item!r}: the limit must be a positive number of milliseconds")
        slos[name] = ms / 1000.0
    return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
    """A successful request whose every given SLO holds (a TPOT SLO holds trivially for a request of
    fewer than 2 tokens: it has no TPOT to miss)."""
    if not record.success:
        return False
    for name, limit in slos.items():
        value = getattr(record, name)
        if value is None:
            if name == "tpot":
                continue
            return False
        if value > limit:
            return False
    return True


def summarize(records: list[RequestRecord], duration_s: float, slos: dict[str, float] | None = None,
              percentiles=PERCENTILES) -> dict:
    """The numbers of the report: counts, throughputs (per second of `duration_s`) and latency stats (ms)."""
    ok = [r for r in records if r.success]
    duration = max(float(duration_s), 1e-9)
    input_tokens = sum(r.input_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    out: dict = {
        "duration_s": float(duration_s),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    out["total_cached_tokens"] = sum(cached) if cached else None
    series = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.e2el for r in ok if r.e2el is not None],
    }
    for name in LATENCIES:
        for stat, value in latency_stats(series[name], percentiles).items():
            out[f"{stat}_{name}_ms"] = value
    if slos:
        good = sum(1 for r in records if meets_slos(r, slos))
        out["goodput_slos_ms"] = {k: v * 1000.0 for k, v in slos.items()}
        out["good_requests"] = good
        out["request_goodput"] = good / duration
    return out


def timeline(records: list[RequestRecord], duration_s: float, bins: int | None = None) -> dict[str, list[float]]:
    """Output tokens/s, completed requests/s and requests in flight over `bins` equal slices of the run
    (default: one per second, at least 5 and at most 100).

    A request's completion tokens are spread evenly over its token chunks (one each when every chunk
    carries one token)."""
    duration = max(float(duration_s), 1e-9)
    bins = bins or min(100, max(5, math.ceil(duration)))
    edges = np.linspace(0.0, duration, bins + 1)
    width = edges[1] - edges[0]
    tokens = np.zeros(bins)
    done = np.zeros(bins)
    in_flight = np.zeros(bins)
    centers = (edges[:-1] + edges[1:]) / 2
    for r in records:
        if r.success and r.chunk_times:
            per_chunk = r.output_tokens / len(r.chunk_times)
            idx = np.clip(np.searchsorted(edges, r.chunk_times, side="right") - 1, 0, bins - 1)
            np.add.at(tokens, idx, per_chunk)
        if r.success and r.end_time is not None:
            done[min(max(int(np.searchsorted(edges, r.end_time, side="right")) - 1, 0), bins - 1)] += 1
        end = r.end_time if r.end_time is not None else duration
        in_flight += (centers >= r.send_time) & (centers < end)
    return {"time_s": centers.tolist(), "output_tokens_per_s": (tokens / width).tolist(),
            "completed_per_s": (done / width).tolist(), "in_flight": in_flight.tolist()}
