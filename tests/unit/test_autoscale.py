"""The autoscaler's decisions (launch/autoscale.py RolePlanner) on synthetic signal series: up over a
high threshold, hysteresis between the thresholds, down only after a whole stabilisation window of
idleness, the cooldown between decisions, the min/max bounds; the histogram quantiles its latency
signals come from; and its config's checks and flags."""
from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys

import pytest

from splitserve.config.autoscale import AutoscaleConfig
from splitserve.config.flags import from_flat
from splitserve.config.launch import UpConfig, fixed_metrics_ports
from splitserve.config.worker import WorkerConfig
from splitserve.launch.autoscale import Autoscaler, Decision, HistogramWindow, RolePlanner, Signals, quantile

INF = float("inf")
CFG = AutoscaleConfig(decode_min_workers=1, decode_max_workers=3, prefill_min_workers=1, prefill_max_workers=2,
                      stabilization_s=10.0, cooldown_s=4.0)


def run(planner: RolePlanner, series: list[tuple[float, Signals]], workers: int) -> list[tuple[float, str, int]]:
    """Feeds the series (time, signals) in order, applying each up/down to the worker count;
    returns (time, action, workers before) of every decision."""
    out = []
    for now, signals in series:
        d = planner.decide(now, signals, workers)
        if d is not None:
            out.append((now, d.action, d.workers))
            workers += {"up": 1, "down": -1}.get(d.action, 0)
    return out


def every(seconds: range, signals: Signals) -> list[tuple[float, Signals]]:
    return [(float(t), signals) for t in seconds]


BUSY = Signals(kv_usage=0.9, itl_p50_s=0.01)  # over decode_kv_usage_high (0.85)
MIDDLE = Signals(kv_usage=0.7, itl_p50_s=0.01)  # between 0.5 and 0.85: hold
IDLE = Signals(kv_usage=0.1, itl_p50_s=0.01)


def test_decode_scales_up_on_kv_usage_or_itl_and_the_cooldown_spaces_decisions():
    planner = RolePlanner("decode", CFG)
    # busy for 20 s, one signal a second: up at 0 and after each 4 s cooldown, until the max (3)
    got = run(planner, every(range(20), BUSY), workers=1)
    assert got == [(0.0, "up", 1), (4.0, "up", 2), (8.0, "at_max", 3)]
    slow = RolePlanner("decode", CFG).decide(0.0, Signals(kv_usage=0.2, itl_p50_s=0.5), 1)
    assert slow.action == "up" and slow.reason == "itl_p50_s"
    assert "kv_usage=0.2 (up>0.85 idle<0.5)" in slow.signals and "itl_p50_s=0.5 (up>0.1 idle<0.05)" in slow.signals


def test_at_max_is_logged_once_per_overload_and_never_starts_a_worker():
    planner = RolePlanner("decode", CFG)
    series = every(range(6), BUSY) + every(range(6, 8), MIDDLE) + every(range(8, 10), BUSY)
    assert run(planner, series, workers=3) == [(0.0, "at_max", 3), (8.0, "at_max", 3)]


def test_scale_down_needs_a_whole_window_of_idleness_and_hysteresis_holds_in_between():
    planner = RolePlanner("decode", CFG)
    # idle 0..7, a blip into the band between the thresholds at 8 (no up: under the high one), idle again
    series = every(range(8), IDLE) + [(8.0, MIDDLE)] + every(range(9, 40), IDLE)
    # 9 + 10 s; then a new window from the next reading (the new pool's), and never below the minimum
    assert run(planner, series, workers=3) == [(19.0, "down", 3), (30.0, "down", 2)]
    # at the minimum: idle forever, no decision
    assert run(RolePlanner("decode", CFG), every(range(60), IDLE), workers=1) == []
    # never measured (no worker answered, no latency in the window) counts as idle, never as load
    assert run(RolePlanner("decode", CFG), every(range(12), Signals()), workers=2) == [(10.0, "down", 2)]


def test_a_decision_waits_while_a_worker_starts_or_drains_and_for_the_cooldown_after_an_up():
    planner = RolePlanner("decode", CFG)
    assert planner.decide(0.0, BUSY, 1).action == "up"
    assert planner.decide(5.0, BUSY, 2, changing=True) is None  # the new worker still loads
    assert planner.decide(6.0, BUSY, 2).action == "up"
    # load gone: a window from when idleness began
    got = run(planner, every(range(7, 30), IDLE), workers=3)
    assert got == [(17.0, "down", 3), (28.0, "down", 2)]
    # a cooldown longer than the window spaces the drains instead
    slow = RolePlanner("decode", AutoscaleConfig(stabilization_s=2.0, cooldown_s=8.0))
    assert run(slow, every(range(20), IDLE), workers=3) == [(2.0, "down", 3), (10.0, "down", 2)]


