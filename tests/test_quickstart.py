"""docs/quickstart.md walked as written, on a CPU, and the job specs under jobs/ checked against it.

The walk runs every command of the quickstart's CPU section through the real CLI, in a fresh folder holding the
repository's examples/, jobs/ and criteria files, exactly as written except one thing: `kdcache demo` runs at
`--size tiny` (the same files, written in seconds; its figures mean nothing). It is marked slow: the demo, a cache
build of 400 rows, a 100-step training run, two evals and a two-run ablation take about a minute on 2 idle cores.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO

from kdcache.cli import main

QUICKSTART = REPO / "docs" / "quickstart.md"
CPU_SECTION = "2. The same pipeline one command at a time"


def section(title: str) -> str:
    text = QUICKSTART.read_text()
    assert f"## {title}" in text, f"docs/quickstart.md has no section '{title}'"
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def bash_commands(text: str) -> list[list[str]]:
    """The commands of every ```bash block in `text`: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            args = shlex.split(line, comments=True)
            if args:
                commands.append(args)
    return commands


def job_header(path: Path) -> tuple[str, str]:
    """A job spec's first comment line ("Run first: ...") and its "Run: kdcache ..." command."""
    lines = path.read_text().splitlines()
    run = [line.split("# Run:", 1)[1].strip() for line in lines if line.startswith("# Run:")]
    return lines[0], run[0] if run else ""


def test_every_job_spec_says_first_what_to_run_first_and_then_its_command():
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        first, run = job_header(path)
        assert first.startswith("# Run first: "), (path.name, first)
        assert run.startswith("kdcache ") and f"jobs/{path.name}" in run, (path.name, run)


def test_the_quickstart_walk_runs_every_cpu_job_spec_as_its_header_says():
    walked = [" ".join(args) for args in bash_commands(section(CPU_SECTION))]
    cpu_specs = [p for p in sorted((REPO / "jobs").glob("*.yaml")) if "tiny" in p.name]
    assert len(cpu_specs) >= 3
    for path in cpu_specs:
        first, run = job_header(path)
        assert " ".join(shlex.split(run)) in walked, (path.name, run)
        for needed in first.split("Run first:", 1)[1].split("(")[0].split("&&"):
            assert " ".join(shlex.split(needed)) in walked, (path.name, needed)


def test_files_the_real_case_names_are_shipped():
    for args in bash_commands(section("3. The real case")):
        for arg in args:
            if arg.endswith((".yaml", ".jsonl")) and not arg.startswith("s3://"):
                assert (REPO / arg).is_file(), arg


@pytest.mark.slow
def test_quickstart_cpu_section_runs_as_written(tmp_path, monkeypatch):
    for name in ("examples", "jobs", "criteria.yaml", "criteria-upsc.yaml"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    commands = bash_commands(section(CPU_SECTION))
    assert commands[0] == ["kdcache", "demo"]
    runner = CliRunner()
    for args in commands:
        assert args[0] == "kdcache"
        argv = args[1:] + (["--size", "tiny", "--no-progress"] if args[1:] == ["demo"] else [])
        result = runner.invoke(main, argv)
        assert result.exit_code == 0, (args, result.output[-3000:], result.exception)
        # transformers' own bars ("Loading weights", "Writing model shards") stay out of kdcache's output
        assert "Loading weights" not in result.output and "Writing model shards" not in result.output, args

    # eval --from-cache scored the prompt the student was trained on, line breaks and all
    plan = json.loads((tmp_path / "storage/caches/upsc-tiny/plan.json").read_text())
    for run in ("student-tiny", "teacher-tiny"):
        settings = json.loads((tmp_path / "storage/eval" / run / "metrics.json").read_text())["run"]
        assert settings["prompt"] == plan["template"]["prompt"] and "\n" in settings["prompt"]
        assert settings["label_field"] == "gs_paper" and settings["label_prefix"] == " "
        assert settings["chat_template_used"] == plan["template"]["chat_template_used"]
    # the ablation is ranked by the task metric, the held-out KL beside it
    table = (tmp_path / "storage/runs/ablation-tiny/ablation.md").read_text()
    assert "ranked by accuracy" in table and "eval_accuracy" in table and "heldout_forward_kl" in table
    # the shipped UPSC criteria load and are checked (exit 1: demo-sized models are not expected to pass them)
    result = runner.invoke(main, ["compare", "storage/eval/teacher-tiny", "storage/eval/student-tiny",
                                  "--criteria", "criteria-upsc.yaml"])
    assert result.exit_code in (0, 1), result.output
    assert result.output.count("[PASS]") + result.output.count("[FAIL]") == 5, result.output
