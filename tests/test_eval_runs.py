"""Label scoring against a direct computation, generation, adapters, and `kdcache eval` / `kdcache compare` runs."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import upsc_rows

from kdcache.cli.eval import compare_command, eval_command
from kdcache.data.sources import Row
from kdcache.errors import BadInputError
from kdcache.eval.prompt_cache import can_score_from_prompt_cache
from kdcache.eval.runner import EvalConfig, run_eval, strip_timing
from kdcache.eval.scoring import (
    _score_per_label,
    generate,
    label_prefix_inputs,
    label_token_ids,
    load_model,
    parse_label,
    prompt_ids,
    score_labels,
    template_for,
)
from kdcache.tiny import build_qwen2, save_model

LABELS = ["GS1", "GS2", "GS3", "GS4", "none"]
PROMPT = "Title: {title}\nArticle: {text}\nWhich GS paper?"
PNG = b"\x89PNG\r\n\x1a\n"


def rows(n: int) -> list[Row]:
    return [Row("golden", i + 1, {**r, "text": " ".join(r["text"].split()[: 8 + 5 * i])})
            for i, r in enumerate(upsc_rows(n))]


def direct_logliks(model, prompt: list[int], labels: list[list[int]]) -> list[float]:
    """Reference: one plain forward pass per (example, label), full logits, sum of the label tokens' log-probs."""
    result = []
    for label in labels:
        ids = torch.tensor([prompt + label])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
        result.append(sum(logprobs[len(prompt) + t - 1, tok].item() for t, tok in enumerate(label)))
    return result


@pytest.fixture(scope="module")
def short_data(tmp_path_factory) -> str:
    """16 golden rows with their text cut to 12 words (fast to score)."""
    path = tmp_path_factory.mktemp("evaldata") / "golden16.jsonl"
    path.write_text("".join(json.dumps({**r, "text": " ".join(r["text"].split()[:12])}) + "\n"
                            for r in upsc_rows(16)))
    return str(path)


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory, tokenizer) -> str:
    """A tiny model with a scaled-up LM head, so label likelihoods differ clearly between labels and examples."""
    model = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=7, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("sharp"))


@pytest.mark.parametrize("label_eos", [False, True])
def test_label_scoring_matches_a_direct_computation(sharp_dir, label_eos):
    loaded = load_model(sharp_dir, device="cpu")
    tok = loaded.tokenizer
    template = template_for(PROMPT)
    prompts = [prompt_ids(template, tok, row)[0] for row in rows(4)]
    assert len({len(p) for p in prompts}) == 4  # different lengths: right padding is exercised
    labels = label_token_ids(tok, LABELS, " ", add_eos=label_eos)
    scores = score_labels(loaded.model, prompts, labels, tok.pad_token_id)
    assert scores.shape == (4, len(LABELS))
    for i, prompt in enumerate(prompts):
        reference = direct_logliks(loaded.model, prompt, labels)
        assert scores[i].tolist() == pytest.approx(reference, abs=1e-4)
        assert int(scores[i].argmax()) == max(range(len(LABELS)), key=reference.__getitem__)
    # half precision runs too and stays close
    bf16 = load_model(sharp_dir, device="cpu", dtype="bfloat16")
    low = score_labels(bf16.model, prompts, labels, tok.pad_token_id)
    assert abs(low - scores).max() < 0.5 * abs(scores).max()


def test_single_token_labels_are_scored_from_one_forward_over_the_prompts(sharp_dir):
    """One-token labels need no label forward (no prompt inputs), and score as the per-label path and a direct
    computation do, on prompts of different lengths."""
    loaded = load_model(sharp_dir, device="cpu")
    tok = loaded.tokenizer
    prompts = [prompt_ids(template_for(PROMPT), tok, row)[0] for row in rows(5)]
    labels = [[5], [17], [42], [99]]
    assert label_prefix_inputs(labels) == ([], [[], [], [], []])
    fast = score_labels(loaded.model, prompts, labels, tok.pad_token_id, vocab_size=len(tok))
    general = _score_per_label(loaded.model, prompts, labels, tok.pad_token_id, loaded.device, 1024, len(tok))
    np.testing.assert_allclose(fast, general, atol=1e-4)
    for i, prompt in enumerate(prompts):
        assert fast[i].tolist() == pytest.approx(direct_logliks(loaded.model, prompt, labels), abs=1e-4)
    assert fast.std(axis=1).min() > 0.1  # the labels' scores differ: the comparison is not between constants


