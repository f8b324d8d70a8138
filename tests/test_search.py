"""`kdcache ablate --search optuna`: a persistent, seeded TPE study over loss weights, cached temperatures and lr,
pruned on held-out KL, that resumes after a SIGKILL to the same trial list."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from conftest import REPO

from kdcache.cli import main

optuna = pytest.importorskip("optuna", reason="the optuna extra (in dev) is not installed")


def _grid(tmp_path, student_dir, temperatures="[1.0, 2.0]"):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"base: {{student: {student_dir}, profile: cpu, batch_size: 4, max_steps: 4, eval_every: 2, save_every: 2,\n"
        "       heldout_fraction: 0.25, lora: {enabled: false}, progress: false, tensorboard: false}\n"
        "grid:\n"
        "  loss.ce_weight: {low: 0.0, high: 0.9}\n"
        f"  loss.temperature: {temperatures}\n"
        "  lr: {low: 1.0e-4, high: 1.0e-1, log: true}\n")
    return grid


def _finished(out) -> list:
    study = optuna.load_study(study_name="kdcache-ablate", storage=f"sqlite:///{out / 'study.db'}")
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study, [t for t in study.get_trials() if t.state in states]


def test_a_killed_study_resumes_to_the_same_trial_list(tmp_path, sharp_cache, student_dir):
    from kdcache.train.search import run_optuna

    grid, out = _grid(tmp_path, student_dir), tmp_path / "search"
    command = [sys.executable, "-m", "kdcache.cli", "ablate", "--search", "optuna", "--trials", "8", "--cache",
               sharp_cache, "--grid", str(grid), "--out", str(out)]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (out / "study.db").exists():
            try:
                if len(_finished(out)[1]) >= 2:
                    break
            except Exception:  # the study is being created
                pass
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    _, before = _finished(out)
    assert 2 <= len(before) < 8
    kept = {t.number: t.params for t in before}

    rows = run_optuna(sharp_cache, str(grid), str(out), trials=len(before) + 3)
    study, after = _finished(out)
    assert len(after) == len(before) + 3 and len(rows) == len(after)
    assert {t.number: t.params for t in after if t.number in kept} == kept  # the finished trials are kept as they were
    interrupted = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    for trial in interrupted:  # a trial the kill cut short is failed and, if it had all its parameters, run again
        retried = any(t.params == trial.params and t.user_attrs.get("retry_of") == trial.number for t in after)
        assert retried == (len(trial.params) == len(after[0].params))
    for trial in after:  # the search space: the cache's temperatures, ranges for the weight and lr
        assert trial.params["loss.temperature"] in (1.0, 2.0) and 0.0 <= trial.params["loss.ce_weight"] <= 0.9
        assert 1e-4 <= trial.params["lr"] <= 1e-1
        assert trial.intermediate_values  # held-out KL was reported at each evaluation, for the pruner
    table = (out / "ablation.md").read_text()
    assert table.count("| trial-") == len(after)

    # Running it again with the count reached trains nothing more and keeps the list.
    assert len(run_optuna(sharp_cache, str(grid), str(out), trials=len(after))) == len(after)
    assert [t.params for t in _finished(out)[1]] == [t.params for t in after]


def test_the_search_refuses_a_temperature_the_cache_does_not_store(tmp_path, sharp_cache, student_dir):
    grid = _grid(tmp_path, student_dir, temperatures="[1.0, 1.3]")
    result = CliRunner().invoke(main, ["ablate", "--search", "optuna", "--trials", "1", "--cache", sharp_cache,
                                       "--grid", str(grid), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "stored temperatures" in result.output, result.output
    result = CliRunner().invoke(main, ["ablate", "--cache", sharp_cache, "--grid", str(_grid(tmp_path, student_dir)),
                                       "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "ranges {low, high} are for --search optuna" in result.output, result.output


def test_only_trials_that_chose_every_parameter_are_run_again():
    """A trial killed after choosing its parameters is queued again with them; one killed while still choosing them
    (it trained nothing) is failed and not queued, since the rest of its parameters would be chosen afresh."""
    from kdcache.train.search import recover_interrupted

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    whole, partial = study.ask(), study.ask()
    whole.suggest_float("lr", 1e-4, 1e-1, log=True)
    whole.suggest_float("loss.ce_weight", 0.0, 0.9)
    partial.suggest_float("lr", 1e-4, 1e-1, log=True)
    assert recover_interrupted(study, ["lr", "loss.ce_weight"]) == 1
    states = {t.number: t.state for t in study.get_trials()}
    assert states[whole.number] == states[partial.number] == optuna.trial.TrialState.FAIL
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs["retry_of"]) for t in waiting] == [(whole.params, whole.number)]
