"""Faults and tampering (issue 11): each case is refused with a one-line message, or resumes with nothing lost."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import PROMPT, TARGET, make_config, upsc_rows
from test_trainer import config as train_config

from kdcache.cli import main
from kdcache.errors import friendly_errors
from kdcache.store import writer as writer_module
from kdcache.store.location import CacheLocation
from kdcache.train import checkpoint as checkpoint_module
from kdcache.train.checkpoint import read_checkpoint
from kdcache.train.trainer import train

REPO = Path(__file__).resolve().parent.parent


def refused(result, *fragments: str) -> str:
    """Assert a CLI run ended as a user error: exit 2, no traceback, one `error: ...` line holding `fragments`."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an exception that escaped the CLI
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def build_args(output, teacher_dir, data_file, *extra: str) -> list[str]:
    return ["cache", "build", "--teacher", teacher_dir, "--data", str(data_file), "--output", str(output),
            "--prompt", PROMPT, "--target", TARGET, "--id-field", "id", "--shard-size", "5", "--k", "8",
            "--batch-size", "3", "--no-progress", *extra]


def train_args(cache, student, out, *extra: str) -> list[str]:
    return ["train", "--cache", str(cache), "--student", str(student), "--out", str(out), "--profile", "cpu",
            "--batch-size", "4", "--lr", "3e-3", "--no-progress", "--set", "lora.enabled=false",
            "--set", "heldout_fraction=0.25", "--set", "chunk_size=64", "--set", "loss.alpha=0.0", *extra]


# ==================================================================================================================
# 6. errors: what used to come out as a traceback is one line naming the cause and the fix, with exit status 2
# ==================================================================================================================


@pytest.fixture
def latin1_file(tmp_path) -> Path:
    """Six UPSC rows as JSONL; row 3's text holds a Latin-1 byte (0xe9), which is not UTF-8."""
    lines = [json.dumps({**row, "text": " ".join(row["text"].split()[:20])}).encode() for row in upsc_rows(6)]
    lines[2] = lines[2].replace(b'"text": "', b'"text": "caf\xe9 ', 1)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_row_that_is_not_utf8_is_a_bad_row(tmp_path, teacher_dir, latin1_file):
    result = CliRunner().invoke(main, build_args(tmp_path / "c1", teacher_dir, latin1_file))
    refused(result, "latin1.jsonl, row 3: line is not valid UTF-8 (byte 0xe9", "--skip-bad-rows")
    result = CliRunner().invoke(main, build_args(tmp_path / "c2", teacher_dir, latin1_file, "--skip-bad-rows"))
    assert result.exit_code == 0, result.output
    assert "skipped 1 bad rows" in result.output and "row 3: line is not valid UTF-8" in result.output
    assert "cache complete: 5 examples" in result.output


def test_a_csv_row_that_is_not_utf8_is_a_bad_row(tmp_path):
    from kdcache.config import DataConfig
    from kdcache.data.sources import read_rows
    from kdcache.errors import BadInputError

    path = tmp_path / "rows.csv"
    path.write_bytes(b'id,text\n1,"fine"\n2,"caf\xe9, with a\nnewline inside"\n3,ok\n')
    rows, bad = read_rows(DataConfig(paths=[str(path)]))
    assert [row.fields["id"] for row in rows] == ["1", "3"]
    assert len(bad) == 1 and "rows.csv, row 3: is not valid UTF-8 (byte 0xe9 in column 'text')" in str(bad[0])
    path.write_bytes(b'id,t\xefxt\n1,x\n')
    with pytest.raises(BadInputError, match="the header of .*rows.csv .* is not valid UTF-8"):
        read_rows(DataConfig(paths=[str(path)]))


