"""The command line: job specs with overrides, info, verify and finalize, and errors without tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import PROMPT, REPO, TARGET

from kdcache.cli import main
from kdcache.config import CacheBuildConfig, load_config
from kdcache.errors import BadInputError


@pytest.fixture(scope="module")
def built(tmp_path_factory, teacher_dir, data_file):
    """A cache built through the CLI from the shipped job spec, with command-line overrides."""
    out = tmp_path_factory.mktemp("cli") / "cache"
    result = CliRunner().invoke(main, [
        "cache", "build", "--config", str(REPO / "jobs" / "cache-upsc-tiny.yaml"), "--teacher", teacher_dir,
        "--data", data_file, "--output", str(out), "--k", "8", "--shard-size", "10", "--no-progress",
        "--set", "teacher.chunk_size=5", "--set", f"template.prompt={json.dumps(PROMPT)}",
    ])
    assert result.exit_code == 0, result.output
    assert "cache complete: 24 examples" in result.output
    return out


def test_job_spec_values_and_overrides_reach_the_manifest(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["sparsifier"]["k"] == 8 and manifest["num_shards"] == 3
    assert manifest["template"]["prompt"] == PROMPT and manifest["template"]["target"] == TARGET
    assert manifest["max_length"] == 512  # from the YAML file


def test_info_prints_statistics(built):
    result = CliRunner().invoke(main, ["cache", "info", str(built)])
    assert result.exit_code == 0, result.output
    for text in ("examples        24", "target tokens", "bytes per target token", "mean top-k mass", "teacher entropy"):
        assert text in result.output
    as_json = json.loads(CliRunner().invoke(main, ["cache", "info", "--json", str(built)]).output)
    assert as_json["stats"]["target_tokens"] == as_json["manifest"]["counts"]["num_targets"] > 0
    assert 0 < as_json["stats"]["mean_sparse_mass"] <= 1


def test_verify_exit_codes(built, tmp_path):
    assert CliRunner().invoke(main, ["cache", "verify", str(built)]).exit_code == 0
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shutil.rmtree(copy / "shards" / "00001")
    result = CliRunner().invoke(main, ["cache", "verify", str(copy)])
    assert result.exit_code == 1 and "corrupt: shard 00001" in result.output


def test_finalize_refuses_an_incomplete_cache(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    (copy / "manifest.json").unlink()
    (copy / "shards" / "00002.commit.json").unlink()
    result = CliRunner().invoke(main, ["cache", "finalize", str(copy)])
    assert result.exit_code == 2 and "1 of 3 shards are not written yet (shard 2)" in result.output
    assert "Traceback" not in result.output


def test_bad_input_gives_one_line_errors(tmp_path, teacher_dir):
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "build", "--teacher", teacher_dir, "--data", str(tmp_path / "x.jsonl"),
                                  "--output", str(tmp_path / "c")])
    assert result.exit_code == 2 and "error: data file" in result.output and "does not exist" in result.output
    result = runner.invoke(main, ["cache", "info", str(tmp_path)])
    assert result.exit_code == 2 and "is not a kdcache cache" in result.output
    result = runner.invoke(main, ["cache", "build", "--set", "teacher.nope=1"])
    assert result.exit_code == 2 and "unknown config key 'teacher.nope'" in result.output


def test_help_explains_itself():
    result = CliRunner().invoke(main, ["cache", "build", "--help"])
    assert result.exit_code == 0 and "--worker-index" in result.output and "resumes" in result.output


def test_config_types_are_checked():
    with pytest.raises(BadInputError, match="'sparsifier.k' must be an integer"):
        load_config(CacheBuildConfig, None, ["sparsifier.k=many"])
    with pytest.raises(BadInputError, match=r"'teacher.dtype' must be one of \['float32', 'float16', 'bfloat16'\]"):
        load_config(CacheBuildConfig, None, ["teacher.dtype=fp8"])
    for job in sorted((REPO / "jobs").glob("cache-*.yaml")):
        load_config(CacheBuildConfig, job)  # every shipped cache job spec parses


def test_loss_settings_are_checked_when_loaded():
    from kdcache.config import TrainConfig

    with pytest.raises(BadInputError, match=r"^config key 'loss.alpha' must be in \[0, 1\], got 1.5$"):
        load_config(TrainConfig, None, ["loss.alpha=1.5"])
    with pytest.raises(BadInputError, match="'loss.top_k' must be None with kind 'sampled_ce'"):
        load_config(TrainConfig, None, ["loss.kind=sampled_ce", "loss.top_k=4"])
    for job in sorted((REPO / "jobs").glob("train-*.yaml")):
        load_config(TrainConfig, job)  # every shipped training job spec parses


def test_only_given_options_become_overrides():
    from kdcache.cli.cache import cache_build
    from kdcache.cli.eval import eval_command
    from kdcache.cli.options import options_to_overrides

    given = {"teacher": "t", "batch_size": None, "data": ("a.jsonl", "b.jsonl"), "label_field": (), "k": 0,
             "generate": None, "skip_bad_rows": True, "no_progress": False}
    assert options_to_overrides(given, cache_build) == [
        'teacher.model="t"', 'data.paths=["a.jsonl", "b.jsonl"]', "sparsifier.k=0", "skip_bad_rows=true"]
    assert options_to_overrides({"no_progress": True, "label_eos": False}, eval_command) == [
        "label_eos=false", "progress=false"]


def test_choices_and_defaults_come_from_the_configs():
    from kdcache.cli.train import train_command
    from kdcache.config import LOSS_KINDS

    (loss,) = [param for param in train_command.params if param.name == "loss"]
    assert tuple(loss.type.choices) == LOSS_KINDS
    text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "[default: forward_kl]" in text and "[default: 0.5]" in text  # loss.kind and loss.alpha


def test_help_does_not_import_torch_and_the_module_runs():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys\nfrom kdcache.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.splitlines()[-1] == "False", result.stdout
    result = subprocess.run([sys.executable, "-m", "kdcache.cli", "--help"], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "cache" in result.stdout and "train" in result.stdout