def test_label_prefixes_are_fed_once():
    labels = [[7, 1], [7, 2], [7, 2, 9], [8], [5, 6, 4, 3]]
    inputs, sources = label_prefix_inputs(labels)
    assert inputs == [(5, 6, 4), (7, 2)]  # (7,) is a prefix of (7, 2): fed once, inside it
    assert sources == [[(1, 0)], [(1, 0)], [(1, 0), (1, 1)], [], [(0, 0), (0, 1), (0, 2)]]


def test_models_a_tree_mask_cannot_serve_take_the_per_label_path():
    model = build_qwen2(64, hidden_size=32, layers=2, heads=2, seed=0)
    assert can_score_from_prompt_cache(model)
    model.config.layer_types = ["full_attention", "sliding_attention"]  # a custom mask would drop the window
    assert not can_score_from_prompt_cache(model)
    model.config.layer_types = ["full_attention"] * 2
    model.config._attn_implementation = "flash_attention_2"  # takes no 4D mask
    assert not can_score_from_prompt_cache(model)


@pytest.mark.parametrize("chunk_size, attention", [(1024, "sdpa"), (3, "sdpa"), (1024, "eager")])
def test_multi_token_labels_are_scored_from_a_shared_prompt_cache(sharp_dir, chunk_size, attention):
    """Labels of 1-4 tokens (some sharing a prefix) after prompts of different lengths: the shared-prompt-cache path
    (label prefixes side by side under a tree mask) equals one plain (prompt + label) forward per pair, and a direct
    computation."""
    loaded = load_model(sharp_dir, device="cpu")
    loaded.model.set_attn_implementation(attention)
    assert can_score_from_prompt_cache(loaded.model)
    tok = loaded.tokenizer
    prompts = [prompt_ids(template_for(PROMPT), tok, row)[0] for row in rows(5)]
    assert len({len(p) for p in prompts}) == 5  # right padding leaves pad slots between prompt and label
    labels = [[5, 17], [5, 42], [5, 42, 99], [61], [70, 71, 72, 73], [99, 5, 17]]
    fast = score_labels(loaded.model, prompts, labels, tok.pad_token_id, vocab_size=len(tok), chunk_size=chunk_size)
    general = _score_per_label(loaded.model, prompts, labels, tok.pad_token_id, loaded.device, 1024, len(tok))
    np.testing.assert_allclose(fast, general, atol=1e-4)
    for i, prompt in enumerate(prompts):
        assert fast[i].tolist() == pytest.approx(direct_logliks(loaded.model, prompt, labels), abs=1e-4)
    assert fast.std(axis=1).min() > 0.1 and fast.std(axis=0).max() > 0.1  # labels and prompts differ


def test_prompt_uses_the_chat_template(tokenizer):
    row = rows(1)[0]
    with_chat, _ = prompt_ids(template_for(PROMPT, system="Be brief."), tokenizer, row)
    text = tokenizer.decode(with_chat)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTitle:")
    assert text.endswith("Which GS paper?<|im_end|>\n<|im_start|>assistant\n")
    plain, _ = prompt_ids(template_for(PROMPT, chat="no"), tokenizer, row)
    assert tokenizer.decode(plain).startswith("Title:")
    full, _ = prompt_ids(template_for(PROMPT), tokenizer, row)
    cut, dropped = prompt_ids(template_for(PROMPT), tokenizer, row, max_prompt_tokens=10)
    assert cut == full[-10:] and dropped == len(full) - 10  # cut from the left
    with pytest.raises(BadInputError, match="tokenise to the same tokens|duplicates"):
        label_token_ids(tokenizer, ["GS1", "GS1"])


