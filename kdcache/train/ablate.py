"""`kdcache ablate`: many training runs from one cache (a grid, or an Optuna search: kdcache/train/search.py), one
table of final metrics.

A grid file holds the settings shared by every run under `base` and the values to vary under `grid`, by config
key (see jobs/ablation-*.yaml). Each run gets its own folder; re-running the command skips finished runs and
resumes unfinished ones, since each run is an ordinary resumable `train`.

With an `eval:` section (EvalConfig keys, plus `metric`), each run's final model is also evaluated by `kdcache
eval` on that labelled split, with the prompt settings of the cache (as `eval --from-cache`), and the runs are
ranked by that task metric (higher is better; held-out KL breaks ties and is reported beside it). Without it they
are ranked by held-out forward KL to the teacher (lower is better).
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdcache.config import LOSS_WEIGHT_NAMES, TrainConfig, apply_override, from_dict
from kdcache.errors import BadInputError, KdcacheError
from kdcache.train.trainer import train

COLUMNS = ["heldout_forward_kl", "heldout_kd", "heldout_top1_agreement", "final_train_loss", "steps"]


@dataclass
class GridSpec:
    base: dict
    grid: dict[str, list]
    eval: dict | None = None  # EvalConfig keys for the task metric, without `metric`
    metric: str | None = None  # a metrics.json key (dotted for nested ones: relevance.f1), higher is better


def _read_eval_section(section, path: str) -> tuple[dict | None, str | None]:
    if section is None:
        return None, None
    if not isinstance(section, dict) or not section.get("data"):
        raise BadInputError(f"`eval:` in {path} must be a mapping with at least `data` (a labelled split) and "
                            "`labels`, e.g. eval: {data: [dev.jsonl], labels: [GS1, GS2], metric: accuracy}")
    section = dict(section)
    metric = section.pop("metric", "accuracy")
    if not isinstance(metric, str) or not metric:
        raise BadInputError(f"`eval.metric` in {path} must be a metrics.json key such as accuracy or macro_f1, "
                            f"got {metric!r}")
    return section, metric


def read_grid(path: str, allow_ranges: bool = False) -> GridSpec:
    """The grid file; `allow_ranges` (the Optuna search) also takes `{low, high, log}` mappings as values."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BadInputError(f"cannot read the grid file {path}: {exc}") from None
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise BadInputError(f"{path} has no `grid:` mapping of config keys to lists of values")
    for key, values in grid.items():
        if allow_ranges and isinstance(values, dict):
            continue  # a float range, checked by kdcache.train.search
        if not isinstance(values, list) or not values:
            raise BadInputError(f"grid key '{key}' in {path} must map to a non-empty list of values"
                                + ("" if allow_ranges else " (ranges {low, high} are for --search optuna)"))
    section, metric = _read_eval_section(data.get("eval"), path)
    return GridSpec(base=data.get("base") or {}, grid=grid, eval=section, metric=metric)


def _slug(assignment: dict) -> str:
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in assignment.items())


def run_config(spec_base: dict, cache: str, out: Path, name: str, assignment: dict,
               overrides: tuple[str, ...]) -> TrainConfig:
    data = json.loads(json.dumps(spec_base))
    for key, value in assignment.items():
        if key.startswith("loss.") and key[5:] in LOSS_WEIGHT_NAMES:  # the grid's CE/KD weight replaces the base's
            for weight in LOSS_WEIGHT_NAMES:
                data.get("loss", {}).pop(weight, None)
        apply_override(data, f"{key}={json.dumps(value)}")
    for item in overrides:
        apply_override(data, item)
    data.update({"cache": cache, "out": str(out / name)})
    return from_dict(TrainConfig, data)