def test_an_output_that_is_a_file_or_below_one_is_refused(tmp_path, teacher_dir, data_file, sharp_cache, student_dir):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    runner = CliRunner()
    refused(runner.invoke(main, build_args(a_file, teacher_dir, data_file)), f"--output {a_file} is a file")
    refused(runner.invoke(main, build_args(a_file / "cache", teacher_dir, data_file)),
            f"--output {a_file / 'cache'} lies below {a_file}, which is a file")
    refused(runner.invoke(main, train_args(sharp_cache, student_dir, a_file)), f"--out {a_file} is a file")
    refused(runner.invoke(main, train_args(sharp_cache, student_dir, a_file / "x" / "run")), "lies below")
    refused(runner.invoke(main, ["eval", "--model", student_dir, "--data", data_file, "--labels", "GS1",
                                 "--label-field", "gs_paper", "--out", str(a_file / "eval")]), "lies below")
    assert a_file.read_text() == "not a folder\n"


def test_a_read_only_output_is_refused(tmp_path, monkeypatch, teacher_dir, data_file):
    from kdcache import outputs

    folder = tmp_path / "ro"
    folder.mkdir()
    # As the filesystem answers for a read-only mount (root, which these tests may run as, ignores chmod).
    monkeypatch.setattr(outputs, "_writable", lambda folder: False)
    monkeypatch.setattr(outputs, "_read_only_filesystem", lambda path: True)
    refused(CliRunner().invoke(main, build_args(folder / "cache", teacher_dir, data_file)),
            f"--output {folder / 'cache'} is on a read-only filesystem ({folder})")
    monkeypatch.setattr(outputs, "_read_only_filesystem", lambda path: False)
    refused(CliRunner().invoke(main, build_args(folder / "cache", teacher_dir, data_file)),
            f"{folder} is not writable by this user")
    monkeypatch.undo()

    def read_only(self, path, value):  # the first write: the plan (created exclusively)
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(CacheLocation, "create_json", read_only)
    refused(CliRunner().invoke(main, build_args(folder / "cache", teacher_dir, data_file)),
            "Read-only file system while writing the plan of", "write to a writable location")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_without_write_permission_is_refused(tmp_path, teacher_dir, data_file):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        refused(CliRunner().invoke(main, build_args(folder / "cache", teacher_dir, data_file)),
                "is not writable by this user")
    finally:
        folder.chmod(0o755)


def test_a_full_disk_during_a_build_says_what_to_free_and_resumes(tmp_path, monkeypatch, teacher_dir, data_file):
    out = tmp_path / "cache"
    real = writer_module.write_shard_files

    def full_at_shard_2(folder, data, *rest):
        if ".tmp-00002-" in folder:
            real(folder, data, *rest)  # a part of the files is written when the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", folder + "/records.parquet")
        real(folder, data, *rest)

    monkeypatch.setattr(writer_module, "write_shard_files", full_at_shard_2)
    result = CliRunner().invoke(main, build_args(out, teacher_dir, data_file))
    line = refused(result, "No space left on device while writing shard 2 (", f"MB before compression) of {out} (",
                   "free space there, then run the same command again: it resumes after the last complete shard "
                   "(2 of 5 shards are complete and kept)")
    assert str(out / "shards") in line
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        ".lock-00002", "00000", "00000.commit.json", "00001", "00001.commit.json"]  # no staging left behind
    monkeypatch.undo()
    result = CliRunner().invoke(main, build_args(out, teacher_dir, data_file))
    assert result.exit_code == 0 and "wrote 3 shards, 2 already done" in result.output, result.output
    assert CliRunner().invoke(main, ["cache", "verify", str(out)]).exit_code == 0
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]  # the lock files are gone


def test_a_full_disk_during_a_checkpoint_save_says_what_to_free_and_resumes(tmp_path, monkeypatch, sharp_cache,
                                                                            student_dir):
    out = tmp_path / "run"
    args = train_args(sharp_cache, student_dir, out, "--max-steps", "6", "--set", "save_every=2",
                      "--set", "eval_every=3")
    straight = train_args(sharp_cache, student_dir, tmp_path / "straight", "--max-steps", "6", "--set",
                          "save_every=2", "--set", "eval_every=3")
    assert CliRunner().invoke(main, straight).exit_code == 0

    def full(at: str, path: Path) -> None:
        if at == "staging" and "000004" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path / "state.safetensors"))

    monkeypatch.setattr(checkpoint_module, "crash_point", full)
    refused(CliRunner().invoke(main, args), "No space left on device while saving the checkpoint of step 4 (about ",
            f"MB) in {out} (", "free space there, then run the same command again: it resumes from step 2")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-000002", "checkpoint.json"]
    assert CliRunner().invoke(main, args).exit_code == 0
    resumed, reference = read_checkpoint(out), read_checkpoint(tmp_path / "straight")
    assert resumed.state == reference.state
    assert all((resumed.trainable[k] == reference.trainable[k]).all() for k in reference.trainable)


