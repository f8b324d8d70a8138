"""Checkpoints survive a kill at every point of a save, and loading one runs no code."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer import config

from kdcache.errors import BadInputError
from kdcache.train import checkpoint as checkpoint_module
from kdcache.train.checkpoint import TrainState, from_json, read_checkpoint, to_json
from kdcache.train.trainer import train

# LoRA with dropout (the RNG state matters), an evaluation (best/ and TrainState.evals) and three saves: 2, 4, 6.
SETTINGS = ["max_steps=6", "save_every=2", "eval_every=3", "lora.enabled=true", "lora.r=4", "lora.dropout=0.1"]


class Killed(BaseException):
    """What the crash hook raises: like a kill, nothing in kdcache catches it (it is no Exception)."""


def losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def checkpoint_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, sharp_cache, student_dir) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    train(config(sharp_cache, student_dir, out, *SETTINGS))
    return out


def assert_same_run(out: Path, straight: Path) -> None:
    """The same loss curve and the same trained weights, bit for bit, and nothing left of older saves."""
    assert losses(out) == losses(straight)
    reference, resumed = read_checkpoint(straight), read_checkpoint(out)
    assert resumed.state == reference.state
    assert resumed.trainable.keys() == reference.trainable.keys()
    assert all(torch.equal(resumed.trainable[k], reference.trainable[k]) for k in reference.trainable)
    finals = final_weights(out), final_weights(straight)
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[1])
    assert checkpoint_entries(out) == ["checkpoint-000006", "checkpoint.json"]


@pytest.mark.parametrize("point, resumes_at", [
    ("staging", 2),   # the staging folder holds only trainable.safetensors
    ("staged", 2),    # a complete staging folder, not renamed
    ("renamed", 2),   # checkpoint-000004/ is complete but checkpoint.json still names checkpoint-000002/
    ("pointed", 4),   # checkpoint.json names checkpoint-000004/; checkpoint-000002/ is still there
    ("removing", 4),  # checkpoint-000002/ half removed
])
def test_a_kill_at_any_point_of_a_save_resumes_exactly(tmp_path, monkeypatch, sharp_cache, student_dir, straight,
                                                      point, resumes_at):
    out = tmp_path / "run"

    def crash(at: str, path: Path) -> None:  # in the save at step 4 (the first one with something to remove)
        if at == point and ("000004" in path.name or at == "removing"):
            if at == "removing":
                (path / "trainable.safetensors").unlink()  # checkpoint-000002/: a kill in the middle of rmtree
            raise Killed(at)

    monkeypatch.setattr(checkpoint_module, "crash_point", crash)
    with pytest.raises(Killed):
        train(config(sharp_cache, student_dir, out, *SETTINGS))
    monkeypatch.undo()
    assert read_checkpoint(out).state.step == resumes_at
    train(config(sharp_cache, student_dir, out, *SETTINGS))
    assert_same_run(out, straight)


def test_a_full_disk_leaves_no_staging_folder(tmp_path, monkeypatch, sharp_cache, student_dir, straight):
    out = tmp_path / "run"

    def full(at: str, path: Path) -> None:
        if at == "staging" and "000004" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "crash_point", full)
    with pytest.raises(OSError, match="No space left"):
        train(config(sharp_cache, student_dir, out, *SETTINGS))
    monkeypatch.undo()
    assert checkpoint_entries(out) == ["checkpoint-000002", "checkpoint.json"]
    train(config(sharp_cache, student_dir, out, *SETTINGS))
    assert_same_run(out, straight)


class Evil:
    """Unpickled, it creates the marker file: what a checkpoint that runs code would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _legacy(out: Path) -> Path:
    """The run folder's checkpoint turned into kdcache's layout before generations: checkpoint/state.pt (a pickle)."""
    saved = read_checkpoint(out)
    contents = dict(saved.contents, trainable=saved.trainable)
    for rng in contents["rng"]:
        name, key, *rest = rng["numpy"]
        rng["numpy"] = (name, np.asarray(key, dtype=np.uint32), *rest)  # as np.random.get_state() gives it
    folder = out / "checkpoint"
    folder.mkdir()
    torch.save(contents, folder / "state.pt")
    (folder / "trainer_state.json").write_text(json.dumps(saved.state.to_dict()))
    shutil.rmtree(saved.folder)
    (out / "checkpoint.json").unlink()
    return folder


