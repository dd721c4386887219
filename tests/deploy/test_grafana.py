"""deploy/grafana/: the committed dashboard is what deploy/grafana/dashboard.py builds with the
Grafana Foundation SDK, it has the seed's panels, and every series its queries read is exported by
the code (splitserve.metrics) or recorded by deploy/prometheus/rules.yml."""
from __future__ import annotations

import importlib.util
import json

import pytest
from deploy_support import DEPLOY, exported_series, metric_names, recorded_series

pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk (the dev extra) is not installed")

SCRIPT = DEPLOY / "grafana" / "dashboard.py"
SEED_PANELS = {"Time to first token", "Inter-token latency", "Token throughput", "KV-cache usage",
               "Prefix-cache hit rate", "Batch utilisation", "Rejections", "Queue depth", "KV transfers",
               "Healthy processes per role"}


def _script():
    spec = importlib.util.spec_from_file_location("grafana_dashboard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _panels() -> list[dict]:
    return [p for p in json.loads((DEPLOY / "grafana" / "splitserve.json").read_text())["panels"] if p["type"] != "row"]


def test_the_committed_json_is_what_the_script_builds():
    script = _script()
    assert script.OUTPUT.read_text() == script.render(), "run `python deploy/grafana/dashboard.py` and commit"
    assert script.main(["--check"]) == 0


def test_the_dashboard_has_the_seed_panels_on_the_datasource_variable():
    panels = _panels()
    assert SEED_PANELS <= {p["title"] for p in panels}
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    ttft = next(p for p in panels if p["title"] == "Time to first token")
    steps = [s["value"] for s in ttft["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, 0.2, 1.0], "the SLO lines: p50 < 200 ms, p99 < 1 s"


def test_every_query_reads_series_that_exist():
    known = exported_series() | recorded_series() | {"up"}
    for panel in _panels():
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: no series in {target['expr']!r}"
            assert names <= known, f"{panel['title']}: {sorted(names - known)} exported and recorded by nothing"