def test_a_full_disk_before_the_first_checkpoint_says_the_run_starts_over(tmp_path, monkeypatch, sharp_cache,
                                                                          student_dir):
    def full(at: str, path: Path) -> None:
        if at == "staging":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "crash_point", full)
    refused(CliRunner().invoke(main, train_args(sharp_cache, student_dir, tmp_path / "run", "--max-steps", "2")),
            "No space left on device while saving the checkpoint of step 2",
            "it starts over, as no checkpoint was saved yet")


_HOLDER = """
import sys, time
from kdcache.store.location import CacheLocation
from kdcache.store.lock import ShardClaims
claims = ShardClaims(CacheLocation(sys.argv[1]))
claims.claim(int(sys.argv[2]))
print("claimed", flush=True)
time.sleep(120)
"""


def test_two_builds_of_one_shard_at_once_the_second_is_refused(tmp_path, teacher_dir, data_file):
    out = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), "0"], stdout=subprocess.PIPE, env=env,
                              text=True)  # another process building shard 0, as worker 0 of 1 does first
    try:
        assert holder.stdout.readline().strip() == "claimed"
        result = CliRunner().invoke(main, build_args(out, teacher_dir, data_file))
        refused(result, f"shard 0 of {out} is being written by process {holder.pid} on ",
                "another build with the same --worker-index", "give each worker its own --worker-index")
        assert not (out / "shards" / "00000").exists() and not (out / "shards" / "00000.commit.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # A holder that died (killed like this one) leaves its lock file, which blocks nobody.
    assert (out / "shards" / ".lock-00000").exists()
    result = CliRunner().invoke(main, build_args(out, teacher_dir, data_file))
    assert result.exit_code == 0 and "cache complete: 24 examples" in result.output, result.output
    assert not list((out / "shards").glob(".lock-*"))


def test_a_claimed_shard_is_handed_over_before_it_is_let_go(tmp_path):
    """A build claims its next shard before it lets go of the last, so a second build never finds a gap."""
    from kdcache.errors import OutputBusyError
    from kdcache.store.lock import ShardClaims

    location = CacheLocation(str(tmp_path / "cache"))
    with ShardClaims(location) as first, ShardClaims(location) as second:  # two open files: two flock owners
        first.claim(0)
        with pytest.raises(OutputBusyError, match="shard 0 of .* is being written by process"):
            second.claim(0)
        first.claim(1)
        first.release(0, committed=True)
        with pytest.raises(OutputBusyError, match="shard 1 of"):
            second.claim(1)
        second.claim(0)  # free again (committed: a build that claims it then skips it)
        second.release(0, committed=True)
    assert not os.path.exists(tmp_path / "cache" / "shards" / ".lock-00000")
    assert ShardClaims(CacheLocation("memory://cache")).enabled is False  # object stores: no claims (docs/format.md)


@pytest.mark.parametrize("value", ["!!python/object:os.system x", "!!python/object/apply:os.system ['touch pwned']",
                                   "[1, 2"])
def test_a_set_value_that_is_not_plain_yaml_is_refused(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--cache", "c", "--student", "s", "--out", "o", "--set",
                                       f"lr={value}"])
    refused(result, f"override 'lr={value}': the value is not plain YAML", "quote a string")
    assert not (tmp_path / "pwned").exists()


def test_a_full_quota_anywhere_in_training_is_one_line(tmp_path, monkeypatch, sharp_cache, student_dir):
    from kdcache.train import trainer as trainer_module

    def full(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "run" / "best"))

    monkeypatch.setattr(trainer_module, "save_student", full)
    refused(CliRunner().invoke(main, train_args(sharp_cache, student_dir, tmp_path / "run", "--max-steps", "2",
                                                "--set", "eval_every=1")),
            f"Disk quota exceeded while training into {tmp_path / 'run'} ({tmp_path / 'run' / 'best'})",
            "it resumes from the last checkpoint")


