"""`kdcache ablate --search optuna`: a seeded TPE search over a grid file's keys, with a persistent study that
resumes after a kill and pruning on held-out figures.

The grid file is the one `kdcache ablate` reads (kdcache/train/ablate.py). Under `grid:`, a list of values is a
categorical choice; a mapping ``{low: L, high: H, log: true}`` is a float range (for lr and the loss weights).
``loss.temperature`` may only take the cache's stored tail temperatures or 1, so that every trial's loss is exact.

The study lives in ``OUT/study.db`` (SQLite, optuna's RDB storage). Re-running the same command loads it: finished
trials (complete or pruned) are kept with their parameters, a trial that was running when the process died is
marked failed and its parameters are tried again first, and the search goes on until ``trials`` trials have
finished. Each trial's run is an ordinary `train` in ``OUT/trial-NNN``.

Pruning: the trainer calls back after every held-out evaluation (``eval_every``); the callback reports that
evaluation's held-out forward KL to the trial (negated when the study maximises a task metric, so larger is better
either way) and optuna's MedianPruner stops the trial when it is worse than the median of earlier trials at the
same step (never at the run's last step: a finished run is kept).
"""

from __future__ import annotations

import json
from pathlib import Path

from kdcache.errors import BadInputError
from kdcache.train.ablate import GridSpec, metric_column, read_grid, run_config, run_row, write_table
from kdcache.train.trainer import train

STUDY_FILE = "study.db"
STUDY_NAME = "kdcache-ablate"


def _is_range(values) -> bool:
    return isinstance(values, dict)


def check_search_space(spec: GridSpec, cache: str) -> None:
    """Ranges are `{low, high[, log]}` with low < high; temperatures are among the cache's stored ones (or 1)."""
    from kdcache.store.reader import CacheReader

    for key, values in spec.grid.items():
        if _is_range(values):
            low, high = values.get("low"), values.get("high")
            if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high) or set(
                    values) - {"low", "high", "log"}:
                raise BadInputError(f"grid key '{key}' must be a list of values or {{low: L, high: H, log: "
                                    f"true|false}} with L < H, got {values!r}")
    temperatures = spec.grid.get("loss.temperature")
    if temperatures is not None:
        stored = {1.0, *map(float, CacheReader(cache).manifest.sparsifier.tail_temperatures or ())}
        wrong = [t for t in (temperatures if not _is_range(temperatures) else [temperatures])
                 if _is_range(t) or float(t) not in stored]
        if wrong:
            raise BadInputError(f"loss.temperature in the search must be a list of the cache's stored temperatures "
                                f"{sorted(stored)} (exact losses), got {temperatures!r}")


def _suggest(trial, key: str, values):
    if _is_range(values):
        return trial.suggest_float(key, float(values["low"]), float(values["high"]), log=bool(values.get("log")))
    return trial.suggest_categorical(key, values)


def open_study(out: Path, maximize: bool, seed: int):
    """The persistent study in out/study.db (created, or loaded when it exists), TPE seeded, MedianPruner."""
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{out / STUDY_FILE}")
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True,
                                direction="maximize" if maximize else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    if study.direction != (optuna.study.StudyDirection.MAXIMIZE if maximize else
                           optuna.study.StudyDirection.MINIMIZE):
        raise BadInputError(f"{out / STUDY_FILE} holds a study with another direction (the grid file's `eval:` "
                            "section changed?): use another --out")
    return study


def recover_interrupted(study, keys) -> int:
    """Trials left RUNNING by a killed process are marked failed, and those that had chosen every parameter of
    ``keys`` (so they had started training) are queued to run again first with the same parameters; returns how
    many were queued. A trial killed while still choosing its parameters trained nothing and is not rerun (queued
    with some of them, the rest would be chosen afresh: another trial under a retry's name)."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    queued = 0
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        if set(keys) <= set(trial.params):
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            queued += 1
    return queued


def finished_trials(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def run_optuna(cache: str, grid_path: str, out: str, trials: int, overrides: tuple[str, ...] = (),
               seed: int = 0) -> list[dict]:
    """Run (or resume) the search until `trials` trials have finished; returns the table's rows (finished trials)."""
    try:
        import optuna
    except ImportError:
        raise BadInputError("--search optuna needs optuna: pip install 'kdcache[optuna]'") from None
    spec = read_grid(grid_path, allow_ranges=True)
    check_search_space(spec, cache)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    keys = list(spec.grid)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(root, spec.metric is not None, seed)
    retried = recover_interrupted(study, keys)
    if retried:
        print(f"resuming {root / STUDY_FILE}: {retried} interrupted trial(s) queued again", flush=True)

    def rows() -> list[dict]:
        return [{**json.loads(t.user_attrs["row"]), "state": t.state.name.lower()}
                for t in finished_trials(study) if "row" in t.user_attrs]

    def objective(trial) -> float:
        assignment = {k: _suggest(trial, k, spec.grid[k]) for k in keys}
        name = f"trial-{trial.number:03d}"
        config = run_config(spec.base, cache, root, name, assignment, overrides)
        sign = -1.0 if spec.metric is not None else 1.0

        def report(evaluation: dict) -> None:
            kl = evaluation.get("heldout_forward_kl")
            if kl is None:
                return
            trial.report(sign * kl, evaluation["step"])
            last = config.max_steps is not None and evaluation["step"] >= config.max_steps  # finished: keep it
            if not last and trial.should_prune():
                trial.set_user_attr("row", json.dumps({"run": name, **assignment, "heldout_forward_kl": kl,
                                                       "steps": evaluation["step"]}))
                raise optuna.TrialPruned(f"held-out forward KL {kl:.4f} at step {evaluation['step']}")

        print(f"[trial {trial.number}] {name}: {assignment}", flush=True)
        result = train(config, on_eval=report)
        row = run_row(spec, cache, name, assignment, config, result)
        trial.set_user_attr("row", json.dumps(row))
        if spec.metric is not None:
            return row[metric_column(spec.metric)]
        if row["heldout_forward_kl"] is None:
            raise BadInputError("runs must evaluate at least once (set eval_every <= max_steps) for a search, or "
                                "add an `eval:` section to rank by a task metric")
        return row["heldout_forward_kl"]

    def write(study_, _trial) -> None:
        write_table(rows(), keys + ["state"], root, spec.metric)  # the table grows as trials finish

    remaining = trials - len(finished_trials(study))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, callbacks=[write])
    table = rows()
    write_table(table, keys + ["state"], root, spec.metric)
    return table
