"""The benchmark's output: the text table, the JSON document and the PNG plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

from splitserve.bench.metrics import LATENCIES, PERCENTILES, RequestRecord, timeline

LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}
STATS = ["mean", "median"] + [f"p{p}" for p in PERCENTILES]

# (label, key, format) of the table's top part, shared by the single and the compare tables
HEADLINE = [
    ("duration (s)", "duration_s", "{:.2f}"),
    ("requests completed", "completed", "{:d}"),
    ("requests failed", "failed", "{:d}"),
    ("input tokens", "total_input_tokens", "{:d}"),
    ("output tokens", "total_output_tokens", "{:d}"),
    ("cached prompt tokens", "total_cached_tokens", "{:d}"),
    ("request throughput (req/s)", "request_throughput", "{:.3f}"),
    ("input throughput (tok/s)", "input_throughput", "{:.1f}"),
    ("output throughput (tok/s)", "output_throughput", "{:.1f}"),
    ("total throughput (tok/s)", "total_token_throughput", "{:.1f}"),
    ("goodput (req/s)", "request_goodput", "{:.3f}"),
    ("speculative draft tokens", "spec_decode_draft_tokens", "{:d}"),
    ("speculative accepted tokens", "spec_decode_accepted_tokens", "{:d}"),
    ("speculative acceptance rate", "spec_decode_acceptance_rate", "{:.3f}"),
]


def spec_decode_totals(urls: list[str]) -> tuple[int, int]:
    """(draft tokens, accepted tokens) summed over the workers' spec_decode counters now."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    drafted = accepted = 0.0
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                text = resp.read().decode()
        except OSError as exc:
            raise ValueError(f"--metrics-url {url}: {exc}") from None
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name == "splitserve_spec_decode_num_draft_tokens_total":
                    drafted += sample.value
                elif sample.name == "splitserve_spec_decode_num_accepted_tokens_total":
                    accepted += sample.value
    return int(drafted), int(accepted)


def spec_decode_delta(before: tuple[int, int], after: tuple[int, int]) -> dict:
    """The run's share of the counters: draft and accepted tokens, and the acceptance rate (None
    when nothing was proposed)."""
    drafted, accepted = after[0] - before[0], after[1] - before[1]
    return {"spec_decode_draft_tokens": drafted, "spec_decode_accepted_tokens": accepted,
            "spec_decode_acceptance_rate": accepted / drafted if drafted else None}


def _fmt(value, fmt: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(value)


def format_table(summary: dict, title: str = "splitserve bench") -> str:
    rows = [(label, _fmt(summary.get(key), fmt)) for label, key, fmt in HEADLINE
            if key in summary and not (key == "total_cached_tokens" and summary[key] is None)]
    if "goodput_slos_ms" in summary:
        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in summary["goodput_slos_ms"].items())
        at = next(i for i, (label, _) in enumerate(rows) if label == "goodput (req/s)")
        rows.insert(at, ("good requests (" + slos + ")", str(summary["good_requests"])))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'=' * 12} {title} {'=' * 12}"]
    lines += [f"{label:<{width}}{value:>12}" for label, value in rows]
    lines.append("")
    head = f"{'latency (ms)':<14}" + "".join(f"{s:>10}" for s in STATS)
    lines += [head, "-" * len(head)]
    for name in LATENCIES:
        lines.append(f"{LATENCY_NAMES[name]:<14}" + "".join(f"{_fmt(summary.get(f'{s}_{name}_ms')):>10}" for s in STATS))
    return "\n".join(lines)


def _ratio(value, base) -> str:
    if value is None or base is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def format_compare(summaries: dict[str, dict]) -> str:
    """One column per target, then each later target's ratio to the first (latencies: lower is better)."""
    names = list(summaries)
    first = names[0]
    rows = [(label, key, fmt) for label, key, fmt in HEADLINE
            if any(summaries[n].get(key) is not None for n in names)]
    rows += [(f"{s} {LATENCY_NAMES[m]} (ms)", f"{s}_{m}_ms", "{:.2f}") for m in LATENCIES for s in STATS]
    cols = names + [f"{n}/{first}" for n in names[1:]]
    width = max(len(label) for label, _, _ in rows) + 2
    colw = max(12, *(len(c) + 2 for c in cols))
    lines = [f"{'=' * 12} splitserve bench: compare {'=' * 12}",
             f"{'':<{width}}" + "".join(f"{c:>{colw}}" for c in cols)]
    for label, key, fmt in rows:
        values = [summaries[n].get(key) for n in names]
        cells = [_fmt(v, fmt) for v in values] + [_ratio(v, values[0]) for v in values[1:]]
        lines.append(f"{label:<{width}}" + "".join(f"{c:>{colw}}" for c in cells))
    return "\n".join(lines)


def ratios(summaries: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Each later target's numeric summary values divided by the first target's."""
    names = list(summaries)
    base = summaries[names[0]]
    out = {}
    for name in names[1:]:
        out[name] = {k: (v / base[k] if isinstance(v, (int, float)) and isinstance(base.get(k), (int, float))
                         and base[k] else None)
                     for k, v in summaries[name].items() if isinstance(v, (int, float)) or v is None}
    return out


def result_document(config: dict, summary: dict, records: list[RequestRecord], duration_s: float) -> dict:
    return {"config": config, "summary": summary, "timeline": timeline(records, duration_s),
            "requests": [r.to_json() for r in records]}


def write_json(path: str | Path, document: dict) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, allow_nan=False, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def plot(path: str | Path, runs: dict[str, tuple[list[RequestRecord], float]]) -> None:
    """A PNG: histograms of TTFT, TPOT, ITL and E2E latency (ms), output tokens/s and requests in
    flight over time; one colour per target in `runs` (name -> (records, duration))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    series: dict[str, dict[str, list[float]]] = {}
    for name, (records, _) in runs.items():
        ok = [r for r in records if r.success]
        series[name] = {
            "ttft": [r.ttft * 1000 for r in ok if r.ttft is not None],
            "tpot": [r.tpot * 1000 for r in ok if r.tpot is not None],
            "itl": [g * 1000 for r in ok for g in r.itl],
            "e2el": [r.e2el * 1000 for r in ok if r.e2el is not None],
        }
    for ax, metric in zip(axes.flat[:4], LATENCIES):
        values = [v for s in series.values() for v in s[metric]]
        if values:
            lo, hi = min(values), max(values)
            bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 40)
            for name, s in series.items():
                if s[metric]:
                    ax.hist(s[metric], bins=bins, histtype="step", linewidth=1.5, label=f"{name} (n={len(s[metric])})")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{LATENCY_NAMES[metric]} distribution")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
    ax_tp, ax_fl = axes.flat[4], axes.flat[5]
    for name, (records, duration) in runs.items():
        tl = timeline(records, duration)
        ax_tp.plot(tl["time_s"], tl["output_tokens_per_s"], drawstyle="steps-mid", label=name)
        ax_fl.plot(tl["time_s"], tl["in_flight"], drawstyle="steps-mid", label=name)
    ax_tp.set_title("output throughput over time")
    ax_tp.set_xlabel("s since start")
    ax_tp.set_ylabel("tokens/s")
    ax_fl.set_title("requests in flight")
    ax_fl.set_xlabel("s since start")
    ax_fl.set_ylabel("requests")
    for ax in (ax_tp, ax_fl):
        ax.legend(fontsize=8)
    fig.suptitle("splitserve bench: " + ", ".join(runs))
    fig.tight_layout()
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