def test_any_command_prints_an_os_error_about_storage_in_one_line():
    @click.command()
    @friendly_errors
    def command():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x")

    refused(CliRunner().invoke(command), "No space left on device (/data/out/x): free space there, then run the same "
                                         "command again")

    @click.command()
    @friendly_errors
    def other():
        raise OSError(errno.EIO, "Input/output error")  # not about storage: left as it is (a bug or a broken disk)

    assert isinstance(CliRunner().invoke(other).exception, OSError)


# ==================================================================================================================
# 7. silent changes: a resume with other settings, ids without a value or repeated, labels outside the label set
# ==================================================================================================================

SETTINGS = ["max_steps=6", "save_every=2", "eval_every=3"]


@pytest.fixture
def half_run(tmp_path, sharp_cache, student_dir) -> Path:
    """A run folder killed after step 3 (its checkpoint is step 2's)."""
    out = tmp_path / "run"
    train(train_config(sharp_cache, student_dir, out, *SETTINGS), stop_after_steps=3)
    assert read_checkpoint(out).state.step == 2
    return out


def _trainer_args(sharp_cache, student_dir, out, *extra):
    """`kdcache train` with the settings of `half_run` (test_trainer.config's and SETTINGS)."""
    return train_args(sharp_cache, student_dir, out, "--max-steps", "6", "--set", "save_every=2", "--set",
                      "eval_every=3", *extra)


def test_a_resume_with_other_settings_is_refused_with_the_differences(half_run, sharp_cache, student_dir):
    saved = (half_run / "train_config.json").read_text()
    result = CliRunner().invoke(main, _trainer_args(sharp_cache, student_dir, half_run, "--lr", "0.01",
                                                    "--loss", "jsd"))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert f"error: {half_run} was trained with other settings than this run's" in result.output
    assert "--allow-config-change" in result.output
    assert "  loss.kind: \"forward_kl\" -> \"jsd\"\n  lr: 0.003 -> 0.01\n" in result.output
    assert (half_run / "train_config.json").read_text() == saved
    assert read_checkpoint(half_run).state.step == 2


def test_an_allowed_change_is_logged_and_both_configs_are_kept(half_run, sharp_cache, student_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="kdcache.train.run_config"):
        result = CliRunner().invoke(main, _trainer_args(sharp_cache, student_dir, half_run, "--lr", "0.01",
                                                        "--allow-config-change"))
    assert result.exit_code == 0, result.output
    assert "resuming" in caplog.text and "at step 2 with changed settings" in caplog.text
    assert "lr: 0.003 -> 0.01" in caplog.text
    before = json.loads((half_run / "train_config.000002.json").read_text())
    now = json.loads((half_run / "train_config.json").read_text())
    assert before["lr"] == 0.003 and not before["allow_config_change"]
    assert now["lr"] == 0.01 and now["allow_config_change"]
    assert read_checkpoint(half_run).state.step == 6


def test_settings_that_cannot_change_results_may_change_on_resume(half_run, sharp_cache, student_dir, straight_6):
    moved = half_run.with_name("moved")
    half_run.rename(moved)  # `out` itself is exempt: a run folder may be moved
    result = CliRunner().invoke(main, _trainer_args(sharp_cache, student_dir, moved, "--set", "tensorboard=false",
                                                    "--set", "save_every=3"))
    assert result.exit_code == 0, result.output
    assert not list(moved.glob("train_config.0*.json"))
    resumed, reference = read_checkpoint(moved), read_checkpoint(straight_6)
    assert resumed.state.step == reference.state.step == 6
    assert all((resumed.trainable[k] == reference.trainable[k]).all() for k in reference.trainable)


@pytest.fixture
def straight_6(tmp_path, sharp_cache, student_dir) -> Path:
    out = tmp_path / "straight"
    train(train_config(sharp_cache, student_dir, out, *SETTINGS))
    return out


