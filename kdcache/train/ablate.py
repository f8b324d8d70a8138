"""`kdcache ablate`: many training runs from one cache (a grid, or an Optuna search), one table of final metrics.

A grid file holds the settings shared by every run under `base` and the values to vary under `grid`, by config
key (see jobs/ablation-*.yaml). Each run gets its own folder; re-running the command skips finished runs and
resumes unfinished ones, since each run is an ordinary resumable `train`.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from kdcache.config import LOSS_WEIGHT_NAMES, TrainConfig, apply_override, from_dict
from kdcache.errors import BadInputError
from kdcache.train.trainer import train

COLUMNS = ["heldout_forward_kl", "heldout_kd", "heldout_top1_agreement", "final_train_loss", "steps"]


@dataclass
class GridSpec:
    base: dict
    grid: dict[str, list]


def read_grid(path: str) -> GridSpec:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BadInputError(f"cannot read the grid file {path}: {exc}") from None
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise BadInputError(f"{path} has no `grid:` mapping of config keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise BadInputError(f"grid key '{key}' in {path} must map to a non-empty list of values")
    return GridSpec(base=data.get("base") or {}, grid=grid)


def _slug(assignment: dict) -> str:
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in assignment.items())


def run_config(spec_base: dict, cache: str, out: Path, name: str, assignment: dict,
               overrides: tuple[str, ...]) -> TrainConfig:
    data = json.loads(json.dumps(spec_base))
    for key, value in assignment.items():
        if key.startswith("loss.") and key[5:] in LOSS_WEIGHT_NAMES:  # the grid's CE/KD weight replaces the base's
            for name in LOSS_WEIGHT_NAMES:
                data.get("loss", {}).pop(name, None)
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


def write_table(rows: list[dict], keys: list[str], out: Path) -> None:
    """ablation.csv and ablation.md, best held-out forward KL first."""
    rows = sorted(rows, key=lambda r: (r["heldout_forward_kl"] is None, r["heldout_forward_kl"] or 0.0))
    header = ["run", *keys, *COLUMNS]
    with open(out / "ablation.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows({h: row.get(h) for h in header} for row in rows)

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row.get(h)) for h in header) + " |" for row in rows]
    (out / "ablation.md").write_text("\n".join(lines) + "\n")


def run_grid(cache: str, grid_path: str, out: str, overrides: tuple[str, ...] = ()) -> list[dict]:
    """Every combination of the grid's values, each trained in out/run-NNN; returns the table's rows."""
    spec = read_grid(grid_path)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    keys = list(spec.grid)
    rows = []
    combos = list(itertools.product(*(spec.grid[k] for k in keys)))
    for number, values in enumerate(combos):
        assignment = dict(zip(keys, values))
        name = f"run-{number:03d}"
        config = run_config(spec.base, cache, root, name, assignment, overrides)
        print(f"[{number + 1}/{len(combos)}] {name}: {_slug(assignment)}", flush=True)
        result = train(config)
        rows.append({"run": name, **assignment, **final_metrics(config.out, result)})
        write_table(rows, keys, root)  # the table grows as runs finish, so a killed grid keeps its results
    return rows


def run_optuna(cache: str, grid_path: str, out: str, trials: int, overrides: tuple[str, ...] = ()) -> list[dict]:
    """A TPE search over the grid's values (as categorical choices), minimising held-out forward KL."""
    try:
        import optuna
    except ImportError:
        raise BadInputError("--search optuna needs optuna: pip install optuna") from None
    spec = read_grid(grid_path)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    keys = list(spec.grid)
    rows: list[dict] = []

    def objective(trial) -> float:
        assignment = {k: trial.suggest_categorical(k, spec.grid[k]) for k in keys}
        name = f"trial-{trial.number:03d}"
        config = run_config(spec.base, cache, root, name, assignment, overrides)
        result = train(config)
        row = {"run": name, **assignment, **final_metrics(config.out, result)}
        rows.append(row)
        write_table(rows, keys, root)
        if row["heldout_forward_kl"] is None:
            raise BadInputError("runs must evaluate at least once (set eval_every <= max_steps) for a search")
        return row["heldout_forward_kl"]

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)
    return rows
