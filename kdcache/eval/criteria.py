"""Success criteria in YAML, checked against two runs' metrics (the schema is in docs/evaluation.md).

    criteria:
      - {metric: accuracy, min: 0.75}                        # run B (the default) must reach 0.75
      - {metric: relevance.precision, min: 0.45}
      - {metric: accuracy, max_drop_vs: A, points: 10}       # B at most 10 percentage points below A
      - {metric: speed.latency_mean_s, max_ratio_vs: A, ratio: 0.25}
      - {metric: per_class.GS3.recall, run: A, min: 0.5, name: "teacher sees GS3"}

A file may also be a bare list of entries. Every condition of every entry must hold.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdcache.errors import BadInputError

EPS = 1e-9  # comparisons forgive float rounding (0.72 / 0.8 is 0.8999999999999999)
KEYS = {"metric", "run", "name", "min", "max", "max_drop_vs", "points", "amount", "min_ratio_vs", "max_ratio_vs",
        "ratio"}


@dataclass
class Criterion:
    metric: str
    run: str = "B"
    name: str | None = None
    min: float | None = None
    max: float | None = None
    max_drop_vs: str | None = None
    points: float | None = None
    amount: float | None = None
    min_ratio_vs: str | None = None
    max_ratio_vs: str | None = None
    ratio: float | None = None


@dataclass
class CheckResult:
    criterion: Criterion
    description: str  # what was checked, with the numbers
    passed: bool
    value: float | None
    bound: float | None

    def line(self) -> str:
        label = f"{self.criterion.name}: " if self.criterion.name else ""
        return f"[{'PASS' if self.passed else 'FAIL'}] {label}{self.description}"


def _number(entry: dict, key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"{where}: '{key}' must be a number, got {value!r}")
    return float(value)


def parse_criteria(data: Any, source: str = "criteria") -> list[Criterion]:
    """Validate the YAML structure: a list of entries, or a mapping with a `criteria` list."""
    if isinstance(data, dict):
        unknown = set(data) - {"criteria"}
        if unknown:
            raise BadInputError(f"{source}: unknown top-level keys {sorted(unknown)}; put the entries under "
                                "'criteria:'")
        data = data.get("criteria")
    if not isinstance(data, list) or not data:
        raise BadInputError(f"{source}: expected a non-empty list of criteria (e.g. '- {{metric: accuracy, "
                            "min: 0.75}}')")
    result = []
    for index, entry in enumerate(data, start=1):
        where = f"{source}, criterion {index}"
        if not isinstance(entry, dict):
            raise BadInputError(f"{where}: must be a mapping like {{metric: accuracy, min: 0.75}}, got {entry!r}")
        unknown = set(entry) - KEYS
        if unknown:
            raise BadInputError(f"{where}: unknown keys {sorted(unknown)}; known keys: {', '.join(sorted(KEYS))}")
        if not isinstance(entry.get("metric"), str) or not entry["metric"]:
            raise BadInputError(f"{where}: 'metric' (a dotted path into metrics.json, e.g. relevance.precision) "
                                "is required")
        criterion = Criterion(
            metric=entry["metric"], run=str(entry.get("run", "B")), name=entry.get("name"),
            min=_number(entry, "min", where), max=_number(entry, "max", where),
            max_drop_vs=None if entry.get("max_drop_vs") is None else str(entry["max_drop_vs"]),
            points=_number(entry, "points", where), amount=_number(entry, "amount", where),
            min_ratio_vs=None if entry.get("min_ratio_vs") is None else str(entry["min_ratio_vs"]),
            max_ratio_vs=None if entry.get("max_ratio_vs") is None else str(entry["max_ratio_vs"]),
            ratio=_number(entry, "ratio", where),
        )
        relative = [k for k in ("max_drop_vs", "min_ratio_vs", "max_ratio_vs") if getattr(criterion, k) is not None]
        if len(relative) > 1:
            raise BadInputError(f"{where}: use one of {relative} per entry (write one entry for each)")
        if criterion.max_drop_vs is not None:
            if (criterion.points is None) == (criterion.amount is None):
                raise BadInputError(f"{where}: 'max_drop_vs' needs exactly one of 'points' (percentage points: 10 "
                                    "means 0.10 on a 0..1 metric) or 'amount' (in the metric's own units)")
        elif criterion.points is not None or criterion.amount is not None:
            raise BadInputError(f"{where}: 'points'/'amount' only go with 'max_drop_vs'")
        if criterion.min_ratio_vs is not None or criterion.max_ratio_vs is not None:
            if criterion.ratio is None:
                raise BadInputError(f"{where}: '{relative[0]}' needs 'ratio'")
        elif criterion.ratio is not None:
            raise BadInputError(f"{where}: 'ratio' only goes with 'min_ratio_vs' or 'max_ratio_vs'")
        if criterion.min is None and criterion.max is None and not relative:
            raise BadInputError(f"{where}: says nothing to check; give min, max, max_drop_vs, min_ratio_vs or "
                                "max_ratio_vs")
        result.append(criterion)
    return result


def load_criteria(path: str | Path) -> list[Criterion]:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"criteria file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise BadInputError(f"criteria file {path} is not valid YAML: {exc}") from None
    return parse_criteria(data, str(path))


def _leaf_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        paths = []
        for key, value in node.items():
            paths.extend(_leaf_paths(value, f"{prefix}{key}."))
        return paths
    return [prefix[:-1]] if prefix else []


def metric_value(metrics: dict, path: str) -> float | None:
    """The number at a dotted path of metrics.json (keys may themselves hold dots: the longest match wins)."""
    node: Any = metrics
    rest = path
    while rest:
        if not isinstance(node, dict):
            break
        match = next((key for key in sorted(node, key=lambda k: -len(str(k)))
                      if rest == str(key) or rest.startswith(f"{key}.")), None)
        if match is None:
            break
        node, rest = node[match], rest[len(str(match)) + 1:]
    else:
        if node is None:
            return None
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            raise BadInputError(f"metric '{path}' is not a number (it holds {type(node).__name__}); name a leaf, "
                                "e.g. relevance.precision")
        return float(node)
    numeric = [p for p in _leaf_paths(metrics) if not p.startswith(("run.", "confusion.", "calibration.bins"))]
    close = difflib.get_close_matches(path, numeric, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; metrics here include {', '.join(numeric[:12])}"
    raise BadInputError(f"metric '{path}' is not in metrics.json{hint}")


def check_criteria(criteria: list[Criterion], runs: dict[str, dict], names: dict[str, str] | None = None
                   ) -> list[CheckResult]:
    """Check each criterion; `runs` maps run keys ("A", "B" and any names) to metrics dicts.

    `names` maps a run key to its display name (e.g. {"A": "teacher", "B": "student"}).
    """
    names = names or {}

    def lookup(key: str, where: str) -> dict:
        if key not in runs:
            raise BadInputError(f"{where}: unknown run {key!r}; use one of {', '.join(runs)}")
        return runs[key]

    results = []
    for index, c in enumerate(criteria, start=1):
        where = f"criterion {index} ({c.metric})"
        metrics = lookup(c.run, where)
        value = metric_value(metrics, c.metric)
        who = f"{names.get(c.run, c.run)} {c.metric}"
        shown = "n/a" if value is None else f"{value:.4g}"

        def record(description: str, passed: bool, bound: float | None, c=c, value=value) -> None:
            if value is None:
                description += " (value not available: counts as failed)"
            results.append(CheckResult(c, description, passed and value is not None, value, bound))

        if c.min is not None:
            record(f"{who} = {shown} >= {c.min:.4g}", value is not None and value >= c.min - EPS, c.min)
        if c.max is not None:
            record(f"{who} = {shown} <= {c.max:.4g}", value is not None and value <= c.max + EPS, c.max)
        other_key = c.max_drop_vs or c.min_ratio_vs or c.max_ratio_vs
        if other_key is None:
            continue
        other = metric_value(lookup(other_key, where), c.metric)
        other_who = f"{names.get(other_key, other_key)} {c.metric}"
        if other is None:
            results.append(CheckResult(c, f"{who} vs {other_who}: {other_who} not available (counts as failed)",
                                       False, value, None))
            continue
        if c.max_drop_vs is not None:
            drop = c.points / 100 if c.points is not None else c.amount
            bound = other - drop
            unit = f"{c.points:g} points" if c.points is not None else f"{c.amount:g}"
            record(f"{who} = {shown} >= {other_who} {other:.4g} - {unit} = {bound:.4g}",
                   value is not None and value >= bound - EPS, bound)
        else:
            if other == 0 or (isinstance(other, float) and math.isnan(other)):
                results.append(CheckResult(c, f"{who} / {other_who}: {other_who} is 0, the ratio is undefined "
                                              "(counts as failed)", False, value, None))
                continue
            ratio = None if value is None else value / other
            op = ">=" if c.min_ratio_vs is not None else "<="
            holds = ratio is not None and (ratio >= c.ratio - EPS if op == ">=" else ratio <= c.ratio + EPS)
            ratio_shown = "n/a" if ratio is None else f"{ratio:.4g}"
            record(f"{who} / {other_who} = {shown} / {other:.4g} = {ratio_shown} {op} {c.ratio:g}", holds,
                   c.ratio)
    return results
