"""`kdcache export`: the base named by its hub id, --dtype, --no-merge, the model card, and --push-to-hub up to the
upload (the hub client's own offline mode, and the arguments the upload is called with)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_trainer import config

from kdcache.cli import main
from kdcache.errors import BadInputError
from kdcache.train.hub import base_model_id
from kdcache.train.trainer import train


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sharp_cache, student_dir) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train(config(sharp_cache, student_dir, out, "max_steps=2", "eval_every=2", "lora.enabled=true", "lora.r=4",
                 "tensorboard=false"))
    return out


def export(*args: str):
    return CliRunner().invoke(main, ["export", *args])


def test_export_names_the_base_by_hub_id_casts_the_dtype_and_writes_the_card(tmp_path, lora_run, sharp_cache):
    from safetensors import safe_open

    compare = tmp_path / "compare"
    compare.mkdir()
    (compare / "comparison.json").write_text(json.dumps({  # the keys `kdcache compare --out` writes
        "runs": {"A": {"name": "teacher"}, "B": {"name": "student"}}, "retention": {"accuracy": 0.9},
        "rows": [{"title": "Accuracy", "metric": "accuracy", "a": 0.8, "b": 0.72, "difference": -0.08}],
        "criteria": [{"check": "student accuracy >= 0.7", "passed": True}]}))
    out = tmp_path / "merged"
    result = export("--adapter", str(lora_run / "final"), "--out", str(out), "--base-model-id", "org/tiny-student",
                    "--dtype", "bf16", "--compare", str(compare))
    assert result.exit_code == 0, result.output
    assert "(bfloat16); base model org/tiny-student" in result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["base_model_name_or_path"] == "org/tiny-student"
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert {str(weights.get_tensor(name).dtype) for name in weights.keys()} == {"torch.bfloat16"}
    card = (out / "README.md").read_text()
    manifest = json.loads((Path(sharp_cache) / "manifest.json").read_text())
    assert manifest["plan_hash"] and f"plan hash `{manifest['plan_hash']}`" in card  # the cache's fingerprint
    assert f"format v{manifest['format_version']}" in card and manifest["teacher"]["model"] in card
    assert "base_model: org/tiny-student\n" in card and "bfloat16 weights" in card
    assert "- loss `" in card and "- steps: 2" in card
    assert "| Accuracy | 0.8 | 0.72 | -0.08 |" in card and "accuracy 90.0%" in card and "1 of 1 hold" in card


def test_export_without_a_hub_id_keeps_local_paths_out_of_the_metadata(tmp_path, lora_run, student_dir):
    result = export("--adapter", str(lora_run / "best"), "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    assert "no hub id found: pass --base-model-id" in result.output and "(float32)" in result.output
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "base_model:" not in card and student_dir in card  # named in the text, not as hub metadata
    assert "base_model_name_or_path" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_no_merge_exports_the_adapter_naming_its_base_by_hub_id(tmp_path, lora_run):
    out = tmp_path / "adapter"
    result = export("--adapter", str(lora_run / "final"), "--out", str(out), "--no-merge", "--base-model-id",
                    "org/tiny-student")
    assert result.exit_code == 0, result.output
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "org/tiny-student"
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert "library_name: peft" in (out / "README.md").read_text()
    refused = export("--adapter", str(lora_run / "final"), "--out", str(tmp_path / "x"), "--no-merge", "--dtype",
                     "bf16")
    assert refused.exit_code == 2 and "--dtype" in refused.output


def test_base_model_id_is_found_where_it_can_be_known(tmp_path, student_dir):
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-1.5B" / "snapshots" / "0123abcd"
    shutil.copytree(student_dir, snapshot)
    assert base_model_id(str(snapshot)) == "Qwen/Qwen2.5-1.5B"  # a hub cache path
    assert base_model_id("distilgpt2") == "distilgpt2"  # a hub id (no such local folder)
    assert base_model_id(student_dir) is None  # a plain local folder says nothing
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"student": "google/gemma-2b"}))
    assert base_model_id(student_dir, run) == "google/gemma-2b"  # the run's student, named by id
    older = tmp_path / "older"
    shutil.copytree(student_dir, older)
    saved = json.loads((older / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({**saved, "_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    assert base_model_id(str(older)) == "HuggingFaceTB/SmolLM2-135M"  # what older transformers wrote
    assert base_model_id(student_dir, None, "me/student") == "me/student"
    with pytest.raises(BadInputError, match="--base-model-id must be a hub model id"):
        base_model_id(student_dir, None, "/abs/path")


def test_push_to_hub_offline_is_one_clear_line(tmp_path, lora_run, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "merged"
    result = export("--adapter", str(lora_run / "final"), "--out", str(out), "--push-to-hub", "me/student")
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "cannot push to the hub repo me/student: HF_HUB_OFFLINE is set" in line and "hf upload me/student" in line
    assert (out / "README.md").exists() and (out / "model.safetensors").exists()  # the export itself is complete


def test_push_to_hub_uploads_the_exported_folder(tmp_path, lora_run, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or
                        type("Commit", (), {"commit_url": "https://huggingface.co/me/student/commit/1"})())
    out = tmp_path / "merged"
    result = export("--adapter", str(lora_run / "final"), "--out", str(out), "--push-to-hub", "me/student",
                    "--private")
    assert result.exit_code == 0, result.output
    assert calls[0] == ("create", "me/student", {"repo_type": "model", "private": True, "exist_ok": True})
    upload = calls[1][1]
    assert (upload["folder_path"], upload["repo_id"], upload["repo_type"]) == (str(out), "me/student", "model")
    assert "pushed" in result.output and "commit/1" in result.output
    bad = export("--adapter", str(lora_run / "final"), "--out", str(tmp_path / "x"), "--push-to-hub", "not a repo")
    assert bad.exit_code == 2 and "--push-to-hub must be a hub repo id" in bad.output
    assert not (tmp_path / "x").exists()  # refused before any export work
