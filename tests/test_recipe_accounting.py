"""The tiny GPT-2 Large -> DistilGPT-2 accounting-QA recipe (jobs/accounting-gpt2-large-to-distilgpt2) walked as its
README writes it, on a CPU: GPT-2-config teacher and student built locally, an answer-only cache with the tail at
T 0.7, the student trained at T 0.7 with early stopping (patience 4) and TensorBoard, and BLEU on the test rows."""

from __future__ import annotations

import json
import runpy
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO
from test_quickstart import bash_commands

from kdcache.cli import main
from kdcache.config import CacheBuildConfig, EvalConfig, TrainConfig, load_config
from kdcache.eval.runner import run_eval

RECIPE = REPO / "jobs" / "accounting-gpt2-large-to-distilgpt2"


def test_the_real_specs_set_the_reports_recipe():
    cache = load_config(CacheBuildConfig, RECIPE / "cache-gpt2-large.yaml")
    assert cache.template.distill == "target" and 0.7 in cache.sparsifier.tail_temperatures
    train = load_config(TrainConfig, RECIPE / "train-distilgpt2.yaml")
    assert (train.loss.temperature, train.patience, train.tensorboard) == (0.7, 4, True)
    assert load_config(EvalConfig, RECIPE / "eval-bleu.yaml").mode == "generate"
    rows = [json.loads(line) for line in (RECIPE / "tiny" / "accounting-qa.jsonl").read_text().splitlines()]
    assert len(rows) >= 40 and len({r["id"] for r in rows}) == len(rows)
    for path in RECIPE.glob("*.yaml"):  # the job-spec headers of jobs/*.yaml
        lines = path.read_text().splitlines()
        assert lines[0].startswith("# Run first: ") and f"jobs/{RECIPE.name}/{path.name}" in lines[1], path.name


@pytest.mark.slow
def test_tiny_recipe_runs_as_written(tmp_path, monkeypatch):
    (tmp_path / "jobs").symlink_to(REPO / "jobs")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    commands = bash_commands((RECIPE / "README.md").read_text().split("## The tiny version", 1)[1])
    assert commands[0][0] == "python" and len(commands) == 5
    for args in commands:
        if args[0] == "python":
            monkeypatch.setattr(sys, "argv", [args[1], *args[2:], "--teacher-steps", "100"])
            runpy.run_path(args[1], run_name="__main__")
            continue
        result = runner.invoke(main, args[1:])
        assert result.exit_code == 0, (args, result.output[-3000:], result.exception)

    run = tmp_path / "storage/runs/accounting-tiny"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))  # TensorBoard scalars were written
    plan = json.loads((tmp_path / "storage/caches/accounting-tiny/plan.json").read_text())
    assert plan["template"]["distill"] == "target"  # answer tokens only
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if "heldout_forward_kl" in line]
    assert len(evals) >= 2 and min(e["heldout_forward_kl"] for e in evals) < evals[0]["heldout_forward_kl"]
    summary = json.loads((run / "run_summary.json").read_text())
    # early stopping: either the run stopped before max_steps with 4 evaluations after its best, or it never stalled
    best = min(range(len(evals)), key=lambda i: evals[i]["heldout_forward_kl"])
    assert summary["step"] == 80 or len(evals) - 1 - best >= 4, (summary["step"], best, len(evals))
    for name in ("student", "teacher"):  # the recipe's metrics: BLEU and ROUGE-L per model, as numbers
        generation = json.loads((tmp_path / f"storage/eval/accounting-tiny/{name}/metrics.json").read_text())[
            "generation"]
        assert 0.0 <= generation["bleu"] <= 1.0 and 0.0 <= generation["rouge_l"] <= 1.0

    def bleu(model: str, out: str) -> float:  # on the cached questions: what the student was distilled on
        config = load_config(EvalConfig, RECIPE / "tiny" / "eval.yaml", [
            f"model={model}", f"out={tmp_path / out}", "data=[storage/models/accounting-tiny/train.jsonl]"])
        return run_eval(config).metrics["generation"]

    before, after = bleu("storage/models/accounting-tiny/student", "u"), bleu(str(run / "final"), "f")
    assert after["rouge_l"] > before["rouge_l"] + 0.05 or after["bleu"] > before["bleu"] + 0.02, (before, after)
