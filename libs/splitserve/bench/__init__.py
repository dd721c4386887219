"""`splitserve bench`: a serving benchmark client for any OpenAI-compatible completions API.

Pure parts (no I/O, unit-tested): `arrivals` (when requests are sent), `datasets` (what they ask
for), `metrics` (the arithmetic over a recorded run, goodput). `runner` sends the requests (asyncio,
httpx); `report` prints the table and writes the JSON and the PNG; `cli` is the command (it imports
the rest only when the command runs, so `splitserve --help` stays quick).
"""
from __future__ import annotations

_EXPORTS = {
    "arrival_gaps": "arrivals", "arrival_times": "arrivals", "BenchRequest": "datasets",
    "RequestRecord": "metrics", "parse_goodput": "metrics", "summarize": "metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"splitserve.bench.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'splitserve.bench' has no attribute {name!r}")
