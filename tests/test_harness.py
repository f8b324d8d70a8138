"""`kdcache export-harness`: the task files it writes, and lm-evaluation-harness running them on a tiny local model
with the same per-example scores, generations and metrics as `kdcache eval` (no downloads)."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import upsc_rows

from kdcache.cli import main
from kdcache.config import EvalConfig
from kdcache.errors import BadInputError
from kdcache.eval import metrics as M
from kdcache.eval.harness import export_harness_task
from kdcache.eval.runner import run_eval

LABELS = ["GS1", "GS2", "GS3", "GS4", "none"]
PROMPT = "Title: {title}\nArticle: {text}\nWhich GS paper?"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """6 golden rows, text cut to 10 words, with a reference list (2 references, or 1) for generation."""
    path = tmp_path_factory.mktemp("harness-data") / "six.jsonl"
    rows = [{**r, "text": " ".join(r["text"].split()[:10]),
             "answers": [r["title"], r["gs_paper"]] if i % 2 else [r["title"]]} for i, r in enumerate(upsc_rows(6))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(data: str, **kwargs) -> EvalConfig:
    base = dict(data=[data], prompt=PROMPT, chat="no", device="cpu", progress=False, plots=False, warmup=False,
                batch_size=1)
    if kwargs.get("mode") == "generate":
        base["label_field"] = "answers"
    else:
        base.update(labels=LABELS, label_field="gs_paper")
    return EvalConfig(**{**base, **kwargs})


def test_export_writes_the_harness_schema(tmp_path, data):
    score = export_harness_task(_config(data), tmp_path, "kd_score")
    spec = yaml.safe_load(score.yaml_path.read_text())
    # lm-evaluation-harness' task schema (docs/task_guide.md): a local JSON dataset, prompt and gold from fields
    assert spec["task"] == "kd_score" and spec["output_type"] == "multiple_choice"
    assert spec["dataset_path"] == "json" and spec["test_split"] == "test"
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(score.data_path) and score.data_path.is_absolute()
    assert spec["doc_to_text"] == "prompt" and spec["doc_to_target"] == "gold" and spec["doc_to_choice"] == LABELS
    assert spec["target_delimiter"] == " " and spec["metric_list"][0]["metric"] == "acc"
    rows = [json.loads(line) for line in score.data_path.read_text().splitlines()]
    first = upsc_rows(1)[0]
    assert len(rows) == score.n == 6 and rows[0]["gold"] == LABELS.index(first["gs_paper"])
    assert rows[0]["prompt"].startswith(f"Title: {first['title']}\nArticle: ") and rows[0]["prompt"].endswith("?")

    gen = export_harness_task(_config(data, mode="generate", max_new_tokens=5, bleu_smoothing="floor"), tmp_path,
                              "kd_gen")
    text = gen.yaml_path.read_text()
    assert "!function 'kdcache_harness.process_results'" in text and "!function 'kdcache_harness.bleu'" in text
    assert "BLEU_SMOOTHING = 'floor'" in (tmp_path / "kdcache_harness.py").read_text()
    rows = [json.loads(line) for line in gen.data_path.read_text().splitlines()]
    # every example gets as many references (the harness' corpus metrics need it): the first is repeated
    assert rows[0]["references"] == [first["title"]] * 2 and len({len(r["references"]) for r in rows}) == 1

    with pytest.raises(BadInputError, match="task name"):
        export_harness_task(_config(data), tmp_path, "bad name")
    with pytest.raises(BadInputError, match="label strings"):
        export_harness_task(_config(data, labels=[]), tmp_path, "x")


def test_export_harness_command(tmp_path, data):
    result = CliRunner().invoke(main, ["export-harness", "--data", data, "--prompt", PROMPT, "--label-field",
                                       "gs_paper", *[a for label in LABELS for a in ("--labels", label)],
                                       "--out", str(tmp_path / "tasks"), "--task", "upsc_gs", "--limit", "4"])
    assert result.exit_code == 0, result.output
    assert "multiple_choice task 'upsc_gs' (4 examples)" in result.output and "--apply_chat_template" in result.output
    assert f"--include_path {tmp_path / 'tasks'} --tasks upsc_gs" in result.output
    bad = CliRunner().invoke(main, ["export-harness", "--data", data, "--out", str(tmp_path), "--task", "a/b"])
    assert bad.exit_code == 2 and "task name" in bad.output


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 1-layer Qwen2 whose LM head only gives weight to ' word' tokens, so greedy answers are words."""
    import torch

    from kdcache.tiny import build_qwen2, build_tokenizer, save_model

    rows = upsc_rows(12)
    tokenizer = build_tokenizer([f"{r['title']} {r['text']} {r['gs_paper']}" for r in rows], vocab_size=320)
    model = build_qwen2(len(tokenizer), hidden_size=32, layers=1, heads=2, seed=3, tie_embeddings=False)
    with torch.no_grad():
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id])
            if not (text.startswith(" ") and text[1:].isalpha()):
                model.lm_head.weight[token_id] = 0.0
        model.lm_head.weight.mul_(8.0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("harness-model"))


@pytest.mark.slow
def test_harness_runs_the_exported_tasks_like_kdcache_eval(tmp_path, data, tiny_model, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    score_config = _config(data, model=tiny_model, out=str(tmp_path / "eval-score"))
    scored = run_eval(score_config)
    gen_config = _config(data, model=tiny_model, out=str(tmp_path / "eval-gen"), mode="generate", max_new_tokens=6)
    generated = run_eval(gen_config)
    texts = [p["generated"] for p in generated.predictions]
    assert any(t.strip() for t in texts)
    # references that the answers partly match, so every metric is away from 0 and 1: the generation itself, its
    # first word, or the title
    rows = [json.loads(line) for line in open(data)]
    for i, (row, text) in enumerate(zip(rows, texts)):
        row["answers"] = [[text], [text.split()[0] if text.split() else "x", row["title"]], [row["title"]]][i % 3]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen_config = _config(str(mixed), mode="generate", max_new_tokens=6)
    expected = M.generation_metrics(texts, [r["answers"] for r in rows])
    assert 0 < expected["exact_match"] < 1 and 0 < expected["bleu"] < 1 and 0 < expected["rouge_l"] < 1

    tasks = tmp_path / "tasks"
    export_harness_task(score_config, tasks, "kd_score")
    export_harness_task(gen_config, tasks, "kd_gen")
    out = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model},dtype=float32", tasks=["kd_score", "kd_gen"],
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False), device="cpu",
                          batch_size=1, log_samples=True, bootstrap_iters=0)
    results, samples = out["results"], out["samples"]

    # label scoring: the same log-likelihood for every (example, label), so the same accuracy
    assert results["kd_score"]["acc,none"] == pytest.approx(scored.metrics["accuracy"])
    by_doc = sorted(samples["kd_score"], key=lambda s: s["doc_id"])
    for sample, prediction in zip(by_doc, scored.predictions):
        harness = [loglik for loglik, _ in sample["filtered_resps"]]
        assert harness == pytest.approx([prediction[f"loglik_{label}"] for label in LABELS], abs=1e-4)
    # generation: the same greedy answers, and kdcache's metrics over them
    answers = [s["filtered_resps"][0] for s in sorted(samples["kd_gen"], key=lambda s: s["doc_id"])]
    assert answers == texts
    for name in ("exact_match", "token_f1", "rouge_l", "bleu", "chrf"):
        assert results["kd_gen"][f"{name},none"] == pytest.approx(expected[name], rel=1e-9), name