def test_a_checkpoint_from_before_generations_resumes_exactly(tmp_path, sharp_cache, student_dir, straight):
    out = tmp_path / "run"
    train(config(sharp_cache, student_dir, out, *SETTINGS), stop_after_steps=3)  # checkpoint at 2
    _legacy(out)
    assert read_checkpoint(out).state.step == 2
    train(config(sharp_cache, student_dir, out, *SETTINGS))
    assert_same_run(out, straight)  # and checkpoint/ is gone


@pytest.mark.parametrize("target", ["trainable.safetensors", "state.safetensors", "legacy torch.save",
                                    "legacy pickle"])
def test_a_pickle_in_a_checkpoint_is_refused_and_runs_nothing(tmp_path, sharp_cache, student_dir, target):
    out, marker = tmp_path / "run", tmp_path / "marker"
    train(config(sharp_cache, student_dir, out, *SETTINGS), stop_after_steps=2)
    evil = Evil(marker)
    if target.startswith("legacy"):
        folder = _legacy(out)
        if target == "legacy pickle":
            (folder / "state.pt").write_bytes(pickle.dumps(evil))
        else:
            torch.save({"trainable": {}, "loader": evil}, folder / "state.pt")
    else:
        (out / "checkpoint-000002" / target).write_bytes(pickle.dumps(evil))
    with pytest.raises(BadInputError, match="cannot be read") as refused:
        train(config(sharp_cache, student_dir, out, *SETTINGS))
    assert "\n" not in str(refused.value)
    assert not marker.exists()
    pickle.loads(pickle.dumps(evil)).close()  # the marker would have been created, had anything unpickled it
    assert marker.exists()


def test_a_damaged_pointer_is_refused(tmp_path):
    (tmp_path / "checkpoint.json").write_text(json.dumps({"checkpoint": "../elsewhere", "step": 3}))
    with pytest.raises(BadInputError, match="must name a checkpoint-NNNNNN folder"):
        read_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{")
    with pytest.raises(BadInputError, match="checkpoint.json cannot be read"):
        read_checkpoint(tmp_path)


def test_state_round_trips_through_tensors_and_json():
    shared = torch.arange(4.0)
    value = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": shared, "map": shared}},
             "param_groups": [{"betas": (0.9, 0.999), "params": [0, 1], "lr": 1e-3, "t": None}],
             "odd": {"__tuple__": 1}, "rng": (3, tuple(range(5)), None), "scale": float("inf"), "flag": True}
    tensors: dict = {}
    encoded = to_json(value, tensors, "")
    assert sorted(tensors) == ["state.0.exp_avg", "state.0.map", "state.0.step"]
    assert "Tensor" not in json.dumps(encoded)
    decoded = from_json(json.loads(json.dumps(encoded)), tensors)
    assert decoded["param_groups"] == value["param_groups"] and decoded["rng"] == value["rng"]
    assert decoded["odd"] == {"__tuple__": 1} and decoded["scale"] == float("inf") and decoded["flag"] is True
    assert list(decoded["state"]) == [0] and torch.equal(decoded["state"][0]["map"], shared)
    assert checkpoint_module._unshared(tensors)["state.0.map"].data_ptr() != shared.data_ptr()


def test_trainer_state_reads_the_files_it_always_wrote():
    old = {"step": 12, "best": 0.5, "evals_since_best": 1, "evals": [{"step": 10, "heldout_kd": 0.5}]}
    assert TrainState.from_dict(old).to_dict() == old
    assert TrainState.from_dict({}) == TrainState()
    with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
        TrainState.from_dict({"step": -1})
    with pytest.raises(ValueError, match="got \\['steps'\\]"):
        TrainState.from_dict({"steps": 3})
