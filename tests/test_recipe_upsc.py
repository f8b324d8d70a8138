"""The tiny UPSC recipe (jobs/upsc-qwen2.5-72b-to-1.5b) walked as its README writes it, on a CPU: models built
locally, the teacher cached over silver and golden, the student trained at T 2 and alpha 0.5 with golden held out,
teacher and student evaluated on golden, and compared with the UPSC criteria and the cascade. The recipe's own
outputs (the metrics table, the criteria verdict, the cascade table) must exist and parse."""

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

RECIPE = REPO / "jobs" / "upsc-qwen2.5-72b-to-1.5b"
CRITERIA = 5  # criteria-upsc.yaml's entries


def tiny_commands() -> list[list[str]]:
    text = (RECIPE / "README.md").read_text()
    return bash_commands(text.split("## The tiny version", 1)[1])


def test_the_real_specs_load_and_set_the_reports_loss():
    train = load_config(TrainConfig, REPO / "jobs" / "train-qwen2.5-1.5b-t4.yaml")
    assert (train.loss.temperature, train.loss.ce_weight, train.profile) == (2.0, 0.5, "t4")
    teacher = load_config(CacheBuildConfig, REPO / "jobs" / "teacher-qwen2.5-72b-vllm.yaml")
    assert teacher.teacher.backend == "vllm" and 2.0 in teacher.sparsifier.tail_temperatures  # exact at T 2
    evaluation = load_config(EvalConfig, RECIPE / "eval-golden.yaml")
    assert evaluation.negative_label == "none" and (REPO / evaluation.data[0]).is_file()
    for job in ("teacher-qwen2.5-72b-vllm.yaml", "cache-upsc-qwen2.5-7b-hf.yaml"):  # no training on the eval set
        cached = load_config(CacheBuildConfig, REPO / "jobs" / job).data.paths
        assert not set(cached) & set(evaluation.data), (job, cached)
    # every spec the README's full-size sequence names is shipped
    for args in bash_commands("```bash\n" + (RECIPE / "README.md").read_text().split("```\n", 2)[1] + "```"):
        for arg in args:
            if arg.endswith((".yaml", ".jsonl")):
                assert (REPO / arg).is_file(), arg


@pytest.mark.slow
def test_tiny_recipe_runs_as_written(tmp_path, monkeypatch):
    for name in ("examples", "jobs", "criteria-upsc.yaml"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    commands = tiny_commands()
    assert commands[0][0] == "python" and len(commands) == 7
    for args in commands:
        if args[0] == "python":
            monkeypatch.setattr(sys, "argv", [args[1], *args[2:], "--teacher-steps", "80"])
            runpy.run_path(args[1], run_name="__main__")
            continue
        result = runner.invoke(main, args[1:])
        expected = (0, 1) if args[1] == "compare" else (0,)  # compare exits 1 when a criterion fails
        assert result.exit_code in expected, (args, result.output[-3000:], result.exception)

    # the student learned from the teacher: held-out KL on the golden cache went down
    evals = [json.loads(line) for line in (tmp_path / "storage/runs/upsc-tiny-recipe/metrics.jsonl").read_text()
             .splitlines() if "heldout_forward_kl" in line]
    assert len(evals) >= 2 and evals[-1]["heldout_forward_kl"] < evals[0]["heldout_forward_kl"]

    out = tmp_path / "storage/eval/upsc-tiny/compare"
    report, summary = (out / "report.md").read_text(), json.loads((out / "comparison.json").read_text())
    # the metrics table: both runs' figures, as numbers, with B - A
    rows = {row["metric"]: row for row in summary["rows"]}
    for metric in ("accuracy", "relevance.precision", "relevance.recall", "relevance.accuracy_on_relevant"):
        assert isinstance(rows[metric]["a"], float) and isinstance(rows[metric]["b"], float), metric
        assert rows[metric]["difference"] == pytest.approx(rows[metric]["b"] - rows[metric]["a"])
    assert "| metric | teacher | student |" in report and "| Relevance precision |" in report
    # the criteria verdict: one result per criterion, `passed` their conjunction, the same in report.md
    checks = summary["criteria"]
    assert len(checks) == CRITERIA and summary["passed"] == all(c["passed"] for c in checks)
    assert checks[0]["value"] == pytest.approx(rows["relevance.accuracy"]["b"])
    failed = sum(not c["passed"] for c in checks)
    verdict = f"## Success criteria: {failed} of {CRITERIA} failed" if failed else "## Success criteria: all hold"
    assert verdict in report
    assert report.count("- PASS: ") + report.count("- **FAIL**: ") == CRITERIA
    # the cascade table: from all deferred to all kept, the shares adding up, and the target recorded
    cascade = summary["cascade"]
    assert cascade["target_accuracy"] == 0.75 and cascade["n"] == 60
    assert cascade["curve"][0]["kept_share"] == 0.0 and cascade["curve"][-1]["kept_share"] == 1.0
    assert cascade["curve"][0]["accuracy"] == pytest.approx(cascade["teacher_accuracy"])
    assert cascade["curve"][-1]["accuracy"] == pytest.approx(cascade["student_accuracy"])
    for point in cascade["table"]:
        assert point["kept_share"] + point["deferred_share"] == pytest.approx(1.0)
    assert "## Cascade" in report and "| keep if confidence >= |" in report
