"""When each request of a benchmark is sent: gamma-distributed gaps, seeded. No I/O.

Gaps between consecutive requests are drawn from a gamma distribution with shape `burstiness` and
scale `1 / (request_rate * burstiness)`, so the mean gap is `1 / request_rate` whatever the
burstiness and the coefficient of variation (std / mean) is `1 / sqrt(burstiness)`:
burstiness 1 is a Poisson process (exponential gaps), below 1 burstier, above 1 more regular.
An infinite rate sends every request at once.
"""
from __future__ import annotations

import math

import numpy as np


def _check(request_rate: float, burstiness: float) -> None:
    if not (request_rate > 0):  # also rejects NaN
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if not (burstiness > 0) or math.isinf(burstiness):
        raise ValueError(f"--burstiness must be a finite number > 0, got {burstiness}")


def arrival_gaps(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """`n` gaps in seconds drawn from Gamma(shape=burstiness, mean=1/request_rate); zeros for inf."""
    _check(request_rate, burstiness)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if math.isinf(request_rate):
        return np.zeros(n)
    rng = np.random.default_rng([seed, 2])  # a stream of its own: the dataset's draws never shift it
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)


def arrival_times(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send offsets in seconds from the start of the run: the first request at 0, then each one a
    drawn gap after the previous one."""
    gaps = arrival_gaps(max(n - 1, 0), request_rate, burstiness, seed)
    return np.concatenate([np.zeros(min(n, 1)), np.cumsum(gaps)])
