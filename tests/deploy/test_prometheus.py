"""deploy/prometheus/rules.yml: promtool's checks and unit tests (tests/deploy/promtool/), its
series against what the code exports, and a real Prometheus that scrapes a running `splitserve up`
through the config `up --prometheus-config` wrote, with the rules loaded, until every recording
rule has series and no rule fails to evaluate.

promtool and prometheus come from the Debian package `prometheus` (.ci/run installs it); a test
that needs one is skipped, saying so, only where it is not installed.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from services_fixture import wait_for
from deploy_support import DEPLOY, RULES_FILE, exported_series, metric_names, recorded_series

yaml = pytest.importorskip("yaml")

PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool" / "rules_test.yml"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"`{name}` is not installed (Debian package prometheus; .ci/run installs it)")
    return path


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"] for rule in group["rules"]]


def test_metric_names_reads_selectors_not_functions_or_labels():
    expr = ('histogram_quantile(0.99, sum by (model_name, le) (rate(splitserve_a_bucket{role="x",le!="y"}[1m]))) '
            '/ on () group_left () scalar(splitserve:b:config) or up offset 5m > 0.85')
    assert metric_names(expr) == {"splitserve_a_bucket", "splitserve:b:config", "up"}


def test_rules_read_only_series_the_code_exports():
    """A renamed metric would leave a rule that silently never matches: every name a rule reads is
    exported by splitserve.metrics, recorded by another rule, or Prometheus' own `up`."""
    known = exported_series() | recorded_series() | {"up"}
    for rule in _rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('record') or rule.get('alert')} reads series nothing exports: {unknown}"


def test_capacity_constants_are_the_config_defaults():
    """The batch-utilisation denominator is the workers' --max-num-seqs default (their config class)."""
    from splitserve.config.flags import flat_fields
    from splitserve.config.worker import WorkerConfig

    max_num_seqs = next(ff.default for ff in flat_fields(WorkerConfig) if ff.name == "max_num_seqs")
    consts = {rule["record"]: rule["expr"] for rule in _rules() if rule.get("record", "").endswith(":config")}
    assert consts["splitserve:max_num_seqs:config"] == f"vector({max_num_seqs})"