def final_metrics(result_out: str, result) -> dict:
    lines = [json.loads(line) for line in (Path(result_out) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    last_eval = result.evals[-1] if result.evals else {}
    return {"heldout_forward_kl": last_eval.get("heldout_forward_kl"), "heldout_kd": last_eval.get("heldout_kd"),
            "heldout_top1_agreement": last_eval.get("heldout_top1_agreement"),
            "final_train_loss": losses[-1] if losses else None, "steps": result.step}


def metric_column(metric: str) -> str:
    """The table column of a task metric: `eval_accuracy`, `eval_relevance.f1`."""
    return f"eval_{metric}"


def eval_config(spec: GridSpec, cache: str, run_out: str):
    """The EvalConfig of one run's final model: the cache's prompt settings, then the grid file's `eval:` keys."""
    from kdcache.config import EvalConfig
    from kdcache.eval.from_cache import eval_settings_from_cache

    data = {**eval_settings_from_cache(cache), **json.loads(json.dumps(spec.eval)),
            "model": str(Path(run_out) / "final"), "out": str(Path(run_out) / "eval")}
    data.setdefault("progress", False)
    data.setdefault("plots", False)
    return from_dict(EvalConfig, data, "eval")


def task_metric(spec: GridSpec, cache: str, run_out: str) -> float:
    """Evaluate a finished run's final model on the grid's labelled split (once: a re-run reads its metrics.json)
    and return `spec.metric`."""
    from kdcache.eval.runner import run_eval

    config = eval_config(spec, cache, run_out)
    saved = Path(config.out) / "metrics.json"
    final_written = max((f.stat().st_mtime for f in Path(config.model).iterdir()), default=float("inf"))
    if saved.exists() and saved.stat().st_mtime >= final_written:  # this final model was evaluated already
        metrics = json.loads(saved.read_text())
    else:
        metrics = run_eval(config).metrics
    value: object = metrics
    for part in spec.metric.split("."):
        if not isinstance(value, dict) or part not in value:
            known = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise BadInputError(f"eval.metric {spec.metric!r} is not in the eval's metrics.json; numeric keys: "
                                f"{known} (nested ones with dots, e.g. relevance.f1)")
        value = value[part]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadInputError(f"eval.metric {spec.metric!r} is not a number in metrics.json, got {value!r}")
    return float(value)


def _rank_key(metric: str | None):
    """Best first: the task metric descending when there is one, then held-out forward KL ascending; runs missing
    a figure go last."""
    def key(row: dict):
        kl = row.get("heldout_forward_kl")
        kl_key = (kl is None, kl if kl is not None else 0.0)
        if metric is None:
            return kl_key
        value = row.get(metric_column(metric))
        return (value is None, -(value if value is not None else 0.0), *kl_key)
    return key


def write_table(rows: list[dict], keys: list[str], out: Path, metric: str | None = None) -> None:
    """ablation.csv and ablation.md, best first: by the task metric (higher first) when the grid has `eval:`,
    else by held-out forward KL (lower first); both are columns either way."""
    rows = sorted(rows, key=_rank_key(metric))
    header = ["run", *keys, *([metric_column(metric)] if metric else []), *COLUMNS]
    with open(out / "ablation.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows({h: row.get(h) for h in header} for row in rows)

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    ranked_by = (f"ranked by {metric} on the labelled split (higher first), then held-out forward KL"
                 if metric else "ranked by held-out forward KL to the teacher (lower first)")
    lines = [f"Runs {ranked_by}.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row.get(h)) for h in header) + " |" for row in rows]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")


def run_row(spec: GridSpec, cache: str, name: str, assignment: dict, config: TrainConfig, result) -> dict:
    """One table row: the run's settings, its held-out figures and, with `eval:`, its task metric."""
    row = {"run": name, **assignment, **final_metrics(config.out, result)}
    if spec.eval is not None:
        row[metric_column(spec.metric)] = task_metric(spec, cache, config.out)
    return row


def check_points(spec: GridSpec, cache: str, root: Path, points: list[tuple[str, dict]],
                 overrides: tuple[str, ...]) -> list[TrainConfig]:
    """Each grid point's TrainConfig, validated and its loss checked against the caches it reads (the checks `train`
    makes before loading a model), so a point the cache cannot serve is refused before any point trains; the
    message names the point."""
    from kdcache.store.reader import CacheReader
    from kdcache.train.mixing import check_loss_for_caches

    configs, manifests = [], {}
    for name, assignment in points:
        try:
            config = run_config(spec.base, cache, root, name, assignment, overrides)
            named = [(s.path, manifests.get(s.path) or manifests.setdefault(
                s.path, CacheReader(s.path, verify_checksums=False).manifest)) for s in config.sources()]
            check_loss_for_caches(config.loss, named)
        except KdcacheError as exc:  # the same kind of refusal, naming the point
            raise type(exc)(f"grid point {name} ({_slug(assignment)}): {exc}") from None
        configs.append(config)
    return configs


def run_grid(cache: str, grid_path: str, out: str, overrides: tuple[str, ...] = ()) -> list[dict]:
    """Every combination of the grid's values, each trained in out/run-NNN; returns the table's rows."""
    spec = read_grid(grid_path)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    keys = list(spec.grid)
    rows = []
    combos = list(itertools.product(*(spec.grid[k] for k in keys)))
    points = [(f"run-{number:03d}", dict(zip(keys, values))) for number, values in enumerate(combos)]
    configs = check_points(spec, cache, root, points, overrides)  # every point, before the first one trains
    for number, ((name, assignment), config) in enumerate(zip(points, configs)):
        print(f"[{number + 1}/{len(combos)}] {name}: {_slug(assignment)}", flush=True)
        result = train(config)
        rows.append(run_row(spec, cache, name, assignment, config, result))
        write_table(rows, keys, root, spec.metric)  # the table grows as runs finish: a killed grid keeps its results
    return rows