def test_a_run_without_a_checkpoint_starts_over_with_any_settings(tmp_path, sharp_cache, student_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps({"lr": 1.0, "loss": {"kind": "tv"}}))  # killed before a save
    train(train_config(sharp_cache, student_dir, out, "max_steps=1"))
    assert json.loads((out / "train_config.json").read_text())["lr"] == 0.003


def test_a_damaged_train_config_is_refused_on_resume(half_run, sharp_cache, student_dir):
    from kdcache.errors import BadInputError

    (half_run / "train_config.json").write_text("{not json")
    with pytest.raises(BadInputError, match="train_config.json cannot be read .* delete it to resume without"):
        train(train_config(sharp_cache, student_dir, half_run, *SETTINGS))


def test_config_changes_compare_nested_keys_and_skip_exempt_ones():
    from kdcache.train.run_config import config_changes

    saved = {"lr": 0.001, "loss": {"kind": "forward_kl", "temperature": 1.0}, "progress": True, "out": "a",
             "only_old": 1}
    now = {"lr": 0.001, "loss": {"kind": "forward_kl", "temperature": 2}, "progress": False, "out": "b",
           "only_new": 2}
    assert [c.line() for c in config_changes(saved, now)] == ["loss.temperature: 1.0 -> 2"]


@pytest.fixture
def ids_file(tmp_path) -> Path:
    """Eight rows: ids 0, 1, 1, 3, 1, (none), 6, 6."""
    rows = []
    for number, row in enumerate(upsc_rows(8)):
        row = {**row, "text": " ".join(row["text"].split()[:20]), "id": str(number)}
        rows.append(row)
    rows[2]["id"] = rows[4]["id"] = "1"
    rows[7]["id"] = "6"
    del rows[5]["id"]
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_missing_and_repeated_ids_are_counted_and_refused_with_strict(tmp_path, teacher_dir, ids_file, caplog):
    from kdcache.teacher.build import build_cache

    with caplog.at_level(logging.WARNING, logger="kdcache.build"):
        result = build_cache(make_config(tmp_path / "c1", teacher_dir, ids_file))
    assert result.finalized
    assert ("1 rows have no value in the id field 'id' (the first: " in caplog.text
            and "ids.jsonl, row 6)" in caplog.text)
    assert "3 rows repeat the id of an earlier row (2 ids occur more than once; '1' 3 times)" in caplog.text
    refused(CliRunner().invoke(main, build_args(tmp_path / "c2", teacher_dir, ids_file, "--strict")),
            "1 rows have no value in the id field 'id'", "3 rows repeat the id", "ids must be present and unique")
    assert not (tmp_path / "c2").exists()


def test_unique_ids_give_no_warning(tmp_path, teacher_dir, data_file, caplog):
    from kdcache.teacher.build import check_ids

    config = make_config(tmp_path / "c", teacher_dir, data_file, "strict=true")
    from kdcache.data.sources import read_rows

    with caplog.at_level(logging.WARNING, logger="kdcache.build"):
        check_ids(config, read_rows(config.data)[0])
    assert caplog.text == ""


def test_eval_refuses_repeated_ids_and_gold_labels_outside_the_label_set(tmp_path):
    """kdcache eval has refused both from the start (its runs are matched by id and its metrics need the labels);
    these pin that down, as the issue lists them among the silent changes."""
    from kdcache.config import EvalConfig
    from kdcache.errors import BadInputError
    from kdcache.eval.runner import load_examples

    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "a", "text": "x", "label": "GS1"}, {"id": "a", "text": "y", "label": "GS2"}]))
    config = EvalConfig(model="m", data=[str(path)], out=str(tmp_path / "out"), labels=["GS1", "GS2"])
    with pytest.raises(BadInputError, match="id 'a' repeats .*eval.jsonl, row 1; ids must be unique"):
        load_examples(config)
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "a", "text": "x", "label": "GS1"}, {"id": "b", "text": "y", "label": "GS9"}]))
    with pytest.raises(BadInputError, match=r"gold labels \['GS9'\] .* are not among the labels"):
        load_examples(config)