def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    promtool = _binary("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in check.stdout
    unit = subprocess.run([promtool, "test", "rules", str(PROMTOOL_TESTS)], capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_up_writes_the_scrape_config_of_its_processes_and_the_rules(http_stack):
    """`up --prometheus-config PATH` (the session stack is started with it): one target per /metrics
    URL `up` printed, each labelled with its process, and the repository's rules."""
    config = yaml.safe_load(Path(http_stack.prometheus_config).read_text())
    assert config["rule_files"] == [str(RULES_FILE)]
    targets = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                targets[static["labels"]["process"]] = f"{job.get('scheme', 'http')}://{target}/metrics"
    assert targets == http_stack.metrics
    assert set(targets) == {"gateway", "kvstore", "prefill-0", "decode-0"}
    promtool = _binary("promtool")  # the file as Prometheus reads it, the rules it names included
    check = subprocess.run([promtool, "check", "config", str(http_stack.prometheus_config)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_config_needs_a_folder_to_write_in(tmp_path):
    from splitserve.config.launch import UpConfig, prometheus_config

    with pytest.raises(ValueError, match="--prometheus-config: no folder .*missing"):
        UpConfig(prometheus_config=str(tmp_path / "missing" / "prometheus.yml"))
    assert UpConfig(prometheus_config=str(tmp_path / "prometheus.yml")).prometheus_config
    text = prometheus_config({"gateway": "https://[::1]:8000/metrics"}, rules_file=tmp_path / "none.yml")
    config = yaml.safe_load(text)
    assert "rule_files" not in config, "an installed package has no rules file to name"
    assert config["scrape_configs"] == [{"job_name": "splitserve-gateway", "scheme": "https", "static_configs": [
        {"targets": ["[::1]:8000"], "labels": {"process": "gateway"}}]}]


def _get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _query(base: str, expr: str) -> dict[str, float]:
    """Instant query: label set (as text) -> value."""
    result = _get(base, "/api/v1/query", query=expr)["data"]["result"]
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in result}


def _consumer_queries() -> list[str]:
    """The PromQL of the Grafana dashboard's panels and of the KEDA triggers (deploy/)."""
    dashboard = json.loads((DEPLOY / "grafana" / "splitserve.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets") or ()]
    for path in (DEPLOY / "k8s" / "base").glob("*.yaml"):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and obj.get("kind") == "ScaledObject":
                exprs += [t["metadata"]["query"] for t in obj["spec"]["triggers"]]
    assert len(exprs) > 20, exprs
    return exprs


def _reject(http_base: str) -> None:
    """A completion for a model the gateway does not serve: 404, counted as rejected (unknown_model)."""
    body = json.dumps({"model": "no-such-model", "prompt": "x", "max_tokens": 1}).encode()
    request = urllib.request.Request(f"{http_base}/completions", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 404


def _start_prometheus(config_text: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    from splitserve.launch.up import free_port

    config = yaml.safe_load(config_text)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}  # seconds, not minutes, of test
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(tmp_path / "prometheus.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([_binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def test_a_real_prometheus_scrapes_the_stack_and_evaluates_every_rule(http_stack, tmp_path):
    from splitserve.client import generate

    _binary("prometheus")
    proc, base = _start_prometheus(Path(http_stack.prometheus_config).read_text(), tmp_path)
    try:
        def all_up():
            try:
                targets = _get(base, "/api/v1/targets")["data"]["activeTargets"]
            except OSError:
                return False
            return len(targets) == 4 and all(t["health"] == "up" for t in targets)

        wait_for(all_up, 30.0, "Prometheus to scrape all 4 processes", 0.5)  # a scrape before the requests: rates see them
        for prompt in ("The capital of France is", "One, two, three,"):
            # the second request after a scrape that saw the first: the TTFT histogram's rate is > 0
            generate(http_stack.gateway, prompt=prompt, sampling={"max_tokens": 4, "temperature": 0.0})
            _reject(http_stack.http_base)  # the rejection series appear at the first rejection
            time.sleep(1.2)
        records = [rule["record"] for rule in _rules() if "record" in rule]
        empty: list[str] = []

        def evaluated():
            empty[:] = [name for name in records if not _query(base, name)]
            return not empty and _query(base, "splitserve:generation_tokens:rate1m > 0")

        try:
            wait_for(evaluated, 30.0, "every recording rule to have a series", 0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still empty: {empty}") from None

        def ttft_p50():
            """The p50, once a number: a rate over [1m] with no observation in the window is NaN (a
            loaded machine can take longer than that between the requests above and this query),
            so each look that finds none sends one more request."""
            values = _query(base, "splitserve:time_to_first_token_seconds:p50")
            if values and all(math.isfinite(v) for v in values.values()):
                return values
            generate(http_stack.gateway, prompt="The capital of France is", sampling={"max_tokens": 2})
            return None

        ttft = wait_for(ttft_p50, 30.0, "the TTFT p50 rule to give a number", 0.5)
        assert len(ttft) == 1 and 0 < next(iter(ttft.values())) < 60, ttft
        healthy = {json.loads(k)["role"]: v for k, v in _query(base, "splitserve:healthy_processes:count").items()}
        assert healthy == {"gateway": 1, "kvstore": 1, "prefill": 1, "decode": 1}
        usage = _query(base, 'splitserve:kv_cache_usage:max{role="decode"}')
        assert len(usage) == 1 and 0 <= next(iter(usage.values())) <= 1
        def rejected_ratio():
            """The ratio, once a number: the rule's first evaluations can come before a scrape saw
            the requests above change the counters (a rate of one sample), and record 0 / 0. Both
            rates stay above 0 for the 5m window after that: a later evaluation gives the number."""
            values = _query(base, "splitserve:requests_rejected:ratio_rate5m")
            return values if values and all(math.isfinite(v) for v in values.values()) else None

        rejected = wait_for(rejected_ratio, 30.0, "the rejection ratio rule to give a number", 0.5)
        assert all(0 <= v <= 1 for v in rejected.values()), rejected
        groups = _get(base, "/api/v1/rules")["data"]["groups"]
        bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
        assert not bad, f"rules that fail to evaluate: {bad}"
        assert sum(len(g["rules"]) for g in groups) == len(_rules())
        firing = [a["labels"]["alertname"] for a in _get(base, "/api/v1/alerts")["data"]["alerts"]
                  if a["labels"]["alertname"] == "SplitserveRoleWithoutHealthyProcess"]
        assert not firing, firing
        for expr in _consumer_queries():  # the dashboard's and the autoscalers' queries parse and evaluate
            assert _get(base, "/api/v1/query", query=expr)["status"] == "success", expr
    finally:
        proc.terminate()
        proc.wait(10)
