"""The tiny Gemma-7B -> 2B SQuAD recipe (jobs/squad-gemma-7b-to-2b/tiny) end to end, through the CLI as its README
says: Gemma-config teacher and student built here, a cache with the teacher's projected hidden states, LoRA training
with CE + KL + hidden MSE, `kdcache export` (merge), and generation on held-out rows scored with EM/F1, latency,
throughput and peak memory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.store.reader import CacheReader
from kdcache.store.verify import verify_cache
from kdcache.train.hidden import PROJECTOR_FILE

RECIPE = Path(__file__).resolve().parent.parent / "jobs" / "squad-gemma-7b-to-2b" / "tiny"


def kdcache(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, (args, result.output[-3000:], result.exception)
    return result.output


@pytest.mark.slow
def test_tiny_gemma_recipe_runs_and_beats_the_untrained_student(tmp_path):
    spec = importlib.util.spec_from_file_location("make_models", RECIPE / "make_models.py")
    make_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_models)
    made = make_models.main(str(tmp_path / "models"), teacher_steps=80)
    rows = [json.loads(line) for line in Path(made["train"]).read_text().splitlines()]
    assert rows and all(r["answer"] in r["context"] for r in rows)  # SQuAD-style: the answer is a span

    cache, run, merged = tmp_path / "cache", tmp_path / "run", tmp_path / "merged"
    kdcache("cache", "build", "--config", str(RECIPE / "cache.yaml"), "--teacher", made["teacher"],
            "--output", str(cache), "--data", made["train"])
    info = CacheReader(str(cache)).manifest.hidden
    assert info.layers == (2, 4) and info.dim == 32 and info.reduction == "random"
    assert verify_cache(str(cache)).ok

    kdcache("train", "--config", str(RECIPE / "train.yaml"), "--cache", str(cache), "--student", made["student"],
            "--out", str(run))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["step"] == 120 and all({"ce", "kd", "hidden"} <= r.keys() for r in steps)
    evals = [r["heldout_hidden_mse"] for r in records if "heldout_hidden_mse" in r]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals
    assert (run / "final" / "adapter_config.json").exists() and (run / "final" / PROJECTOR_FILE).exists()

    kdcache("export", "--adapter", str(run / "final"), "--out", str(merged))
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    assert not (merged / PROJECTOR_FILE).exists()

    def scores(model: str, out: str) -> dict:
        kdcache("eval", "--config", str(RECIPE / "eval.yaml"), "--model", model, "--data", made["heldout"],
                "--out", str(tmp_path / out), "--no-warmup")
        metrics = json.loads((tmp_path / out / "metrics.json").read_text())
        speed = metrics["speed"]
        assert speed["latency_mean_s"] > 0 and speed["latency_p95_s"] > 0 and speed["throughput_per_s"] > 0
        assert "peak_gpu_memory_bytes" in speed  # null on CPU
        return metrics["generation"]

    before, after = scores(made["student"], "eval-untrained"), scores(str(merged), "eval-merged")
    for figures in (before, after):
        assert 0 <= figures["exact_match"] <= 1 and 0 <= figures["token_f1"] <= 1
    # The untrained student writes byte junk (0 EM); the distilled one answers with the right kind of span (a city,
    # a year, a job) and stops, right about one time in six on these held-out rows (its teacher: one in ten).
    assert after["exact_match"] > before["exact_match"] and after["token_f1"] > before["token_f1"] + 0.05, (before,
                                                                                                           after)
