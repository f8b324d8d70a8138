"""The trainer distills from the cache alone, resumes exactly, and refuses what does not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.config import TrainConfig, load_config
from kdcache.errors import CacheFormatError, IncompatibleCacheError
from kdcache.tiny import build_qwen2, build_tokenizer, save_model
from kdcache.train.trainer import train


def config(cache, student, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"cache={cache}", f"student={student}", f"out={out}", "profile=cpu", "batch_size=4", "lr=3e-3",
        "lora.enabled=false", "heldout_fraction=0.25", "eval_every=10", "save_every=10", "chunk_size=64",
        "loss.alpha=0.0", "progress=false", *overrides])


def test_short_run_lowers_heldout_kd_and_raises_agreement(tmp_path, sharp_cache, student_dir):
    result = train(config(sharp_cache, student_dir, tmp_path / "run", "max_steps=40", "eval_every=1000"))
    assert result.step == 40
    from kdcache.train.loader import CacheDataset
    from kdcache.train.losses import LossConfig
    from kdcache.train.student import load_student, resolve_precision
    from kdcache.train.trainer import evaluate
    from kdcache.config import LoraConfig

    precision = resolve_precision("cpu", True)
    heldout = CacheDataset(sharp_cache, split="heldout", heldout_fraction=0.25, batch_size=4, shuffle=False)
    before = evaluate(load_student(student_dir, precision, LoraConfig(enabled=False), heldout.vocab_size),
                      heldout, LossConfig(alpha=0.0), precision, 64)
    after = evaluate(load_student(str(tmp_path / "run" / "final"), precision, LoraConfig(enabled=False),
                                  heldout.vocab_size), heldout, LossConfig(alpha=0.0), precision, 64)
    assert after["heldout_kd"] < 0.8 * before["heldout_kd"], (before, after)
    assert after["heldout_top1_agreement"] > before["heldout_top1_agreement"] + 0.05, (before, after)


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def test_kill_and_resume_reproduces_the_loss_curve(tmp_path, sharp_cache, student_dir):
    overrides = ["max_steps=8", "save_every=3", "eval_every=4", "lora.enabled=true", "lora.r=4",
                 "lora.dropout=0.1"]
    train(config(sharp_cache, student_dir, tmp_path / "straight", *overrides))
    first = train(config(sharp_cache, student_dir, tmp_path / "resumed", *overrides), stop_after_steps=5)
    assert first.step == 5 and not (tmp_path / "resumed" / "final").exists()
    train(config(sharp_cache, student_dir, tmp_path / "resumed", *overrides))  # resumes from the step-3 checkpoint
    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert [s for s, _ in resumed] == list(range(1, 9))
    assert [s for s, _ in resumed] == [s for s, _ in straight]  # pytest >= 9.2 refuses approx of nested tuples
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], rel=1e-6, abs=1e-7)


def test_student_with_another_tokenizer_is_refused(tmp_path, sharp_cache):
    other = build_tokenizer(["entirely different words for another vocabulary"] * 20, vocab_size=300)
    folder = save_model(build_qwen2(len(other), hidden_size=32, layers=1, heads=2), other, tmp_path / "other")
    with pytest.raises(IncompatibleCacheError, match="was built with tokenizer"):
        train(config(sharp_cache, folder, tmp_path / "run", "max_steps=1"))


def test_corrupt_shard_met_during_training_is_named(tmp_path, sharp_cache, student_dir):
    copy = tmp_path / "cache"
    shutil.copytree(sharp_cache, copy)
    shutil.rmtree(copy / "shards" / "00002" / "tokens.zarr")
    result = CliRunner().invoke(main, ["train", "--cache", str(copy), "--student", student_dir, "--out",
                                       str(tmp_path / "run"), "--max-steps", "20", "--profile", "cpu",
                                       "--no-progress", "--set", "lora.enabled=false"])
    assert result.exit_code == 2, result.output
    assert "shard 00002" in result.output and "cannot be read" in result.output
    with pytest.raises(CacheFormatError, match="shard 00002"):
        train(config(str(copy), student_dir, tmp_path / "run2", "max_steps=20"))


def test_export_merges_a_lora_adapter(tmp_path, sharp_cache, student_dir):
    train(config(sharp_cache, student_dir, tmp_path / "run", "max_steps=2", "lora.enabled=true", "lora.r=4"))
    result = CliRunner().invoke(main, ["export", "--adapter", str(tmp_path / "run" / "final"), "--out",
                                       str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir),
                                        tmp_path / "run" / "final").eval()
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


def test_ablation_grid_writes_one_row_per_run(tmp_path, sharp_cache, student_dir):
    import csv

    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"base: {{student: {student_dir}, profile: cpu, batch_size: 4, max_steps: 2, eval_every: 2, save_every: 2,\n"
        "       heldout_fraction: 0.25, lora: {enabled: true, r: 2}, progress: false}\n"
        "grid:\n  loss.kind: [forward_kl, reverse_kl]\n  loss.top_k: [4, 32]\n")
    result = CliRunner().invoke(main, ["ablate", "--cache", sharp_cache, "--grid", str(grid), "--out",
                                       str(tmp_path / "abl")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "abl" / "ablation.csv")))
    assert sorted((r["loss.kind"], r["loss.top_k"]) for r in rows) == [
        ("forward_kl", "32"), ("forward_kl", "4"), ("reverse_kl", "32"), ("reverse_kl", "4")]
    assert all(float(r["heldout_forward_kl"]) > 0 and r["steps"] == "2" for r in rows)
    saved = json.loads((tmp_path / "abl" / "run-001" / "train_config.json").read_text())
    assert saved["loss"]["kind"] == "forward_kl" and saved["loss"]["top_k"] == 32
    assert "| run |" in (tmp_path / "abl" / "ablation.md").read_text()


def test_a_grid_point_the_cache_cannot_serve_is_refused_before_any_point_trains(tmp_path, sharp_cache, student_dir):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"base: {{student: {student_dir}, profile: cpu, batch_size: 4, max_steps: 2, progress: false}}\n"
        "grid:\n  loss.temperature: [1.0, 3.5]\n")  # 3.5 is not among the cache's tail temperatures
    result = CliRunner().invoke(main, ["ablate", "--cache", sharp_cache, "--grid", str(grid), "--out",
                                       str(tmp_path / "abl")])
    assert result.exit_code == 2, result.output
    assert "grid point run-001 (temperature=3.5)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "abl" / "run-000").exists()  # the point the cache can serve did not train first


def test_shipped_train_job_specs_parse():
    from conftest import REPO

    for job in sorted((REPO / "jobs").glob("train-*.yaml")):
        load_config(TrainConfig, job)
