"""Builds deploy/grafana/splitserve.json, the Grafana dashboard of a splitserve deployment, with the
Grafana Foundation SDK (grafana-foundation-sdk, in the dev extra), so the JSON is generated, never
edited by hand:

    python deploy/grafana/dashboard.py           # rewrite splitserve.json
    python deploy/grafana/dashboard.py --check   # exit 1 when splitserve.json is not what this builds

The panels read the recording rules of deploy/prometheus/rules.yml (splitserve:*) where one exists,
else the raw series of libs/splitserve/metrics.py; tests/deploy/test_grafana.py checks every name
against both, and that the committed JSON is this script's output.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.builders.common import GraphThresholdsStyleConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import GraphTresholdsStyleMode  # the SDK's spelling
from grafana_foundation_sdk.models.dashboard import DataSourceRef, Threshold, ThresholdsMode

OUTPUT = Path(__file__).resolve().parent / "splitserve.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
WORKERS = 'role=~"prefill|decode|colocated"'


def _query(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def _thresholds(*steps: tuple[float, str]) -> dashboard.ThresholdsConfig:
    """Green below the first step; each (value, colour) from its value up."""
    return (dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=None, color="green")] + [Threshold(value=v, color=c) for v, c in steps]))


def graph(title: str, description: str, unit: str, *queries: tuple[str, str], width: int = 12,
          thresholds: tuple[tuple[float, str], ...] = (), max_value: float | None = None) -> timeseries.Panel:
    """A time series panel; thresholds, when given, are drawn as dashed lines (the SLO, the alert)."""
    panel = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
             .span(width).height(8).min(0))
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    if thresholds:
        panel = (panel.thresholds(_thresholds(*thresholds))
                 .thresholds_style(GraphThresholdsStyleConfig().mode(GraphTresholdsStyleMode.DASHED)))
    if max_value is not None:
        panel = panel.max(max_value)
    return panel


def health() -> stat.Panel:
    """Processes answering their scrape, per role: red at 0 (the SplitserveRoleWithoutHealthyProcess alert)."""
    return (stat.Panel().title("Healthy processes per role")
            .description("Scraped processes (Prometheus `up`) per role; 0: the role cannot serve.")
            .datasource(DATASOURCE).span(12).height(8)
            .with_target(_query("splitserve:healthy_processes:count", "{{role}}", "A"))
            .with_target(_query("splitserve_redis_up", "redis (gateway's PING)", "B"))
            .thresholds(dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
                        .steps([Threshold(value=None, color="red"), Threshold(value=1, color="green")])))


def _latency_row(d: dashboard.Dashboard) -> dashboard.Dashboard:
    return (d.with_row(dashboard.Row("Latency (SLO: TTFT p50 < 200 ms, p99 < 1 s)"))
            .with_panel(graph("Time to first token", "At the gateway: arrival to the first token sent.", "s",
                              ("splitserve:time_to_first_token_seconds:p50", "p50 {{model_name}}"),
                              ("splitserve:time_to_first_token_seconds:p99", "p99 {{model_name}}"),
                              thresholds=((0.2, "yellow"), (1.0, "red"))))
            .with_panel(graph("Inter-token latency", "At the gateway: the gap between consecutive tokens.", "s",
                              ("splitserve:inter_token_latency_seconds:p50", "p50 {{model_name}}"),
                              ("splitserve:inter_token_latency_seconds:p99", "p99 {{model_name}}"))))


def _throughput_row(d: dashboard.Dashboard) -> dashboard.Dashboard:
    most = ('splitserve:max_generation_tokens_per_second:config'
            ' * scalar(count(splitserve_batch_size{role=~"decode|colocated"}))')
    return (d.with_row(dashboard.Row("Throughput and batching"))
            .with_panel(graph("Token throughput", "Tokens per second where they are computed, against what the "
                              "decode workers can give (rules.yml: max_generation_tokens_per_second).", "short",
                              ("splitserve:generation_tokens:rate1m", "generated {{model_name}}"),
                              ("splitserve:prompt_tokens:rate1m", "prompt {{model_name}}"),
                              (most, "max (decode workers x configured max)")))
            .with_panel(graph("Batch utilisation", "Sequences per engine step against --max-num-seqs.",
                              "percentunit", ("splitserve:batch_utilisation:ratio", "{{role}}"),
                              ("splitserve:generation_tokens:capacity_ratio", "throughput / max {{model_name}}"),
                              max_value=1))
            .with_panel(graph("Queue depth", "Requests waiting: at the gateway (not yet routed) and in each "
                              "engine; running for comparison.", "short",
                              ("splitserve:num_requests_waiting:sum", "waiting {{role}}"),
                              ("sum by (role) (splitserve_num_requests_running)", "running {{role}}")))
            .with_panel(graph("Rejections", "Share of the gateway's requests rejected, and rejections per "
                              "second by reason.", "percentunit",
                              ("splitserve:requests_rejected:ratio_rate5m", "share {{model_name}}"),
                              ("splitserve:requests_rejected:rate5m", "{{reason}} /s"),
                              thresholds=((0.05, "red"),))))


def _kv_row(d: dashboard.Dashboard) -> dashboard.Dashboard:
    p99 = ("histogram_quantile(0.99, sum by (role, direction, le) "
           "(rate(splitserve_kv_transfer_seconds_bucket[5m])))")
    return (d.with_row(dashboard.Row("KV cache and transfers"))
            .with_panel(graph("KV-cache usage", "The fullest worker of each role, and the kvstore's share of "
                              "its capacity.", "percentunit", ("splitserve:kv_cache_usage:max", "{{role}}"),
                              thresholds=((0.85, "red"),), max_value=1))
            .with_panel(graph("Prefix-cache hit rate", "Prompt tokens found in the prefix cache.", "percentunit",
                              ("splitserve:prefix_cache_hit_ratio:rate5m", "{{role}}"), max_value=1))
            .with_panel(graph("KV transfers", "Bytes per second between workers and the kvstore (put: towards "
                              "it, get: from it), and failed transfers.", "Bps",
                              ("splitserve:kv_transfer_bytes:rate1m", "{{role}} {{direction}}"),
                              ("splitserve:kv_transfer_failures:rate5m", "failures/s {{role}} {{direction}}")))
            .with_panel(graph("KV transfer time p99", "One put or get call.", "s", (p99, "{{role}} {{direction}}"))))


def _health_row(d: dashboard.Dashboard) -> dashboard.Dashboard:
    return (d.with_row(dashboard.Row("Health"))
            .with_panel(health())
            .with_panel(graph("Preemptions", "Sequences preempted for lack of KV blocks (recomputed later).",
                              "short", (f"sum by (role) (rate(splitserve_num_preemptions_total{{{WORKERS}}}[5m]))",
                                        "{{role}}"))))


def build() -> dashboard.Dashboard:
    d = (dashboard.Dashboard("splitserve").uid("splitserve").tags(["splitserve", "llm"])
         .description("Disaggregated LLM serving: gateway, prefill and decode workers, kvstore.")
         .refresh("30s").time("now-1h", "now").timezone("browser")
         .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    for row in (_latency_row, _throughput_row, _kv_row, _health_row):
        d = row(d)
    return d


def render() -> str:
    return json.dumps(build().build(), cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is not what {Path(__file__).name} builds: run it without --check", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
