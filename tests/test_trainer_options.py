"""Trainer options beyond the core loop: TensorBoard scalars, bitsandbytes' 8-bit AdamW and QLoRA (nf4 base).

bitsandbytes >= 0.50 runs both on the CPU, so they are trained here for real; where it is not installed those tests
are skipped and only the refusals are checked.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_trainer import config

from kdcache.cli import main
from kdcache.errors import BadInputError
from kdcache.train import student as student_module
from kdcache.train.checkpoint import read_checkpoint
from kdcache.train.trackers import TensorBoardTracker
from kdcache.train.trainer import train


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(out) if "loss" in r]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard log folder, read back the way TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def bitsandbytes_or_skip() -> None:
    pytest.importorskip("bitsandbytes")
    if not student_module._bitsandbytes_runs_on_cpu("adamw_8bit"):
        pytest.skip("the installed bitsandbytes cannot run on the CPU")


# ---------------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_the_metrics_scalars(tmp_path, sharp_cache, student_dir):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(config(sharp_cache, student_dir, out, "max_steps=4", "eval_every=2", "loss.alpha=0.5"))
    logged = scalars(out / "tensorboard")
    for tag in ("train/loss", "train/kd", "train/ce", "train/lr", "train/tokens_per_s", "train/grad_norm",
                "heldout/kd", "heldout/forward_kl", "heldout/top1_agreement"):
        assert tag in logged, sorted(logged)
    lines = records(out)
    for tag, key in (("train/loss", "loss"), ("train/grad_norm", "grad_norm"), ("train/lr", "lr"),
                     ("heldout/kd", "heldout_kd"), ("heldout/top1_agreement", "heldout_top1_agreement")):
        expected = [(r["step"], r[key]) for r in lines if key in r]
        assert [step for step, _ in logged[tag]] == [step for step, _ in expected], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in expected], rel=1e-6), tag  # float32
    assert [step for step, _ in logged["heldout/kd"]] == [2, 4]


def test_tensorboard_curve_has_no_doubles_after_kill_and_resume(tmp_path, sharp_cache, student_dir):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    settings = ["max_steps=6", "save_every=2", "eval_every=100"]
    train(config(sharp_cache, student_dir, out, *settings), stop_after_steps=3)  # steps 1-3 logged, checkpoint at 2
    train(config(sharp_cache, student_dir, out, *settings))
    logged = scalars(out / "tensorboard")["train/loss"]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in logged] == pytest.approx([v for _, v in losses(out)], rel=1e-6)


def test_missing_tensorboard_warns_once_and_trains(tmp_path, sharp_cache, student_dir, monkeypatch,
                                                    caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now raises ImportError
    monkeypatch.setattr(TensorBoardTracker, "warned_missing", False)
    with caplog.at_level(logging.WARNING, logger="kdcache.train.trackers"):
        for name in ("a", "b"):  # e.g. two runs of an ablation in one process
            result = train(config(sharp_cache, student_dir, tmp_path / name, "max_steps=1"))
            assert result.step == 1
    warnings = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(warnings) == 1 and "pip install tensorboard" in warnings[0]
    assert not (tmp_path / "a" / "tensorboard").exists()


def test_tensorboard_false_writes_no_events(tmp_path, sharp_cache, student_dir):
    train(config(sharp_cache, student_dir, tmp_path / "run", "max_steps=1", "tensorboard=false"))
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------- 8-bit AdamW


def test_adamw_8bit_trains_with_8bit_states_and_resumes_exactly(tmp_path, sharp_cache, student_dir):
    bitsandbytes_or_skip()
    settings = ["optimizer=adamw_8bit", "max_steps=8", "save_every=3", "eval_every=100"]
    train(config(sharp_cache, student_dir, tmp_path / "straight", *settings))
    train(config(sharp_cache, student_dir, tmp_path / "resumed", *settings), stop_after_steps=5)
    train(config(sharp_cache, student_dir, tmp_path / "resumed", *settings))
    straight = losses(tmp_path / "straight")
    resumed = losses(tmp_path / "resumed")
    assert [s for s, _ in resumed] == [s for s, _ in straight]  # pytest >= 9.2 refuses approx of nested tuples
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], rel=1e-6, abs=1e-7)
    assert straight[-1][1] < 0.8 * straight[0][1]  # it does train
    saved = read_checkpoint(tmp_path / "straight").contents
    states = [v.get("__bnb_optimizer_quant_state__", v) for v in saved["optimizer"]["state"].values()]
    dtypes = {state["state1"].dtype for state in states}
    assert torch.uint8 in dtypes, dtypes  # the large tensors' Adam moments are stored in 8 bits


def test_adamw_8bit_without_bitsandbytes_is_refused(tmp_path, sharp_cache, student_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    result = CliRunner().invoke(main, ["train", "--cache", sharp_cache, "--student", student_dir, "--out",
                                       str(tmp_path / "run"), "--profile", "cpu", "--no-progress",
                                       "--set", "optimizer=adamw_8bit"])
    assert result.exit_code == 2, result.output
    assert "optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes" in result.output
    assert "Traceback" not in result.output


def test_bitsandbytes_without_cpu_support_is_refused(tmp_path, sharp_cache, student_dir, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(student_module, "_bitsandbytes_runs_on_cpu", lambda feature: False)
    with pytest.raises(BadInputError, match="cannot run on the CPU; run on a GPU with profile=t4"):
        train(config(sharp_cache, student_dir, tmp_path / "a", "optimizer=adamw_8bit"))
    with pytest.raises(BadInputError, match="lora.quantize=4bit .QLoRA.: the installed bitsandbytes .* profile=t4"):
        train(config(sharp_cache, student_dir, tmp_path / "b", "lora.enabled=true", "lora.quantize=4bit"))


# ---------------------------------------------------------------------------------------------------- QLoRA


def test_qlora_student_has_an_nf4_base_and_fp32_adapters(sharp_cache, student_dir):
    bitsandbytes_or_skip()
    import bitsandbytes as bnb

    from kdcache.config import LoraConfig
    from kdcache.train.student import load_student, resolve_precision

    model = load_student(student_dir, resolve_precision("cpu", False), LoraConfig(r=4, quantize="4bit"), 384)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7  # q, k, v, o, gate, up, down of the one layer
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_type == "nf4" for m in quantized)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())


def test_qlora_trains_close_to_lora_on_its_4bit_base(tmp_path, sharp_cache, student_dir):
    bitsandbytes_or_skip()
    settings = ["lora.enabled=true", "lora.r=8", "max_steps=8", "eval_every=4", "lr=1e-2"]
    train(config(sharp_cache, student_dir, tmp_path / "qlora", *settings, "lora.quantize=4bit"))
    train(config(sharp_cache, student_dir, tmp_path / "lora", *settings))
    qlora, lora = losses(tmp_path / "qlora"), losses(tmp_path / "lora")
    assert qlora[0][1] != lora[0][1]  # step 1 runs the same batch through the nf4 base: not the same numbers...
    assert [v for _, v in qlora] == pytest.approx([v for _, v in lora], rel=0.01)  # ...but close to them
    heldout = [r["heldout_kd"] for r in records(tmp_path / "qlora") if "heldout_kd" in r]
    assert heldout[1] < heldout[0] < qlora[0][1]  # it learns
    assert (tmp_path / "qlora" / "final" / "adapter_config.json").exists()
    saved = read_checkpoint(tmp_path / "qlora")
    assert saved.trainable and all("lora_" in name for name in saved.trainable)


def test_qlora_needs_lora(tmp_path, sharp_cache, student_dir):
    with pytest.raises(BadInputError, match="set lora.enabled=true"):
        train(config(sharp_cache, student_dir, tmp_path / "run", "lora.quantize=4bit"))


def test_qlora_without_bitsandbytes_is_refused(tmp_path, sharp_cache, student_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(BadInputError, match=r"lora.quantize=4bit \(QLoRA\) needs bitsandbytes: pip install"):
        train(config(sharp_cache, student_dir, tmp_path / "run", "lora.enabled=true", "lora.quantize=4bit"))
