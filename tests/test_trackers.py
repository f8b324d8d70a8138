"""Experiment trackers (report_to): W&B offline and an MLflow file store hold the same scalars as metrics.jsonl.

Both are read back through the trackers' own formats: the W&B run's transaction log (``run-ID.wandb``, records of
wandb's protobuf schema) and MLflow's tracking client. Nothing reaches a network.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_trainer import config

from kdcache.cli import main
from kdcache.train.trackers import TRACKER_IDS, scalars
from kdcache.train.trainer import train

RUN = ("max_steps=4", "eval_every=2", "save_every=2", "loss.alpha=0.5")


def expected_by_step(out: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as each tracker should hold it: the scalars of every record, merged per step."""
    merged: dict[int, dict[str, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(record["step"], {}).update(scalars(record))
    return merged


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a W&B transaction log: a LevelDB-style log (a 7-byte ``:W&B`` header, 32 KiB blocks of
    records with 7-byte headers: crc32, length, type) of wandb_internal.Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, rows = path.read_bytes(), []
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes too few for a header are padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics_scalars(tmp_path, sharp_cache, student_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    out = tmp_path / "run"
    train(config(sharp_cache, student_dir, out, *RUN, "report_to=[wandb]"))
    (log,) = (tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    logged = {}
    for row in wandb_history(log):
        step = row.pop("_step")
        logged.setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    expected = expected_by_step(out)
    assert sorted(logged) == [1, 2, 3, 4] == sorted(expected)
    assert {"train/loss", "train/kd", "train/ce", "train/lr", "train/tokens_per_s", "train/grad_norm",
            "train/loader_wait_s", "heldout/kd", "heldout/top1_agreement"} <= set(logged[2])
    assert logged == expected
    assert json.loads((out / TRACKER_IDS).read_text())["wandb"] in log.name
    assert not (out / "tensorboard").exists()  # report_to replaced the default


def test_mlflow_file_store_holds_the_metrics_scalars_across_a_resume(tmp_path, sharp_cache, student_dir,
                                                                      monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    out = tmp_path / "run"
    # killed after step 3, past the checkpoint of step 2: the resumed run computes step 3 again and must not log it twice
    train(config(sharp_cache, student_dir, out, *RUN, "report_to=[mlflow]"), stop_after_steps=3)
    train(config(sharp_cache, student_dir, out, *RUN, "report_to=[mlflow]"))  # resumes the same MLflow run
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kdcache").experiment_id])
    assert run.info.run_id == json.loads((out / TRACKER_IDS).read_text())["mlflow"]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    logged: dict[int, dict[str, float]] = {}
    for tag in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, tag):
            assert tag not in logged.get(metric.step, {}), (tag, metric.step)  # no step logged twice
            logged.setdefault(metric.step, {})[tag] = metric.value
    expected = expected_by_step(out)
    assert logged.keys() == expected.keys() and all(logged[s].keys() == expected[s].keys() for s in logged)
    timing = ("_s", "per_s")  # step 3's timings are the killed run's in MLflow, the replay's in metrics.jsonl
    assert {s: {t: v for t, v in tags.items() if not t.endswith(timing)} for s, tags in logged.items()} == \
        {s: {t: v for t, v in tags.items() if not t.endswith(timing)} for s, tags in expected.items()}
    assert sorted(logged) == [1, 2, 3, 4] and "heldout/kd" in logged[4] and "train/grad_norm" in logged[3]


def test_missing_tracker_library_is_one_line_error(tmp_path, sharp_cache, student_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    result = CliRunner().invoke(main, ["train", "--cache", sharp_cache, "--student", student_dir, "--out",
                                       str(tmp_path / "run"), "--max-steps", "1", "--profile", "cpu",
                                       "--no-progress", "--report-to", "tensorboard", "--report-to", "wandb"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "wandb" in line and "pip install 'kdcache[wandb]'" in line
    assert not (tmp_path / "run").exists()  # refused before the run folder, or any model, was made


def test_report_to_takes_the_older_tensorboard_switch():
    from kdcache.config import TrainConfig, from_dict, to_dict

    assert TrainConfig().report_to == ["tensorboard"]
    assert from_dict(TrainConfig, {"tensorboard": False, "report_to": ["tensorboard", "mlflow"]}).report_to == [
        "mlflow"]
    both = from_dict(TrainConfig, {"tensorboard": True, "report_to": ["wandb"]})
    assert both.report_to == ["tensorboard", "wandb"] == from_dict(TrainConfig, to_dict(both)).report_to
    with pytest.raises(Exception, match="report_to"):
        from_dict(TrainConfig, {"report_to": ["neptune"]})