def test_greedy_generation_matches_a_manual_loop(sharp_dir):
    loaded = load_model(sharp_dir, device="cpu")
    tok = loaded.tokenizer
    prompts = [prompt_ids(template_for(PROMPT), tok, row)[0] for row in rows(2)]
    texts = generate(loaded.model, prompts, tok, max_new_tokens=4)  # left padding: the prompts differ in length
    for prompt, text in zip(prompts, texts):
        ids = list(prompt)
        for _ in range(4):
            with torch.no_grad():
                nxt = int(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids.append(nxt)
        assert text == tok.decode(ids[len(prompt):], skip_special_tokens=True)
    assert parse_label(" gs3 it is", LABELS) == "GS3"


def test_adapter_folder_loads_base_plus_adapter(tmp_path, teacher_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(teacher_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")  # no tokenizer here: the base model's is used
    loaded = load_model(str(tmp_path / "adapter"), device="cpu")
    assert loaded.base == teacher_dir and loaded.adapter_parameters > 0
    assert loaded.size_on_disk_bytes < loaded.base_size_on_disk_bytes
    prompts = [prompt_ids(template_for(PROMPT), tokenizer, row)[0] for row in rows(2)]
    labels = label_token_ids(tokenizer, LABELS)
    scores = score_labels(loaded.model, prompts, labels, tokenizer.pad_token_id)
    peft_model.eval()
    for i, prompt in enumerate(prompts):
        assert scores[i].tolist() == pytest.approx(direct_logliks(peft_model, prompt, labels), abs=1e-4)
    plain = score_labels(load_model(teacher_dir, device="cpu").model, prompts, labels, tokenizer.pad_token_id)
    assert abs(plain - scores).max() > 1e-3  # the adapter changes the scores


def config(model, data, out, **overrides) -> EvalConfig:
    return EvalConfig(model=model, data=[data], out=str(out), labels=LABELS, label_field="gs_paper", prompt=PROMPT,
                      negative_label="none", batch_size=5, device="cpu", **overrides)


def test_eval_is_reproducible_and_matches_the_scorer(tmp_path, sharp_dir, short_data):
    first = run_eval(config(sharp_dir, short_data, tmp_path / "one", limit=12, warmup=False))
    second = run_eval(config(sharp_dir, short_data, tmp_path / "two", limit=12, warmup=False, plots=False))
    assert strip_timing(first.metrics) == strip_timing(second.metrics)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert strip_timing(one) == strip_timing(two) and one["n"] == 12
    table = pq.read_table(tmp_path / "one" / "predictions.parquet").to_pylist()
    assert [r["id"] for r in table] == [r["id"] for r in upsc_rows(12)]
    for record in table:
        probs = [record[f"prob_{label}"] for label in LABELS]
        assert sum(probs) == pytest.approx(1.0) and record["confidence"] == pytest.approx(max(probs))
        assert record["predicted"] == LABELS[max(range(5), key=lambda j: record[f"loglik_{LABELS[j]}"])]
        assert record["correct"] == (record["predicted"] == record["gold"]) and record["latency_s"] > 0
    # the metrics are the metrics of these predictions
    assert one["accuracy"] == pytest.approx(sum(r["correct"] for r in table) / 12)
    assert one["speed"]["latency_mean_s"] > 0 and one["speed"]["peak_gpu_memory_bytes"] is None
    assert one["size"]["parameters"] > 0 and one["size"]["size_on_disk_bytes"] > 0
    assert (tmp_path / "one" / "report.md").read_text().startswith("# Evaluation:")
    for name in ("confusion.png", "reliability.png"):
        assert (tmp_path / "one" / name).read_bytes()[:8] == PNG


def test_generate_mode_parses_labels_and_scores_text(tmp_path, sharp_dir, short_data):
    result = run_eval(config(sharp_dir, short_data, tmp_path / "gen", mode="generate", max_new_tokens=4, limit=6,
                             warmup=False, plots=False))
    metrics = result.metrics
    assert metrics["n"] == 6 and "calibration" not in metrics
    assert set(metrics["generation"]) >= {"exact_match", "token_f1", "rouge_l", "bleu"}
    for record in result.predictions:
        assert record["predicted"] == parse_label(record["generated"], LABELS)
    assert metrics["unparsed"] == sum(r["predicted"] == "unparsed" for r in result.predictions)


def test_bad_eval_input_is_a_clear_error(tmp_path, teacher_dir, short_data):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(BadInputError, match="no examples"):
        run_eval(config(teacher_dir, str(empty), tmp_path / "x"))
    with pytest.raises(BadInputError, match=r"gold labels \['none'\]"):
        run_eval(EvalConfig(model=teacher_dir, data=[short_data], out=str(tmp_path / "y"), labels=LABELS[:4],
                            label_field="gs_paper", prompt=PROMPT, device="cpu"))
    with pytest.raises(BadInputError, match="needs the label strings"):
        run_eval(EvalConfig(model=teacher_dir, data=[short_data], out=str(tmp_path / "z"), label_field="gs_paper"))


def eval_args(model, data, out) -> list[str]:
    args = ["--model", model, "--data", data, "--label-field", "gs_paper", "--prompt", PROMPT, "--out", str(out),
            "--negative-label", "none", "--batch-size", "8", "--device", "cpu", "--no-progress", "--no-warmup",
            ]
    for label in LABELS:
        args += ["--labels", label]
    return args


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, sharp_dir, teacher_dir, short_data):
    root = tmp_path_factory.mktemp("runs")
    for name, model in (("teacher", sharp_dir), ("student", teacher_dir)):
        result = CliRunner().invoke(eval_command, eval_args(model, short_data, root / name))
        assert result.exit_code == 0, result.output
        assert "16 examples; accuracy" in result.output
    return root


def test_compare_writes_report_and_plots(two_runs, tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(compare_command, [str(two_runs / "teacher"), str(two_runs / "student"),
                                                  "--names", "teacher", "student", "--out", str(out),
                                                  "--target-accuracy", "0.3"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    a = json.loads((two_runs / "teacher" / "metrics.json").read_text())
    b = json.loads((two_runs / "student" / "metrics.json").read_text())
    assert "| metric | teacher | student |" in report and "## Cascade" in report
    assert f"{100 * b['accuracy'] / a['accuracy']:.1f}%" in report  # retention of the teacher's accuracy
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["retention"]["accuracy"] == pytest.approx(b["accuracy"] / a["accuracy"])
    assert summary["cascade"]["n"] == 16 and summary["passed"] is None
    for name in ("confusion_matrices.png", "reliability.png", "cascade.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 1000


def test_compare_exit_status_follows_the_criteria(two_runs, tmp_path):
    a = json.loads((two_runs / "teacher" / "metrics.json").read_text())
    b = json.loads((two_runs / "student" / "metrics.json").read_text())
    holding = tmp_path / "ok.yaml"
    holding.write_text(
        "criteria:\n"
        f"  - {{metric: accuracy, min: {b['accuracy'] - 0.01}}}\n"
        f"  - {{metric: accuracy, max_drop_vs: A, points: {100 * (a['accuracy'] - b['accuracy']) + 1}}}\n"
        "  - {metric: relevance.recall, run: teacher, min: 0.0}\n")
    failing = tmp_path / "fail.yaml"
    failing.write_text(f"- {{metric: accuracy, min: {b['accuracy'] + 0.01}, name: strict}}\n"
                       "- {metric: macro_f1, min: 0.0}\n")
    runs = [str(two_runs / "teacher"), str(two_runs / "student"), "--names", "teacher", "student"]
    ok = CliRunner().invoke(compare_command, [*runs, "--criteria", str(holding)])
    assert ok.exit_code == 0, ok.output
    assert "all 3 success criteria hold" in ok.output and "[FAIL]" not in ok.output
    bad = CliRunner().invoke(compare_command, [*runs, "--criteria", str(failing), "--out", str(tmp_path / "c")])
    assert bad.exit_code == 1, bad.output
    assert "[FAIL] strict: student accuracy" in bad.output and "[PASS]" in bad.output
    assert json.loads((tmp_path / "c" / "comparison.json").read_text())["passed"] is False
    broken = tmp_path / "broken.yaml"
    broken.write_text("- {metric: acuracy, min: 0.5}\n")
    error = CliRunner().invoke(compare_command, [*runs, "--criteria", str(broken)])
    assert error.exit_code == 2 and "did you mean accuracy" in error.output


def test_eval_reads_a_job_spec_with_overrides(tmp_path, sharp_dir, short_data):
    """`kdcache eval --config` like train and cache build: options and --set override the YAML file's values."""
    spec = tmp_path / "eval.yaml"
    spec.write_text(json.dumps({"model": sharp_dir, "data": [short_data], "labels": LABELS, "label_field": "gs_paper",
                                "prompt": PROMPT, "negative_label": "none", "device": "cpu", "limit": 8}))
    out = tmp_path / "from-spec"
    result = CliRunner().invoke(eval_command, ["--config", str(spec), "--out", str(out), "--limit", "4",
                                               "--no-plots", "--no-progress", "--set", "batch_size=3"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "eval_config.json").read_text())
    assert saved["limit"] == 4 and saved["batch_size"] == 3 and saved["labels"] == LABELS  # option, --set, YAML
    assert saved["plots"] is False and saved["warmup"] is True and saved["max_length"] == 1024  # the defaults hold
    assert json.loads((out / "metrics.json").read_text())["n"] == 4
    result = CliRunner().invoke(eval_command, ["--config", str(spec), "--out", str(out), "--set", "mode=guess"])
    assert result.exit_code == 2 and "config key 'mode' must be one of ['score', 'generate']" in result.output


def test_compare_refuses_runs_on_different_examples(tmp_path, two_runs, sharp_dir, short_data):
    result = CliRunner().invoke(eval_command, [*eval_args(sharp_dir, short_data, tmp_path / "short"),
                                               "--limit", "5", "--no-plots"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(compare_command, [str(two_runs / "teacher"), str(tmp_path / "short")])
    assert result.exit_code == 2 and "not made on the same examples" in result.output