def test_prefill_scales_on_queue_depth_and_ttft_p50_or_p99():
    cases = [(Signals(queue_depth=5.0), "queue_depth"), (Signals(queue_depth=1.0, ttft_p50_s=0.3), "ttft_p50_s"),
             (Signals(queue_depth=0.0, ttft_p50_s=0.05, ttft_p99_s=1.5), "ttft_p99_s")]
    for signals, why in cases:
        d = RolePlanner("prefill", CFG).decide(0.0, signals, 1)
        assert (d.action, d.reason) == ("up", why)
    # idle needs every signal under its low threshold: queue < 0.5, p50 < 0.1 s, p99 < 0.5 s
    planner = RolePlanner("prefill", CFG)
    almost = Signals(queue_depth=0.0, ttft_p50_s=0.05, ttft_p99_s=0.6)  # p99 in the band: hold
    assert run(planner, every(range(30), almost), workers=2) == []
    idle = Signals(queue_depth=0.0, ttft_p50_s=0.05, ttft_p99_s=0.2)
    assert run(planner, every(range(30, 45), idle), workers=2) == [(40.0, "down", 2)]
    # colocated workers answer to both roles' signals, with the prefill bounds
    both = RolePlanner("colocated", CFG)
    assert both.decide(0.0, Signals(kv_usage=0.95, queue_depth=0.0), 1).action == "up"
    assert (both.min_workers, both.max_workers) == (1, 2)


def test_quantiles_from_cumulative_buckets():
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.5, 100.0), (INF, 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.15)  # halfway through (0.1, 0.2]
    assert quantile(0.99, buckets) == pytest.approx(0.47)
    assert quantile(0.99, [(0.1, 1.0), (INF, 10.0)]) == 0.1  # in +Inf: the highest finite bound
    assert quantile(0.5, [(0.1, 0.0), (INF, 0.0)]) is None and quantile(0.5, []) is None


def test_histogram_window_differences_each_endpoint_over_the_window():
    window = HistogramWindow(window_s=10.0)
    a, b = "http://a/metrics", "http://b/metrics"
    window.add(0.0, {a: {0.1: 100.0, 1.0: 100.0, INF: 100.0}})  # 100 fast observations before the window
    assert window.quantile(0.5) is None  # one snapshot: no observations known in the window
    window.add(5.0, {a: {0.1: 100.0, 1.0: 110.0, INF: 110.0}})
    assert window.quantile(0.5) == pytest.approx(0.55)  # the 10 new ones, all in (0.1, 1]
    window.add(6.0, {a: {0.1: 100.0, 1.0: 110.0, INF: 110.0}, b: {0.1: 5.0, 1.0: 5.0, INF: 5.0}})  # b joins
    window.add(7.0, {a: {0.1: 100.0, 1.0: 110.0, INF: 110.0}, b: {0.1: 35.0, 1.0: 35.0, INF: 35.0}})
    assert window.quantile(0.5) == pytest.approx(0.1 * 20 / 30)  # b's 30 fast ones outweigh a's 10 slow ones
    window.add(20.0, {a: {0.1: 100.0, 1.0: 110.0, INF: 110.0}})  # b drained; a had nothing new for 10 s
    window.add(21.0, {a: {0.1: 100.0, 1.0: 110.0, INF: 110.0}})
    assert window.quantile(0.5) is None
    window.add(22.0, {a: {0.1: 3.0, 1.0: 3.0, INF: 3.0}})  # a restarted: its counts start again from zero
    assert window.quantile(0.5) == pytest.approx(0.05)


