"""The autoscaler's policy (`splitserve up --autoscale`): per-role worker bounds, the thresholds on
each role's own signals, and the timing that keeps it from flapping (launch/autoscale.py applies it).

Signals, per role (never CPU: a worker that waits for memory bandwidth looks idle to it):
- decode: KV-cache usage (the mean of the workers' GetLoad) and the inter-token latency p50 (the
  decode workers' own /metrics histogram, over the last `latency_window_s`);
- prefill: queue depth (requests waiting per worker, GetLoad) and the time to first token, p50 and
  p99 (the gateway's /metrics histogram, the only place a TTFT is measured);
- colocated workers (--colocated) do both, so all four count for them, with the prefill bounds.
A role scales up when any of its signals is over its high threshold, and down only when every one
has stayed under its low threshold for `stabilization_s`; between the two it holds (hysteresis).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AutoscaleConfig:
    decode_min_workers: int = 1
    """Fewest decode workers the autoscaler keeps (it never drains below)."""
    decode_max_workers: int = 4
    """Most decode workers the autoscaler starts."""
    prefill_min_workers: int = 1
    """Fewest prefill (or, with --colocated, colocated) workers the autoscaler keeps."""
    prefill_max_workers: int = 4
    """Most prefill (or colocated) workers the autoscaler starts."""
    decode_kv_usage_high: float = 0.85
    """Scale decode up when the workers' mean KV-cache usage (0..1) is over this: past it the
    scheduler starts queueing and preempting (above 1: never on KV usage)."""
    decode_kv_usage_low: float = 0.5
    """KV-cache usage under which decode counts as idle (for a scale-down)."""
    decode_itl_p50_target_s: float = 0.1
    """Scale decode up when the inter-token latency p50 is over this many seconds."""
    prefill_queue_high: float = 4.0
    """Scale prefill up when more requests than this wait per prefill worker (GetLoad num_waiting)."""
    prefill_queue_low: float = 0.5
    """Waiting requests per prefill worker under which prefill counts as idle."""
    prefill_ttft_p50_target_s: float = 0.2
    """Scale prefill up when the time to first token p50 is over this many seconds."""
    prefill_ttft_p99_target_s: float = 1.0
    """Scale prefill up when the time to first token p99 is over this many seconds."""
    latency_low_fraction: float = 0.5
    """A latency counts as idle under this fraction of its target (the hysteresis band of the
    latency signals; KV usage and queue depth have their own low thresholds)."""
    latency_window_s: float = 30.0
    """Latency quantiles are taken over the observations of the last this many seconds (none in the
    window: that signal is idle)."""
    stabilization_s: float = 300.0
    """A role is scaled down only after all its signals stayed under their low thresholds this long
    (minutes: a worker takes long to load, so one drained too early costs a slow start later)."""
    cooldown_s: float = 60.0
    """Least time between two decisions for one role (a new worker's load shows only after it serves)."""
    interval_s: float = 2.0
    """Seconds between two reads of the signals (GetLoad of every worker, the /metrics scrapes)."""

    def __post_init__(self) -> None:
        for role in ("decode", "prefill"):
            lo, hi = getattr(self, f"{role}_min_workers"), getattr(self, f"{role}_max_workers")
            if not 1 <= lo <= hi:
                raise ValueError(f"autoscale_{role}_min_workers ({lo}) must be >= 1 and <= "
                                 f"autoscale_{role}_max_workers ({hi})")
        for low, high in (("decode_kv_usage_low", "decode_kv_usage_high"), ("prefill_queue_low", "prefill_queue_high")):
            if not 0 <= getattr(self, low) < getattr(self, high):
                raise ValueError(f"autoscale_{low} ({getattr(self, low)}) must be >= 0 and below "
                                 f"autoscale_{high} ({getattr(self, high)})")
        if not 0 < self.latency_low_fraction <= 1:
            raise ValueError(f"autoscale_latency_low_fraction must be in (0, 1], got {self.latency_low_fraction}")
        for name in ("decode_itl_p50_target_s", "prefill_ttft_p50_target_s", "prefill_ttft_p99_target_s",
                     "latency_window_s", "interval_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"autoscale_{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("stabilization_s", "cooldown_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"autoscale_{name} must be a finite number >= 0, got {getattr(self, name)}")

    def bounds(self, role: str) -> tuple[int, int]:
        """(min, max) workers of a worker role (colocated workers take the prefill bounds)."""
        source = "decode" if role == "decode" else "prefill"
        return getattr(self, f"{source}_min_workers"), getattr(self, f"{source}_max_workers")
