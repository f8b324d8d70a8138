"""The tiny TinyLlama -> FLAN-T5 recipe (jobs/distillm-flan-t5/tiny) end to end: a Llama-config teacher with a BPE
tokenizer and a T5-config student with a unigram tokenizer, both built here; cache build, cross-tokenizer
distillation (DistiLLM's skew forward KL through TRL GOLD's vocabulary map, unmapped entries by ULD, + hard labels),
and held-out generation scored with BLEU and ROUGE-L."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kdcache.config import CacheBuildConfig, EvalConfig, TrainConfig, load_config
from kdcache.eval.runner import run_eval
from kdcache.teacher.build import build_cache
from kdcache.train.trainer import train

RECIPE = Path(__file__).resolve().parent.parent / "jobs" / "distillm-flan-t5" / "tiny"


def test_tiny_recipe_runs_and_beats_the_untrained_student(tmp_path):
    spec = importlib.util.spec_from_file_location("make_models", RECIPE / "make_models.py")
    make_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_models)
    made = make_models.main(str(tmp_path / "models"), teacher_steps=60, train_rows=60)  # 60 rows cached, 60 held out
    build_cache(load_config(CacheBuildConfig, RECIPE / "cache.yaml", [
        f"teacher.model={made['teacher']}", f"output={tmp_path / 'cache'}", f"data.paths=[{made['train']}]",
        "progress=false"]))
    result = train(load_config(TrainConfig, RECIPE / "train.yaml", [
        f"cache={tmp_path / 'cache'}", f"student={made['student']}", f"out={tmp_path / 'run'}", "progress=false",
        "tensorboard=false"]))
    assert result.step == 150 and result.evals[-1]["heldout_kd"] < result.evals[0]["heldout_kd"] + 1e-9

    def scores(model: str, out: str) -> dict:
        config = load_config(EvalConfig, RECIPE / "eval.yaml", [f"model={model}", f"out={tmp_path / out}",
                                                                 f"data=[{made['heldout']}]", "warmup=false",
                                                                 "limit=30", "batch_size=15"])
        return run_eval(config).metrics["generation"]

    before, after = scores(made["student"], "eval-untrained"), scores(str(tmp_path / "run" / "final"), "eval-final")
    assert after["rouge_l"] > before["rouge_l"] + 0.1 or after["bleu"] > before["bleu"] + 0.05, (before, after)
