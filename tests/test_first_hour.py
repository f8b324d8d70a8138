"""The first hour's traps: missing folders named as such, eval with the cache's own prompt, literal backslash-n
warnings, YAML booleans for yes/no keys, `cache diff` when nothing is compared, transformers' progress bars kept
quiet, and docs/config.md kept current."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner
from conftest import PROMPT, REPO, make_config

from kdcache.cli import main
from kdcache.config import CacheBuildConfig, EvalConfig, TrainConfig, load_config
from kdcache.errors import BadInputError


# ------------------------------------------------------------------------------------------ missing model folders


@pytest.mark.parametrize("name", ["storage/models/tiny-student", "./student", "/nowhere/student", "student/"])
def test_a_missing_local_folder_says_folder_not_found(name):
    from kdcache.modeling import check_model_source

    with pytest.raises(BadInputError, match=f"student folder not found: {name}"):
        check_model_source(name, "student")


def test_a_hub_id_is_left_to_transformers():
    from kdcache.modeling import check_model_source, looks_like_local_path

    check_model_source("Qwen/Qwen2.5-1.5B-Instruct")  # no error here: it may be in the hub cache
    assert not looks_like_local_path("Qwen/Qwen2.5-1.5B-Instruct") and not looks_like_local_path("gpt2")


def test_train_with_a_missing_student_folder_says_so_and_makes_no_run_folder(tmp_path, sharp_cache):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--cache", sharp_cache, "--student", "storage/models/tiny-student",
                                       "--out", str(out), "--no-progress"])
    assert result.exit_code == 2
    assert "student folder not found: storage/models/tiny-student" in result.output
    assert "Repo id" not in result.output and not out.exists()


def test_cache_build_with_a_missing_teacher_folder_says_so(tmp_path, data_file):
    result = CliRunner().invoke(main, ["cache", "build", "--teacher", "storage/demo/teacher", "--data", data_file,
                                       "--output", str(tmp_path / "cache"), "--no-progress"])
    assert result.exit_code == 2
    assert "teacher folder not found: storage/demo/teacher" in result.output and "kdcache demo" in result.output


# ------------------------------------------------------------------------------------ eval with the cache's prompt


def test_eval_settings_come_from_the_cache_plan(sharp_cache):
    from kdcache.eval.from_cache import eval_settings_from_cache

    settings = eval_settings_from_cache(sharp_cache)
    plan = json.loads((REPO / sharp_cache / "plan.json").read_text())
    assert settings == {"prompt": PROMPT, "system": None,
                        "chat": "yes" if plan["template"]["chat_template_used"] else "no",
                        "label_prefix": " ", "label_field": "gs_paper"}


@pytest.mark.parametrize("target, expected", [
    (" {gs_paper}", (" ", "gs_paper")), ("{label}", ("", "label")), ("Answer: {a} ({b})", ("Answer: ", None)),
    ("{a}.", ("", None)), ("constant", ("", None)), ("{row[0]}", ("", None))])
def test_target_prefix_and_field(target, expected):
    from kdcache.eval.from_cache import target_prefix_and_field

    assert target_prefix_and_field(target) == expected


def test_eval_from_cache_scores_the_trained_prompt_and_options_still_override(tmp_path, sharp_cache, teacher_dir,
                                                                               data_file):
    out = tmp_path / "eval"
    args = ["eval", "--from-cache", sharp_cache, "--model", teacher_dir, "--data", data_file, "--labels", "GS1",
            "--labels", "GS2", "--labels", "none", "--limit", "3", "--no-plots", "--no-progress", "--no-warmup",
            "--label-prefix", "  "]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "metrics.json").read_text())["run"]
    assert run["prompt"] == PROMPT and "\n" in run["prompt"] and run["label_field"] == "gs_paper"
    assert run["label_prefix"] == "  "  # given on the command line: it wins over the cache's " "
    speed = json.loads((out / "metrics.json").read_text())["speed"]
    assert speed["wall_s"] >= speed["total_s"] > 0 and speed["prompt_tokens_per_s"] > 0
    assert "wall time" in result.output


def test_a_literal_backslash_n_in_a_template_is_warned_about(caplog):
    from kdcache.data.templates import warn_literal_newlines

    with caplog.at_level(logging.WARNING):
        assert warn_literal_newlines(prompt="Title: {title}\\nWhich paper?", target=" {gs_paper}") == ["prompt"]
    assert "literal backslash-n" in caplog.text and "$'" in caplog.text
    assert warn_literal_newlines(prompt="Title: {title}\nWhich paper?", system=None) == []


def test_eval_help_shows_no_single_quoted_backslash_n():
    for command in (["eval", "--help"], ["cache", "build", "--help"]):
        text = CliRunner().invoke(main, command).output
        assert not any("'" in line and "\\n" in line and "$'" not in line for line in text.splitlines()), text


# --------------------------------------------------------------------------------------------- YAML yes/no values


@pytest.mark.parametrize("raw, expected", [("no", "no"), ("yes", "yes"), ("false", "no"), ("true", "yes"),
                                           ("auto", "auto"), ("'no'", "no")])
def test_template_chat_accepts_yaml_booleans(raw, expected):
    assert load_config(CacheBuildConfig, None, [f"template.chat={raw}"]).template.chat == expected
    assert load_config(EvalConfig, None, [f"chat={raw}"]).chat == expected


def test_a_yaml_boolean_is_still_refused_where_the_choices_are_not_yes_no():
    with pytest.raises(BadInputError, match="template.distill"):
        load_config(CacheBuildConfig, None, ["template.distill=no"])


# ------------------------------------------------------------------------------------------ cache diff, nothing


def test_cache_diff_says_when_nothing_was_compared(tmp_path, teacher_dir, data_file):
    from kdcache.teacher.build import build_cache

    a, b = tmp_path / "a", tmp_path / "b"
    built = build_cache(make_config(a, teacher_dir, data_file, "data.limit=4"))
    assert built.wall_s > 0 and built.tokens_written == built.manifest.counts.num_tokens > 0
    assert built.targets_written == built.manifest.counts.num_targets and built.tokens_per_s > 0
    # the same rows under another prompt: every example is in both, none with the same tokens
    build_cache(make_config(b, teacher_dir, data_file, "data.limit=4", 'template.prompt="Article: {text}"'))
    result = CliRunner().invoke(main, ["cache", "diff", str(a), str(b)])
    assert result.exit_code == 1
    assert "NOTHING COMPARED" in result.output and "other tokens" in result.output
    assert "top-1 agreement" not in result.output and "logprob diff" not in result.output
    report = json.loads(CliRunner().invoke(main, ["cache", "diff", str(a), str(b), "--json"]).output)
    assert report["nothing_compared"] is True and report["agrees"] is False
    same = json.loads(CliRunner().invoke(main, ["cache", "diff", str(a), str(a), "--json"]).output)
    assert same["nothing_compared"] is False and same["agrees"] is True


# ----------------------------------------------------------------------------------------- library progress bars


def test_transformers_progress_bars_are_off_under_the_cli_unless_verbose(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    try:
        assert CliRunner().invoke(main, ["-v", "cache", "--help"]).exit_code == 0
        assert hf_logging.is_progress_bar_enabled()
        assert CliRunner().invoke(main, ["cache", "--help"]).exit_code == 0
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()


# --------------------------------------------------------------------------------------------------- config docs


def test_config_reference_is_current():
    from kdcache.config_docs import DOC_PATH, render

    assert DOC_PATH.read_text() == render(), "docs/config.md is stale: run python -m kdcache.config_docs --write"


def test_config_reference_lists_every_key_with_help():
    from kdcache.config_docs import render

    text = render()
    for key in ("patience", "heldout_fraction", "max_tokens", "loss.temperature", "template.chat", "data.paths",
                "teacher.vllm", "label_prefix"):
        assert f"| `{key}` |" in text, key
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows), [
        line for line in rows if line.rstrip().endswith("|  |")]
    assert load_config(TrainConfig, None, []).patience is None  # the documented default is the real one


# ----------------------------------------------------------------------------------- ablate by a task metric


def _grid(tmp_path, student_dir, data_file, values):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"base: {{student: {student_dir}, profile: cpu, batch_size: 4, max_steps: 2, eval_every: 2, save_every: 2,\n"
        "       heldout_fraction: 0.25, lora: {enabled: false}, progress: false}\n"
        f"grid:\n  lr: {values}\n"
        f"eval: {{data: [{data_file}], limit: 6, labels: [GS1, GS2, GS3, GS4, none], metric: macro_f1}}\n")
    return grid


def test_ablate_ranks_by_the_task_metric_and_reports_the_kl_beside_it(tmp_path, sharp_cache, student_dir, data_file):
    import csv

    grid = _grid(tmp_path, student_dir, data_file, "[1.0e-6, 0.05]")
    result = CliRunner().invoke(main, ["ablate", "--cache", sharp_cache, "--grid", str(grid), "--out",
                                       str(tmp_path / "abl")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "abl" / "ablation.csv")))
    assert len(rows) == 2 and all(r["heldout_forward_kl"] for r in rows)
    scores = [float(r["eval_macro_f1"]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # best task metric first
    for row in rows:  # each figure is the run's own eval, with the cache's prompt
        metrics = json.loads((tmp_path / "abl" / row["run"] / "eval" / "metrics.json").read_text())
        assert metrics["macro_f1"] == pytest.approx(float(row["eval_macro_f1"]))
        assert metrics["run"]["prompt"] == PROMPT and metrics["n"] == 6
    assert "ranked by macro_f1" in (tmp_path / "abl" / "ablation.md").read_text()


def test_ablate_refuses_an_unknown_task_metric(tmp_path, sharp_cache, student_dir, data_file):
    grid = _grid(tmp_path, student_dir, data_file, "[1.0e-3]")
    grid.write_text(grid.read_text().replace("metric: macro_f1", "metric: acuracy"))
    result = CliRunner().invoke(main, ["ablate", "--cache", sharp_cache, "--grid", str(grid), "--out",
                                       str(tmp_path / "abl")])
    assert result.exit_code == 2 and "eval.metric 'acuracy' is not in the eval's metrics.json" in result.output


def test_ablate_optuna_search_runs_for_real(tmp_path, sharp_cache, student_dir, data_file):
    pytest.importorskip("optuna", reason="the optuna extra (in dev) is not installed")
    import csv

    grid = _grid(tmp_path, student_dir, data_file, "[1.0e-6, 1.0e-3, 0.05]")
    result = CliRunner().invoke(main, ["ablate", "--cache", sharp_cache, "--grid", str(grid), "--out",
                                       str(tmp_path / "opt"), "--search", "optuna", "--trials", "3"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "opt" / "ablation.csv")))
    assert sorted(r["run"] for r in rows) == ["trial-000", "trial-001", "trial-002"]
    assert all(r["lr"] in ("1e-06", "0.001", "0.05") and r["eval_macro_f1"] for r in rows)
    assert (tmp_path / "opt" / "trial-002" / "eval" / "metrics.json").exists()


# ---------------------------------------------------------------------- held-out figures, run summary, agreement


def test_heldout_figures_on_answer_tokens_leave_out_exactly_the_eos_targets(sharp_cache, student_dir, tokenizer):
    from kdcache.config import LoraConfig, LossConfig
    from kdcache.train.loader import CacheDataset
    from kdcache.train.student import load_student, resolve_precision
    from kdcache.train.heldout import evaluate

    heldout = CacheDataset(sharp_cache, split="heldout", heldout_fraction=0.5, batch_size=4, shuffle=False)
    precision = resolve_precision("cpu", True)
    model = load_student(student_dir, precision, LoraConfig(enabled=False), heldout.vocab_size)
    eos = tokenizer.eos_token_id
    labels = [int(t) for batch in heldout for t in batch.labels]
    assert labels.count(eos) > 0  # the cache's targets end with EOS
    figures = evaluate(model, heldout, LossConfig(alpha=0.0), precision, 7, eos_id=eos)
    assert figures["heldout_targets"] == len(labels)
    assert figures["heldout_answer_targets"] == len(labels) - labels.count(eos)
    # with an id no target has, the answer figures are the all-targets ones
    same = evaluate(model, heldout, LossConfig(alpha=0.0), precision, 7, eos_id=-1)
    for key in ("heldout_kd", "heldout_forward_kl", "heldout_top1_agreement"):
        assert same[f"{key}_answer"] == pytest.approx(same[key]) == pytest.approx(figures[key])
    assert figures["heldout_forward_kl_answer"] != pytest.approx(figures["heldout_forward_kl"])


def test_heldout_fraction_zero_with_a_separate_heldout_cache(tmp_path, sharp_cache, student_dir):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--cache", sharp_cache, "--student", student_dir, "--out", str(out),
                                       "--max-steps", "2", "--batch-size", "4", "--no-progress",
                                       "--set", "heldout_fraction=0", "--set", f"heldout_cache={sharp_cache}",
                                       "--set", "eval_every=2", "--set", "lora.enabled=false",
                                       "--set", "profile=cpu", "--set", "tensorboard=false"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "run_summary.json").read_text())
    assert "training used every example of the cache" in summary["heldout"]
    assert summary["heldout_targets"] > 0 and summary["wall_s"] > 0 and summary["tokens_per_s"] > 0
    assert "held out: every example of" in result.output and "answer tokens only (no EOS)" in result.output
    assert "tokens/s" in result.output


def test_the_run_summary_says_what_was_held_out(tmp_path, sharp_cache, student_dir):
    from kdcache.train.trainer import train

    config = load_config(TrainConfig, None, [
        f"cache={sharp_cache}", f"student={student_dir}", f"out={tmp_path / 'run'}", "max_steps=1", "batch_size=4",
        "eval_every=0", "lora.enabled=false", "profile=cpu", "progress=false", "tensorboard=false"])
    summary = train(config).summary
    assert summary["heldout"].startswith("10% of the cache's examples (heldout_fraction), which training did not "
                                         "see: it trained on the other 90%")


def test_prediction_agreement_overall_and_per_class():
    from kdcache.eval.compare import agreement_markdown, prediction_agreement

    rows = [("x", "x", "x"), ("x", "x", "y"), ("x", "y", "y"), ("y", "y", "x"), ("y", "x", "x")]
    a = {str(i): {"gold": g, "predicted": pa} for i, (g, pa, _) in enumerate(rows)}
    b = {str(i): {"gold": g, "predicted": pb} for i, (g, _, pb) in enumerate(rows)}
    result = prediction_agreement(a, b)
    assert result["n"] == 5 and result["agreement"] == pytest.approx(3 / 5)
    assert result["per_class"]["x"] == {"n": 3, "agreement": pytest.approx(2 / 3), "both_right": 1,
                                        "only_a_right": 1, "only_b_right": 0, "both_wrong": 1}
    assert result["per_class"]["y"] == {"n": 2, "agreement": pytest.approx(1 / 2), "both_right": 0,
                                        "only_a_right": 1, "only_b_right": 0, "both_wrong": 1}
    text = agreement_markdown(result, ("teacher", "student"))
    assert "same label on 60.0% of the 5 examples" in text and "| x | 3 | 66.7% | 1 | 1 | 0 | 1 |" in text