def test_config_checks_name_the_flag_and_up_keeps_the_start_within_bounds():
    for bad, words in (({"decode_min_workers": 3, "decode_max_workers": 2}, "autoscale_decode_min_workers (3)"),
                       ({"prefill_min_workers": 0}, "autoscale_prefill_min_workers (0) must be >= 1"),
                       ({"decode_kv_usage_low": 0.9}, "autoscale_decode_kv_usage_low (0.9) must be >= 0 and below"),
                       ({"latency_low_fraction": 0.0}, "autoscale_latency_low_fraction"),
                       ({"interval_s": 0.0}, "autoscale_interval_s must be a finite number > 0")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            AutoscaleConfig(**bad)
    with pytest.raises(ValueError, match=r"--autoscale: 5 decode workers to start, outside"):
        from_flat(UpConfig, {"autoscale": True, "decode_workers": 5})
    from_flat(UpConfig, {"autoscale": False, "decode_workers": 5})  # bounds apply only with --autoscale
    with pytest.raises(ValueError, match="at most 10 workers per role: --autoscale-\\*-max-workers is 11"):
        from_flat(UpConfig, {"autoscale": True, "metrics_port": 30000, "autoscale_decode_max_workers": 11})


def test_flags_and_fixed_ports_cover_every_worker_the_autoscaler_may_start():
    from splitserve.launch.cli import build_parser

    args = build_parser().parse_args(["up", "--autoscale", "--autoscale-decode-max-workers", "2",
                                      "--autoscale-stabilization-s", "5", "--metrics-port", "30000"])
    up = from_flat(UpConfig, {k: v for k, v in vars(args).items() if k in {"autoscale", "metrics_port"}})
    assert up.autoscale
    assert args.autoscale_decode_max_workers == 2 and args.autoscale_stabilization_s == 5.0
    ports = fixed_metrics_ports(args)
    assert {n: p for n, (_, p) in ports.items()} == {
        "kvstore": 30000, "prefill-0": 30010, "prefill-1": 30011, "prefill-2": 30012, "prefill-3": 30013,
        "decode-0": 30020, "decode-1": 30021, "autoscaler": 30030}
    assert fixed_metrics_ports(argparse.Namespace(**{**vars(args), "autoscale": False})).keys() == \
        {"kvstore", "prefill-0", "decode-0"}


# ------------------------------------------------------------------------------ the launcher's side
def _launcher(*flags: str):
    from splitserve.launch.up import Launcher, add_up_args

    p = argparse.ArgumentParser()
    add_up_args(p)
    return Launcher(p.parse_args(["--redis-url", "redis://127.0.0.1:1/0", *flags]))


def _child(name: str, code: str):
    from splitserve.launch.up import Child

    child = Child(name, [], "127.0.0.1:1", config=WorkerConfig(), restartable=True)
    child.proc = subprocess.Popen([sys.executable, "-c", code])
    return child


def test_a_worker_the_autoscaler_drains_is_removed_not_restarted():
    launcher = _launcher("--autoscale")
    for code in (0, 1):  # its drain's exit 0, or a crash while draining: either way it is gone
        child = _child("decode-1", f"raise SystemExit({code})")
        child.extra["retiring"] = True
        child.proc.wait()
        launcher.children.append(child)
        assert launcher._watch(child) and child not in launcher.children and child.restart_at_s is None


def test_up_starts_the_lowest_free_index_and_down_drains_the_newest_worker(monkeypatch):
    launcher = _launcher("--autoscale", "--autoscale-decode-max-workers", "3")

    def start_worker(role: str, index: int):  # a process standing in for a worker's model load
        launcher.children.append(_child(f"{role}-{index}", "import time; time.sleep(60)"))
        return launcher.children[-1]

    monkeypatch.setattr(launcher, "start_worker", start_worker)
    scaler = Autoscaler(launcher, launcher.up.autoscaling)
    try:
        for i in (0, 2):
            start_worker("decode", i).extra["ready"] = True
        scaler.apply(Decision("decode", "up", 2, "itl_p50_s", "itl_p50_s=0.2 (up>0.1 idle<0.05)"))
        assert [c.name for c in launcher.children] == ["decode-0", "decode-2", "decode-1"]
        assert launcher.children[-1].extra["ready"] is False  # starting: the role decides nothing meanwhile
        assert [c.name for c in scaler.workers("decode")] == ["decode-0", "decode-2", "decode-1"]
        launcher.children[-1].extra["ready"] = True
        scaler.apply(Decision("decode", "down", 3, "idle for 300s", "itl_p50_s=none (up>0.1 idle<0.05)"))
        newest = launcher.children[1]
        assert newest.name == "decode-2" and newest.extra["retiring"]
        assert newest.proc.wait(10) == -signal.SIGTERM  # the graceful drain's signal
        assert [c.name for c in scaler.workers("decode")] == ["decode-0", "decode-1"]
        text = scaler.metrics.render().decode()
        for action in ("up", "down"):
            assert re.search(rf'splitserve_autoscaler_decisions_total\{{action="{action}",role="decode"\}} 1\.0', text)
    finally:
        for c in launcher.children:
            c.proc.kill()
            c.proc.wait()
