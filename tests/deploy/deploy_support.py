"""What the deploy tests share: the repository's deploy/ folder, the series the roles export (read
from splitserve.metrics itself, not from a list kept by hand) and the metric names a PromQL
expression reads."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES_FILE = DEPLOY / "prometheus" / "rules.yml"

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# words of PromQL that look like metric names: functions are followed by "(" and left out anyway
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
             "bool", "inf", "nan", "le"}


def exported_series() -> set[str]:
    """Every series name a splitserve process can export (all roles build the same Metrics)."""
    from splitserve.metrics import Metrics

    names = set()
    for family in Metrics("decode").registry.collect():
        for suffix in _SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def recorded_series() -> set[str]:
    yaml = pytest.importorskip("yaml")
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers,
    range and offset durations, label lists (by/on/... (...)) and function calls are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    words = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text)
    return {w for w in words if w.lower() not in _KEYWORDS and not re.fullmatch(r"\d+\w*", w)}

